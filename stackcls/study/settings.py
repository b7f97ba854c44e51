"""The study's settings: what each one trains, on which inputs, from which starting weights.

    Scratch  a CBR network trained whole on images, rotated on the fly (BN in training mode)
    Depth0   the head on the frozen backbone's pooled features of fixed rotated views
    Depth1   the last block and the head on the trunk's outputs of the same views; CV fold f starts
             from depth 0 trained on fold f, the final model from depth 0's final model

`plan(backbone, depth)` lists the settings of a run in training order; `stage_inputs` computes,
once, the inputs they need (one pass through the trunk serves both depths).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from stackcls.models import backbones
from stackcls.train.engine import Pool, split
from stackcls.models.apply import extract, pooled_features
from stackcls.models.classifier import Classifier
from stackcls.study.config import Protocol


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """A stage's inputs: the training pool's views (N, V, ...) (V = 1 when rotated on the fly),
    the clean training slices (N, ...), the test slices (M, ...)."""

    views: Any
    clean: Any
    test: Any


@dataclasses.dataclass(frozen=True)
class Start:
    """What a setting's training starts from: the model, and the trainable state of CV fold f
    (fold_init(f)) and of the final model (None: the model's own)."""

    model: Classifier
    fold_init: Callable[[int], nnx.State] | None = None
    final_init: nnx.State | None = None


def vmapped(conv: bool, vmap) -> bool:
    """Whether a setting's CV jobs train together. vmap=auto: head-only training always,
    convolutional training on accelerators only (XLA:CPU runs per-job convolutions slowly)."""
    if vmap == "auto":
        return jax.default_backend() != "cpu" if conv else True
    return bool(vmap)


class Setting:
    name = ""          # run-directory folder, CV job prefix, protocol.learning_rates field
    key = ""           # its row in results.json's "depths"
    stage = ""         # stackcls.train.engine stage of its inputs
    conv = True        # trains convolutions
    rotate = False     # rotates its images on the fly

    def pool(self, inputs: StageInputs, y, protocol: Protocol) -> Pool:
        return Pool(self.stage, inputs.views, inputs.clean, y,
                    rotate_deg=float(protocol.rotation) if self.rotate else 0.0)

    def start(self, model: Classifier, trained: dict[str, dict], seed: int, vmap) -> Start:
        """trained: run_setting's result of every earlier setting, by name."""
        return Start(model)


class Scratch(Setting):
    name, key, stage, conv, rotate = "scratch", "scratch", "image", True, True


class Depth0(Setting):
    name, key, stage, conv = "depth0", "0", "features", False


class Depth1(Setting):
    name, key, stage, conv = "depth1", "1", "carry", True

    def start(self, model, trained, seed, vmap) -> Start:
        depth0 = trained[Depth0.name]
        return Start(depth0["model"], _FoldStarts(depth0, seed, vmapped(Depth0.conv, vmap)),
                     split(depth0["model"], self.stage)[1])


class _FoldStarts:
    """Depth 1's fold_init: fold f starts from depth 0 trained on fold f's training subjects with
    depth 0's selected (lr, epochs), exactly that CV job's state at the selected epoch. CV jobs
    keep no weights, so depth 0's jobs of that lr are trained again, together, when a first fold
    asks (a resumed run whose depth-1 jobs are all done never asks)."""

    def __init__(self, depth0: dict, seed: int, vmapped: bool):
        self.depth0, self.seed, self.vmapped = depth0, seed, vmapped
        self.states: dict[int, nnx.State] = {}

    def __call__(self, fold: int) -> nnx.State:
        if not self.states:
            res, sel = self.depth0, self.depth0["selected"]
            trainer, jobs = res["trainer"], res["jobs"]
            shape = (max(len(j.items) for j in jobs), max(len(j.val) for j in jobs))
            rs = trainer.run([j for j in jobs if j.lr == sel["learning_rate"]], sel["epochs"],
                             self.seed, vmapped=self.vmapped, keep_state=True,
                             desc="depth0 fold models", _shape=shape)
            for f, r in enumerate(rs):
                self.states[f] = split(trainer.apply(res["model"], r), Depth1.stage)[1]
        return self.states[fold]


def plan(backbone: str, depth: int) -> list[Setting]:
    """The settings a run trains, in order."""
    if not backbones.spec(backbone).pretrained:
        return [Scratch()]
    if depth not in (0, 1):
        raise ValueError(f"depth must be 0 or 1, got {depth}")
    return [Depth0(), Depth1()][:depth + 1]


def stage_inputs(model: Classifier, tr: dict, te: dict, protocol: Protocol, seed: int,
                 stages) -> dict[str, StageInputs]:
    """The inputs of every stage in `stages` ("image", "features", "carry") for the train and test
    arrays (stackcls.preprocess.arrays.stack_arrays); the frozen backbone runs once per image and view."""
    x, views, rot = tr["x"], protocol.views, float(protocol.rotation)
    out = {}
    if "image" in stages:
        out["image"] = StageInputs(x[:, None], x, te["x"])
    if "carry" in stages:  # one pass through the trunk serves both depths
        carry = StageInputs(extract(model, x, "carry", views, seed, rot, desc="trunk (views)"),
                            extract(model, x, "carry", 0, desc="trunk (train)"),
                            extract(model, te["x"], "carry", 0, desc="trunk (test)"))
        out["carry"] = carry
        out["features"] = StageInputs(pooled_features(model, carry.views, views=True),
                                      pooled_features(model, carry.clean),
                                      pooled_features(model, carry.test))
    elif "features" in stages:
        out["features"] = StageInputs(
            extract(model, x, "features", views, seed, rot, desc="features (views)"),
            extract(model, x, "features", 0, desc="features (train)"),
            extract(model, te["x"], "features", 0, desc="features (test)"))
    return out
