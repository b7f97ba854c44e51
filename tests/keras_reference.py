"""Keras reference constructors for the equivalence test and the benchmark (test-side only; Keras
is not a runtime dependency). One entry per ported backbone name (all but the CBR baselines,
which have no Keras application).

KERAS[name] = KerasRef(build, size, options, preprocess)
  build(size) -> keras.Model with include_top=False, weights=None, pooling="avg"
  size: a small input size the architecture accepts (keeps the test fast)
  options: extra keyword arguments for stackcls.models.backbones.create (e.g. alpha)
  preprocess: the Keras application's own preprocess_input (checked against ours)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402  (after the backend is pinned)


@dataclass(frozen=True)
class KerasRef:
    build: Callable[[int], Any]
    size: int
    options: dict = field(default_factory=dict)
    preprocess: Callable | None = None


def _app(ctor_path: str, **kw):
    def build(size):
        mod, cls = ctor_path.rsplit(".", 1)
        ctor = getattr(getattr(keras.applications, mod), cls)
        return ctor(include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3), **kw)
    return build


def _pre(mod: str):
    def f(x):
        return getattr(keras.applications, mod).preprocess_input(x.copy())
    return f


KERAS: dict[str, KerasRef] = {
    "vgg16": KerasRef(_app("vgg16.VGG16"), 64, {}, _pre("vgg16")),
    "mobilenet": KerasRef(_app("mobilenet.MobileNet", alpha=0.25), 64, {"alpha": 0.25},
                          _pre("mobilenet")),
    "mobilenet_v2": KerasRef(_app("mobilenet_v2.MobileNetV2", alpha=0.35), 64, {"alpha": 0.35},
                             _pre("mobilenet_v2")),
    "resnet50_v2": KerasRef(_app("resnet_v2.ResNet50V2"), 64, {}, _pre("resnet_v2")),
    "densenet121": KerasRef(_app("densenet.DenseNet121"), 64, {}, _pre("densenet")),
    "xception": KerasRef(_app("xception.Xception"), 71, {}, _pre("xception")),
    "inception_v3": KerasRef(_app("inception_v3.InceptionV3"), 75, {}, _pre("inception_v3")),
    "inception_resnet_v2": KerasRef(_app("inception_resnet_v2.InceptionResNetV2"), 75, {},
                                    _pre("inception_resnet_v2")),
    "nasnet_mobile": KerasRef(_app("nasnet.NASNetMobile"), 72, {}, _pre("nasnet")),
}
