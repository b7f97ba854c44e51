"""The anatomy model: the ImageNet backbone as the encoder of a light U-Net decoder that segments
RV cavity / LV myocardium / LV cavity, trained jointly with the paper's slice classifier head.

    x (N, n, n, 3) 0..255 -> backbone.pyramid -> [s2, s4, s8, s16, s32] feature maps
        s32 -> GAP -> Dense 256 ReLU -> Dense 3        slice logits (the paper's head)
        s32 ... s2 -> upsample + skip + 2 convs each   -> 4-class mask logits at s1
    mask probabilities -> `evidence` (models/evidence.py): what the stack head reads besides the classifier

Why masks: the labels are defined by anatomy (IN = the LV cavity is in the slice; OAP/OBS = which
side of that range), and 40 patients' worth of slice labels are too few to learn the cavity from a
3-way label alone; every pixel of a mask is supervision. Where a stack has no masks (a DICOM tree
with only a labels CSV) its mask loss is simply absent.

Training (`train`) samples a crop of `size` pixels from each slice's larger canvas (physical.py)
with a random rotation, scale, flip, shift and gamma, all inside the jitted step; AdamW with a
cosine schedule; the whole encoder trains, its BatchNorm layers in training mode (batch statistics,
moving averages updated): grey MR images are far from ImageNet's statistics.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.batching import map_chunks
from stackcls.models.classifier import Head, gap, preprocess_input
from stackcls.models.evidence import EVIDENCE, columns, evidence
from stackcls.programs import Program

N_MASK = 4                   # background, RV cavity, LV myocardium, LV cavity (ACDC's labels)
OUTPUTS = ("probs", "pen", "evidence", "lv", "mask")   # what inference returns per slice


@dataclasses.dataclass(frozen=True)
class AnatomyConfig:
    size: int = 128              # model input, pixels at physical.SPACING_MM (192 mm)
    canvas: int = 176            # training canvas around the heart: room for shifts and rotations
    widths: tuple[int, ...] = (16, 24, 32, 48)   # decoder channels at strides 2, 4, 8, 16
    epochs: int = 20
    learning_rate: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    mask_weight: float = 1.0
    class_weight: str = "sqrt"   # slice loss: "sqrt" (1/sqrt(frequency)), "balanced" (1/frequency) or "none"
    rotation: float = 45.0
    shift_mm: float = 24.0
    scale: float = 0.1
    # neighbouring slices shown as the input's colour channels: 0, the slice alone (grey in all
    # three); 1, (previous, this, next) slice of the stack, the ends repeated (2.5-D input)
    context: int = 0
    # each stack's `end_slices` slices at either end are drawn this many times as often as the
    # others (1: uniform): the labels change only there, the middle of a stack is always IN
    end_weight: float = 1.0
    end_slices: int = 2

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        bad = [f"{name}={getattr(self, name)!r} ({want})" for name, ok, want in (
            ("size", self.size >= 32 and self.size % 32 == 0, "a multiple of 32, >= 32"),
            ("canvas", self.canvas >= self.size, ">= size"),
            ("widths", len(self.widths) == 4 and min(self.widths) >= 1, "4 positive channel counts"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("context", self.context in (0, 1), "0 or 1: the backbones take three channels"),
            ("end_weight", self.end_weight >= 1, ">= 1"),
            ("end_slices", self.end_slices >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("class_weight", self.class_weight in ("sqrt", "balanced", "none"),
             "sqrt, balanced or none")) if not ok]
        if bad:
            raise ValueError(f"anatomy config: {'; '.join(bad)}")


class _Up(nnx.Module):
    """One decoder level: upsample, concatenate the skip, then a pointwise mix and a depthwise-
    separable 3x3 (MobileNet's own block): a full 3x3 conv at stride 2 cost 5x the encoder."""

    def __init__(self, cin: int, width: int, *, rngs: nnx.Rngs):
        self.mix = nnx.Conv(cin, width, (1, 1), rngs=rngs)
        self.dw = nnx.Conv(width, width, (3, 3), feature_group_count=width, rngs=rngs)
        self.pw = nnx.Conv(width, width, (1, 1), rngs=rngs)

    def __call__(self, x, skip):
        x = jax.image.resize(x, skip.shape[:3] + (x.shape[3],), "bilinear")
        x = jax.nn.relu(self.mix(jnp.concatenate([x, skip], -1)))
        return jax.nn.relu(self.pw(self.dw(x)))


class Decoder(nnx.Module):
    def __init__(self, in_channels: list[int], widths, *, rngs: nnx.Rngs):
        # in_channels: the pyramid's channels, shallow (s2) to deep (s32)
        levels, prev = [], in_channels[-1]
        for skip, w in reversed(list(zip(in_channels[:-1], widths))):
            levels.append(_Up(prev + skip, w, rngs=rngs))
            prev = w
        self.levels = nnx.List(levels)
        self.out = nnx.Conv(prev, N_MASK, (1, 1), rngs=rngs)

    def __call__(self, pyramid, size: int):
        x = pyramid[-1]
        for up, skip in zip(self.levels, reversed(pyramid[:-1])):
            x = up(x, skip)
        logits = self.out(x)
        return jax.image.resize(logits, (x.shape[0], size, size, N_MASK), "bilinear")


class Prior(nnx.Variable):
    """log of the class weights the slice loss was trained with (not trained; saved)."""


class AnatomyNet(nnx.Module):
    def __init__(self, backbone, config: AnatomyConfig, *, rngs: nnx.Rngs):
        if not hasattr(backbone, "pyramid"):
            raise ValueError(f"method=anatomy needs a backbone with a feature pyramid; "
                             f"{type(backbone).__name__} has none (use mobilenet)")
        self.backbone = backbone
        self.size = config.size
        shapes = jax.eval_shape(lambda: backbone.pyramid(jnp.zeros((1, config.size, config.size, 3))))
        chans = [s.shape[-1] for s in shapes]
        self.decoder = Decoder(chans, config.widths, rngs=rngs)
        self.head = Head(chans[-1], rngs=rngs)
        self.log_weight = Prior(jnp.zeros(3))

    def slice_probs(self, logits):
        """Probabilities without the class weighting of training: a loss weighted by w_c learns
        p(c|x) * w_c (up to a constant), so log w_c is taken off again (logit adjustment). The
        weights help the rare classes' features; their bias would cost whole stacks at the
        ordered decoding, where the common all-IN stacks lose to spurious OAP/OBS."""
        return jax.nn.softmax(logits - self.log_weight[...], -1)

    def __call__(self, x, key=None, train: bool = False):
        """(mask logits (N, n, n, 4), slice logits (N, 3), penultimate (N, 256)). train: the
        encoder's BatchNorm layers normalise with batch statistics and update their moving ones
        (ImageNet's statistics do not fit grey MR images; frozen, they slow fine-tuning down)."""
        feats = self.backbone.pyramid(preprocess_input(x, self.backbone.preprocess), train)
        f = gap(feats[-1])
        pen = self.head.penultimate(f)
        return self.decoder(feats, x.shape[1]), self.head(f, key), pen


# ----------------------------------------------------------------------------- augmentation


def with_context(x: np.ndarray, context: int) -> np.ndarray:
    """One stack's slices (S, n, n), in stack order, -> model inputs (S, n, n, 3).

    context 0: each slice grey in all three channels, as the ImageNet backbone was fed colour.
    context 1: (previous, this, next) slice, an end slice standing in for its missing neighbour.
    Whether a slice still holds a cavity is easier to judge beside its neighbours: at the apex the
    cavity shrinks towards it, at the base the atrium opens beyond it. The direction of the stack is
    often unknown here, so the neighbours are not put in stack order but brighter first: a stack and
    its reverse then give each slice the same input, and the same answer. Training swaps them at
    random, so the model has seen either order."""
    x = np.asarray(x, np.float32)
    if context == 0:
        return np.repeat(x[..., None], 3, -1)
    idx = np.arange(len(x))
    a, b = x[np.maximum(idx - 1, 0)], x[np.minimum(idx + 1, len(x) - 1)]
    swap = (a.mean((1, 2)) < b.mean((1, 2)))[:, None, None]
    return np.stack([np.where(swap, b, a), x, np.where(swap, a, b)], -1)


def centre_crop(canvas: np.ndarray, size: int) -> np.ndarray:
    """(N, C, C, ...) -> (N, size, size, ...)."""
    C = canvas.shape[1]
    o = (C - size) // 2
    return canvas[:, o:o + size, o:o + size]


# ----------------------------------------------------------------------------- training


_INFER: dict = {}


def _rgb(x):
    """Model inputs (N, n, n, 3) as they are; grey ones (N, n, n) repeated into the channels."""
    return jnp.repeat(x[..., None], 3, -1) if x.ndim == 3 else x


def _net_fn(merge):
    """fn(state, xb) -> one net's outputs (OUTPUTS order), not yet compiled; merge(state) -> the net."""
    def fn(state, xb):
        m = merge(state)
        seg, logits, pen = m(_rgb(xb))
        p = jax.nn.softmax(seg, -1)
        return (m.slice_probs(logits), pen, evidence(p), p[..., 2] + p[..., 3],
                jnp.argmax(seg, -1).astype(jnp.uint8))
    return fn


def _infer(graphdef):
    """The jitted inference of one architecture (cached: every fold and evaluation reuses it)."""
    if graphdef not in _INFER:
        _INFER[graphdef] = jax.jit(_net_fn(lambda state: nnx.merge(graphdef, state, copy=True)))
    return _INFER[graphdef]


def outputs(net: AnatomyNet, x, chunk: int = 32) -> dict:
    """Inference over model inputs (N, n, n) grey or (N, n, n, 3): slice probs (N, 3),
    penultimate (N, 256), evidence (N, E), LV probability map (N, n, n) (for localisation),
    mask (N, n, n) the most probable class of each pixel."""
    graphdef, state = nnx.split(net)
    return _chunked(_infer(graphdef), state, x, chunk)


def _chunked(run, state, x, chunk: int) -> dict:
    """run(state, chunk of x) over x's rows, as numpy, keyed by OUTPUTS."""
    return dict(zip(OUTPUTS, map_chunks(lambda xb: run(state, xb), np.asarray(x, np.float32), chunk,
                                        host=True)))


# ----------------------------------------------------------------------------- the trained model

class Ensemble(nnx.Module):
    """The K fold models of a cross-validation, averaged at test time."""

    def __init__(self, nets: list[AnatomyNet]):
        self.nets = nnx.List(nets)


def build_net(backbone: str, cfg: AnatomyConfig, weights=None, seed: int = 0) -> AnatomyNet:
    """A fresh AnatomyNet; weights: None (random), "imagenet" or a Keras file. The backbone is
    built at its own input size (which picks the ImageNet file) and runs at cfg.size: the
    encoder is fully convolutional."""
    from stackcls.models import backbones
    bb = backbones.create(backbone, weights=weights, seed=seed)
    return AnatomyNet(bb, cfg, rngs=nnx.Rngs(seed))


def _ensemble_fn(merge):
    """fn(leaves stacked over the K nets, x (N, n, n, 3) model inputs) -> (probs, penultimate,
    evidence, lv map, mask) of the ensemble: the K nets vmapped (one compiled call for all), their
    mask probabilities averaged, then the evidence. merge(leaves of one net) -> the net."""
    def one(leaves, x):
        m = merge(leaves)
        seg, logits, pen = m(_rgb(x))
        return m.slice_probs(logits), pen, jax.nn.softmax(seg, -1)

    def fn(leaves, x):
        probs, pen, p = jax.vmap(one, in_axes=(0, None))(leaves, jnp.asarray(x, jnp.float32))
        p = p.mean(0)
        return (probs.mean(0), pen.mean(0), evidence(p), p[..., 2] + p[..., 3],
                jnp.argmax(p, -1).astype(jnp.uint8))
    return fn


@dataclasses.dataclass(frozen=True)
class FoldWeights:
    """The K fold networks' variables by name within one net ("backbone/.../kernel"; sorted), each
    stacked over the folds (K, ...): all that the traced programs read. build() -> the Ensemble,
    for a trace or a caller that needs the modules (a model file's are built only then)."""

    names: tuple[str, ...]
    stacked: tuple[np.ndarray, ...]
    build: object = None

    @classmethod
    def of(cls, ensemble: Ensemble) -> "FoldWeights":
        flats = [{"/".join(map(str, p)): np.asarray(v.get_value())
                  for p, v in nnx.to_flat_state(nnx.state(net))} for net in ensemble.nets]
        names = tuple(sorted(flats[0]))
        return cls(names, tuple(np.stack([f[k] for f in flats]) for k in names))


@dataclasses.dataclass
class AnatomyModel:
    """method=anatomy's trained model, ready for `predict_stack` (the same duck type as
    inference.TrainedModel): preprocess (physical normalisation with a localisation pass),
    slice_outputs (slice evidence and probabilities), stack_head, direction."""

    ensemble: Ensemble | None      # None: built from `weights` when first asked for
    config: dict
    stack_head: object = None
    path: object = None
    direction: object = None
    calibration: object = None     # temperatures of the range probabilities (stackcls.train.calibration)
    weights: FoldWeights | None = None   # the ensemble's variables (from it, when not given)

    def __post_init__(self):
        # runs saved before `context` existed fed the slice alone
        self.cfg = AnatomyConfig(**{"context": 0, **{k: (tuple(v) if isinstance(v, list) else v)
                                                     for k, v in self.config["anatomy"].items()}})
        self.localise_size = int(self.config.get("localise_size", 256))
        # the evidence columns its stack head was trained on (files before the basal rule: six)
        self.evidence = columns(self.config.get("evidence", EVIDENCE[:6]))
        if self.ensemble is None:
            del self.ensemble              # __getattr__ builds it on first use
        w = self.weights = self.weights or FoldWeights.of(self.ensemble)
        # the programs are kept on disk (stackcls.programs), keyed by the config and the variables'
        # names, and read the variables as flat leaves: a warm process never builds the modules
        key = "\0".join([json.dumps(self.config, sort_keys=True, default=str), *w.names])
        # placed on the host: an eager jnp op per weight would be one more program each
        self._state = tuple(jax.device_put(a) for a in w.stacked)
        self._state0 = tuple(jax.device_put(a[0]) for a in w.stacked)
        self._one = None
        self._jit = Program(_ensemble_fn(self._merge), "anatomy-ensemble", key)
        self._net0 = Program(_net_fn(self._merge), "anatomy-net", key)
        # unknown in-plane spacing: estimated from the images (False: the fixed field of view of
        # physical.pixel_spacing, for ablations); `last_preprocess` is the info of the last stack
        # `preprocess` saw (spacing, its source and the estimate), for the caller to report
        self.estimate_spacing = True
        self.last_preprocess: dict | None = None

    def __getattr__(self, name):
        if name != "ensemble" or "weights" not in self.__dict__:
            raise AttributeError(name)
        self.ensemble = self.weights.build()
        return self.ensemble

    def _merge(self, leaves):
        """One net whose variables are `leaves` (weights.names order); called while tracing."""
        if self._one is None:
            graphdef, state = nnx.split(self.ensemble.nets[0])
            self._one = graphdef, list(nnx.to_flat_state(state))
        graphdef, flat = self._one
        by = dict(zip(self.weights.names, leaves))
        return nnx.merge(graphdef, nnx.from_flat_state(
            [(p, v.replace(value=by["/".join(map(str, p))])) for p, v in flat]), copy=True)

    @property
    def input_size(self) -> int:
        return self.cfg.size

    def run(self, x, chunk: int = 16) -> dict:
        """Ensemble outputs over model inputs (N, n, n, 3), as numpy."""
        return _chunked(self._jit, self._state, x, chunk)

    def lv_map(self, x, chunk: int = 16) -> np.ndarray:
        """LV probability maps (N, n, n) of localisation inputs, from the first fold's net alone.
        Localisation needs the heart's centre, not the ensemble's mean map (each fold's net found it
        alone in cross-validation), and its pass, at localise_size, has four times the pixels of
        the model's own: one net instead of K makes the whole prediction about 2.5x faster."""
        return _chunked(self._net0, self._state0, x, chunk)["lv"]

    def preprocess(self, images, spacing=None) -> np.ndarray:
        """(S, H, W) -> the per-slice outputs predict_stack's compiled core reads: (S, E + 3),
        the slice evidence and the slice probabilities. The networks run here, on the host side of
        predict_stack, through one compiled call per chunk shape; inside the core (compiled once per
        stack length) they would be recompiled for every new length."""
        x, info = model_inputs(images, spacing, self.cfg, self.localise_size, self.lv_map,
                               estimate=self.estimate_spacing)
        self.last_preprocess = info
        o = self.run(x)
        return np.concatenate([o["evidence"][:, self.evidence], o["probs"]], axis=1)

    def slice_outputs(self, x):
        """(features (S, E): the slice evidence, probs (S, 3)) from `preprocess`'s output."""
        return x[:, :len(self.evidence)], x[:, len(self.evidence):]


def model_inputs(images, spacing, cfg: AnatomyConfig, localise_size: int, lv_map,
                 estimate: bool = True):
    """Physical normalisation and localisation of one stack: (x (S, n, n, 3), info)."""
    xs, infos = batch_inputs([(images, spacing)], cfg, localise_size, lv_map, estimate)
    return xs[0], infos[0]


def batch_inputs(stacks, cfg: AnatomyConfig, localise_size: int, lv_map, estimate: bool = True):
    """Physical normalisation and localisation of many stacks [(images, spacing)], each model
    pass batched over all of them: ([x (S_i, n, n, 3)], [info]). lv_map(x) gives the LV
    probability maps of model inputs (one model's or an ensemble's).

    Pass 1 puts the whole image on a canvas of localise_size pixels at SPACING_MM and finds the
    heart in the LV map; pass 2 cuts the model's field of view around it (the image centre when
    the map holds too little LV: info["localised"] False). A stack without a usable in-plane spacing
    gets one estimated first (`resolve_spacing`), unless estimate=False."""
    from stackcls.preprocess import physical
    from stackcls.preprocess.spacing import resolve_spacing
    fulls, infos, resolved = [], [], []
    for images, spacing in stacks:
        spacing, how = resolve_spacing(images, spacing, lambda c: lv_map(with_context(c, cfg.context)),
                                       localise_size, estimate)
        full, _, info = physical.canvas(images, spacing, localise_size)
        fulls.append(with_context(full, cfg.context))
        infos.append({**info, **how})
        resolved.append((images, spacing))
    lv = lv_map(np.concatenate(fulls))
    cut = np.cumsum([0] + [len(f) for f in fulls])
    xs = []
    for k, (images, spacing) in enumerate(resolved):
        info = infos[k]
        centre = physical.heart_centre(lv[cut[k]:cut[k + 1]], info["spacing"], info["centre"])
        x, _, new = physical.canvas(images, spacing, cfg.canvas, centre)
        info = {**info, **new, "localised": centre is not None}
        xs.append(with_context(centre_crop(x, cfg.size), cfg.context))
        infos[k] = info
    return xs, infos
