"""The backbone contract: what every port provides, and how it is registered.

How to write a port (one module per architecture, e.g. stackcls/models/backbones/xception.py)
-------------------------------------------------------------------------------------
1. Subclass `Backbone`. Build every weight-bearing layer from `layers.py` (Conv2D,
   DepthwiseConv2D, SeparableConv2D, BatchNorm, Dense), each with the name of the Keras layer it
   mirrors (`keras.applications` names: "block1_conv1", "conv_dw_13_bn", ...). Layers Keras
   leaves unnamed (InceptionV3's "conv2d_37") get the name Keras 3 gives them in a fresh session
   ("conv2d", "conv2d_1", ..., in Keras's creation order), which keeps names readable; loading
   does not rely on them (see 5).
2. Set `self.input_size` (int, the constructor's `input_size` argument) and, as a class
   attribute, `preprocess` ("caffe" | "tf" | "torch"): the Keras preprocess_input mode.
3. Put ALL weight-bearing layers of the last convolutional block (the block depth-1 training
   fine-tunes) under the attribute `self.block_last` (a `Block`, i.e. an nnx.Module holding them
   as attributes), so `nnx.PathContains("block_last")` selects exactly what depth-1 training
   unfreezes. Everything else lives outside `block_last`.
4. Implement
     `trunk(x, train=False) -> carry`: preprocessed NHWC input -> activations entering the last
         block (any pytree: an array, or a tuple when the block needs two inputs, as NASNet's
         cells do);
     `last_block(carry, train=False) -> (N, h, w, C)` feature map (the Keras model's output
         without pooling).
   `__call__(x, train=False)` is `last_block(trunk(x))`; `features()` in the registry adds
   preprocessing and global average pooling.
5. Weight order: `keras_order()` returns the Keras names of all weight-bearing layers in the
   order of Keras's `model.layers` (the order of a legacy HDF5 file's `layer_names`; Keras's own
   `load_weights` matches by this order). The default is the order in which the port constructed
   its layers, right for chains (VGG, MobileNets). Keras 3 orders `model.layers` by graph depth,
   so for branching architectures (Inception, NASNet, Xception's residual convs) either construct
   the layers in Keras's order or override `keras_order()` with an explicit list. The loader
   (weights.py) matches by name when every name in the file equals a name of the port, and
   otherwise by this order, checking layer type, number of weights and every shape, and names
   that are not Keras auto-names ("conv2d_12"). The equivalence test
   (tests/test_keras_equivalence.py) proves the order against Keras.
6. Register: the module ends with `SPECS = (BackboneSpec(name, cls, input_size, ...), ...)`:
   the name, default and minimum input size, the user options with their defaults, and the
   ImageNet files (`download.keras_file(url path, hash, alpha=, rows=)`); the registry gathers
   the SPECS of the modules listed in backbones/__init__.py, once, at import.
7. Add the Keras constructor for the name to tests/keras_reference.py; the equivalence test
   then covers the port.

BatchNorm semantics: a frozen part runs with train=False (moving statistics, current Keras); only
the trained part is called with train=True.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from flax import nnx

from stackcls.models.backbones.download import WeightFile
from stackcls.models.backbones.layers import KerasLayer, creation_order, keras_layers

PREPROCESS_MODES = ("caffe", "tf", "torch")


class Block(nnx.Module):
    """A plain container of layers (e.g. the last convolutional block), set by keyword."""

    def __init__(self, **layers):
        for k, v in layers.items():
            setattr(self, k, v)


class Backbone(nnx.Module):
    """Base class of all ports; see the module docstring for the contract."""

    preprocess: str  # class attribute of each port: its Keras preprocess_input mode
    input_size: int
    block_last: nnx.Module

    def trunk(self, x, train: bool = False):
        raise NotImplementedError

    def last_block(self, carry, train: bool = False):
        raise NotImplementedError

    def __call__(self, x, train: bool = False):
        return self.last_block(self.trunk(x, train=train), train=train)

    def keras_order(self) -> list[str]:
        """Keras names of the weight-bearing layers in Keras `model.layers` order."""
        order = getattr(self, "_keras_order", None)
        if order is not None:
            return list(order)
        return [l.name for l in creation_order(keras_layers(self).values())]

    def freeze_order(self) -> None:
        """Record the construction order as a static tuple (called by create(), so the order
        survives nnx.split/merge; equal for all instances of one configuration)."""
        self._keras_order = tuple(self.keras_order())

    def last_block_layers(self) -> dict[str, KerasLayer]:
        return keras_layers(self.block_last)


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry of one backbone name (in the spirit of timm's pretrained configs).

    cls(input_size=..., rngs=..., **config, **options) builds it. options: what `create()`
    accepts for this name, with defaults (e.g. alpha); config: fixed constructor arguments (one
    class behind several names, as CBR). pretrained: its ImageNet files (empty: trained from
    scratch); `weight_file()` picks one as keras.applications does.
    """

    name: str
    cls: type[Backbone]
    input_size: int
    min_size: int = 32
    pretrained: tuple[WeightFile, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"{self.name}: preprocess must be one of {PREPROCESS_MODES}")

    @property
    def preprocess(self) -> str:
        return self.cls.preprocess

    def build(self, input_size: int, rngs: nnx.Rngs, **options) -> Backbone:
        return self.cls(input_size=input_size, rngs=rngs, **self.config, **options)

    def weight_file(self, input_size: int | None = None, **options) -> WeightFile:
        """The file Keras would load: the alpha must be one Keras trained; an input size with no
        file of its own gets the 224 file (Keras warns and does the same)."""
        if not self.pretrained:
            raise ValueError(f"{self.name} has no ImageNet weights (trained from scratch); "
                             "use weights=None")
        alpha = options.get("alpha", self.options.get("alpha"))
        files = [f for f in self.pretrained if f.alpha is None or f.alpha == float(alpha)]
        if not files:
            alphas = sorted({f.alpha for f in self.pretrained})
            raise ValueError(f"{self.name} has ImageNet weights for alpha {alphas}, not {alpha}")
        rows = {f.rows: f for f in files}
        return rows.get(input_size) or rows.get(224) or rows[None]
