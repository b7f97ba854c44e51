"""Predict the OAP / IN / OBS labels of a stack: `predict_stack`.

    from stackcls import load_model, predict_stack
    model = load_model(run_dir)
    pred = predict_stack(stack, model, mode="stack")     # or "slice", "slice_ordered"
    pred = predict_stack(stack)                           # the model the package ships

`stack`: any input `stackcls.io.inputs.resolve_stack_input` takes: a `Stack`; a DICOM folder
holding one stack; a list of the DICOM files of one stack in any order (outputs then follow the
list); a NIfTI file (outputs follow the file's slice index); or an array (S, H, W) with
orientation="apex_to_base" | "base_to_apex" | "unknown".
`model`: None (the shipped model, `stackcls.pretrained`), a run directory (loaded with
`stackcls.predict.load.load_model`) or a loaded model with
`.preprocess(images (S, H, W), spacing=(row, col, slice) mm or None)`, `.slice_outputs(x) -> (penultimate (S, 256), probs (S, 3))`,
`.stack_head` (a `stackcls.models.stack_head.StackModel` or None) and optionally `.direction` (a
`stackcls.models.direction.DirectionModel`).

Modes: "slice" is the paper's per-slice argmax; "slice_ordered" decodes the single-slice
log-probabilities with the order constraint (OAP..IN..OBS from apex to base, `decode.py`);
"stack" runs the bidirectional stack head over the slice features and decodes its scores the same
way. Probabilities are the per-slice probabilities of the mode's model (stack head or classifier);
labels are the decoded ones.

Orientation: both directions are scored (best ordered labelling; for "stack" the head is run on the
reversed stack too). Unknown orientation (`Stack.orientation_known=False`, an array given as
"unknown", or orientation="unknown"): the direction with the higher total evidence wins: the score
difference plus the direction model's log-odds (`stackcls.models.direction`, saved with the run). Known
orientation (geometry, or the caller): it is used, but if the reversed direction scores better by
more than `ORIENTATION_MARGIN` nats the prediction carries `orientation_warning` and a warning is
issued (wrong geometry, e.g. LPS coordinates stored as RAS, reverses apex and base).

After warm-up a stack is one jitted call (preprocessing on the host, then slice outputs, stack
head in both directions and both decodings in one compiled function per model, mode and S).
The terminal summary and `stackcls predict` are in `cli.py`, the figure in `figures.py`.

How sure: the labels come with the exact distribution over IN ranges under the order constraint
(`stackcls.decode.boundaries`), formed from the mode's per-slice scores divided by the model's fitted
temperature (`stackcls.train.calibration`, 1 without one): `range_probability` (P(the returned IN range
is exactly right)), `alternatives` (the next three ranges), `boundary_probabilities` (each
candidate first and last IN slice), `coverage` (whether an end slice of the stack is probably IN
already, so the stack may stop short of the apex or the base) and `level` (apical / mid / basal
thirds of the IN range). For mode "slice" the labels need not be ordered; the probability is still
that of its (first, last) IN span under the ordered model.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from stackcls.cache import compile_cache
from stackcls.decode.boundaries import distribution, levels
from stackcls.predict.load import load_model
from stackcls.decode.ordered import decode_batch, in_range
from stackcls.io.inputs import resolve_stack_input
from stackcls.stack import CLASSES
from stackcls.models.stack_head import PROB_FLOOR, reverse_within_length

MODES = ("stack", "slice", "slice_ordered")
ALTERNATIVES = 3           # ranges listed after the returned one
# Log-score margin (nats, summed over the stack) by which the reversed direction must beat a known
# orientation before we warn: e^3 ~ 20x more likely under the model. Below it, geometry is trusted.
ORIENTATION_MARGIN = 3.0


class OrientationWarning(UserWarning):
    """The data score the reversed slice order clearly better than the stated one."""


@dataclasses.dataclass
class Prediction:
    """Per-slice labels of one stack. Per-slice fields follow the caller's order."""

    labels: list[str]
    probabilities: np.ndarray            # (S, 3): OAP, IN, OBS
    in_range: tuple[int, int] | None     # (min, max) caller indices of the IN slices, or None
    sources: list[str]                   # per-slice ids (file paths, NIfTI slice index, array index)
    apex_to_base: list[int]              # caller indices from apex to base, as used
    mode: str
    orientation: str                     # "as_given" (working order used) or "reversed"
    orientation_source: str              # "geometry" | "caller" | "data"
    orientation_scores: dict             # best ordered log-scores {"as_given", "reversed"} and the
                                         # direction model's "direction_logit" (0 without one)
    orientation_warning: str | None = None
    in_range_apex_to_base: tuple[int, int] | None = None   # (first, last) IN ranks along apex->base
    subject: str | None = None
    phase: str | None = None
    slice_ids: list[int] | None = None
    # how sure (see the module docstring); ranks count apex -> base (apex_to_base[r] is the caller
    # index of rank r)
    range_probability: float | None = None   # P(the IN range is exactly in_range_apex_to_base)
    alternatives: list = dataclasses.field(default_factory=list)   # [{in_range_apex_to_base,
                                             # in_range, probability}], most probable first
    boundary_probabilities: dict | None = None   # first_in / last_in: P per rank; no_in: P(no IN)
    coverage: dict | None = None             # status, apex_end_in, base_end_in, threshold
    level: list | None = None                # per slice (caller order): apical | mid | basal | None
    temperature: float = 1.0                 # of the range distribution (1: not calibrated)
    spacing: dict | None = None              # mm: the in-plane (row, col) spacing used; source:
                                             # "given" (file or caller), "estimated" from the
                                             # images (with the estimate), "assumed", "not used"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["probabilities"] = np.round(np.asarray(self.probabilities, float), 6).tolist()
        for k in ("in_range", "in_range_apex_to_base"):
            d[k] = None if d[k] is None else [int(v) for v in d[k]]
        d["orientation_scores"] = {k: float(v) for k, v in self.orientation_scores.items()}
        return d


# ----------------------------------------------------------------------------- model and jitted core

def as_model(model=None):
    """None -> the shipped model; a run directory -> its loaded model; a loaded model is checked
    and returned as is."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    for attr in ("preprocess", "slice_outputs"):
        if not hasattr(model, attr):
            raise TypeError(f"predict_stack: model must be a run directory or have .preprocess and "
                            f".slice_outputs (missing .{attr}); got {type(model).__name__}")
    return model


PAD_TO = 4          # stack lengths are padded to a multiple of this: 6-24 slices, 5 programs
PER_SLICE = 4       # _core's first outputs are per slice (cut back to the stack's length)


def padded_length(S: int) -> int:
    """The length a stack of S slices is padded to inside the compiled core. Fine steps, not
    decode.bucket's 16: with the paper's classifier the core runs the CNN on every padded slice."""
    return max(PAD_TO, -(-S // PAD_TO) * PAD_TO)


def _core(model, mode: str):
    """fn(x, n) -> (probs_fwd (L, 3), probs_rev (L, 3), labels_fwd, labels_rev, all in working
    order; score_f, score_r: the best ordered log-scores of each direction; the direction model's
    logit for the working order running apex -> base, 0 without a direction model). x holds the
    stack's n slices and padding after them to L = padded_length(n): every step reads the first
    n alone (the GRU, the reversals and the decoding take the length; the slices are
    independent), so the result equals the unpadded stack's."""
    head = getattr(model, "stack_head", None) if mode == "stack" else None
    direction = getattr(model, "direction", None)

    def fn(x, n):
        pen, probs = model.slice_outputs(x)
        lp = jnp.log(jnp.clip(jnp.asarray(probs, jnp.float32), PROB_FLOOR, 1.0))   # as slice_features
        n1 = jnp.reshape(n, (1,)).astype(jnp.int32)
        feats = jnp.concatenate([jnp.asarray(pen, jnp.float32), lp], axis=1)
        if head is not None:
            lp_f = head.log_probs_padded(feats[None], n1)[0]
            rev = head.log_probs_padded(reverse_within_length(feats[None], n1), n1)
            lp_r = reverse_within_length(rev, n1)[0]                    # back in working order
        else:
            lp_f = lp_r = lp
        # decode each along its own direction
        both = jnp.concatenate([lp_f[None], reverse_within_length(lp_r[None], n1)])
        labels, _, _, score = decode_batch(both, jnp.concatenate([n1, n1]))
        dir_logit = direction.logit(feats, n1[0]) if direction is not None else jnp.float32(0.0)
        return (jnp.exp(lp_f), jnp.exp(lp_r), labels[0],
                reverse_within_length(labels[1:2], n1)[0], score[0], score[1], dir_logit)

    return fn


_CACHE: dict = {}


def _compiled(model, mode: str, batched: bool = False, grey: bool = False):
    """The per-model, per-mode runner: x -> outputs of `_core`, one compiled call per input shape.
    batched: x holds K stacks of one length (K, S, ...) and every output gains a leading K
    (`stackcls.predict.archive` runs many stacks in one device call). grey: x holds the one channel of
    `preprocess.grey_model_input` (..., S, size, size), copied into RGB inside the call.

    The function is traced once per shape with `make_jaxpr`, and the arrays it closes over (the
    model's weights) become arguments of the jitted evaluation instead of constants baked into the
    program (a closed-over VGG16 would otherwise be copied into the HLO and slow compilation)."""
    key = (id(model), mode, batched, grey)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    core = rgb = _core(model, mode)
    if grey:
        def core(x, n):
            return rgb(jnp.broadcast_to(x[..., None], x.shape + (3,)), n)
    fn = jax.vmap(core, in_axes=(0, None)) if batched else core
    axis = 1 if batched else 0                  # the slice axis
    per_shape: dict = {}

    def run(x):
        x = np.asarray(x)
        S = x.shape[axis]
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, padded_length(S) - S)
        # host-side padding, trimming and device_put: eager jnp ops here would each be one more
        # small program for every stack length
        xp = jax.device_put(np.pad(x, widths))
        n = np.int32(S)
        k = (xp.shape, str(xp.dtype))
        if k not in per_shape:
            try:
                closed, shapes = jax.make_jaxpr(fn, return_shape=True)(xp, n)
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                    jax.errors.TracerBoolConversionError):
                per_shape[k] = None             # slice_outputs is not traceable: run it eagerly
            else:
                jaxpr, tree = closed.jaxpr, jax.tree.structure(shapes)
                jitted = jax.jit(lambda consts, x, n: jax.tree.unflatten(
                    tree, jax.core.eval_jaxpr(jaxpr, consts, x, n)))
                per_shape[k] = (jitted, closed.consts)
        entry = per_shape[k]
        out = fn(xp, n) if entry is None else entry[0](entry[1], xp, n)
        cut = (slice(None),) * axis + (slice(0, S),)
        return tuple(np.asarray(o)[cut] if i < PER_SLICE else np.asarray(o) for i, o in enumerate(out))

    run.per_shape = per_shape
    while len(_CACHE) >= 8:                     # keep a few models' executables, not all ever seen
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (model, run)
    return run


# ----------------------------------------------------------------------------- predict_stack

def resolve_mode(model, mode: str | None = None) -> str:
    """The mode to predict in: the caller's; else the model's default, the one its
    cross-validation chose (`train.selection.default_mode`, kept in its card or manifest: the
    shipped model's is slice_ordered); else stack when it has a stack head, slice_ordered when not."""
    head = getattr(model, "stack_head", None) is not None
    if mode is None:
        mode = getattr(model, "default_mode", None) or ("stack" if head else "slice_ordered")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "stack" and not head:
        raise ValueError("this model has no stack head (trained without one); use mode "
                         "'slice_ordered' or 'slice'")
    return mode


def predict_stack(stack, model=None, mode: str | None = None, orientation: str | None = None,
                  phase: str | None = None, spacing=None) -> Prediction:
    """Labels, probabilities and IN range of one stack (see the module docstring).

    mode: "stack" | "slice_ordered" | "slice"; None: the model's default (`resolve_mode`).

    orientation: for arrays, required ("apex_to_base" | "base_to_apex" | "unknown"); for Stacks and
    files, None uses the reader's geometry (`orientation_known`), "unknown" decides from the data,
    "apex_to_base" trusts the stack order. phase: for DICOM/NIfTI inputs holding a cine, which phase
    ("ED", "ES" or an index), passed to `stackcls.io.load_stacks`.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    compile_cache()     # before the model loads: its programs are cached too (decided once)
    model = as_model(model)
    mode = resolve_mode(model, mode)
    w = resolve_stack_input(stack, orientation, phase)
    if spacing is not None:
        w.spacing = tuple(float(v) for v in spacing)
    x = _preprocess(model, w.images, w.spacing)
    w.spacing_used = spacing_used(model, w.spacing)
    return finish(w, _compiled(model, mode)(x), mode, model)


def spacing_used(model, spacing) -> dict:
    """What the prediction says of the in-plane spacing: the anatomy model's record of the stack
    it just preprocessed (`last_preprocess`: read right after `preprocess`), else the file's; the
    paper's classifier crops a fixed fraction of the pixels and uses none."""
    info = getattr(model, "last_preprocess", None)
    if info is not None and "spacing" in info:
        out = dict(mm=[float(v) for v in info["spacing"]],
                   source=info.get("spacing_source", "given"))
        if info.get("spacing_estimate"):
            out["estimate"] = info["spacing_estimate"]
        return out
    known = spacing is not None and np.all(np.isfinite(np.asarray(spacing[:2], float)))
    return dict(mm=[float(v) for v in spacing[:2]] if known else None, source="not used")


def _preprocess(model, images, spacing):
    """model.preprocess with the stack's spacing when it takes one (models that resample to a
    physical scale need it; a model written before spacing existed still works)."""
    try:
        takes = "spacing" in inspect.signature(model.preprocess).parameters
    except (TypeError, ValueError):
        takes = False
    return model.preprocess(images, spacing=spacing) if takes else model.preprocess(images)


def finish(w, out, mode: str, model) -> Prediction:
    """The Prediction of stack input `w` (io.inputs.StackInput) from `_core`'s outputs `out`."""
    p_f, p_r, lab_f, lab_r, s_f, s_r, dir_logit = (np.asarray(v) for v in out)
    s_f, s_r, dir_logit = float(s_f), float(s_r), float(dir_logit)
    S = w.images.shape[0]

    warning = None
    if w.known:
        use_rev = False
        if s_r - s_f > ORIENTATION_MARGIN:
            warning = (f"{w.subject or 'stack'}{'/' + w.phase if w.phase else ''}: the reversed slice order "
                       f"scores {s_r - s_f:.1f} nats better than the stated apex->base order "
                       f"({w.source}); the geometry may be wrong (e.g. LPS stored as RAS). Kept the stated order.")
            warnings.warn(warning, OrientationWarning, stacklevel=2)
    else:
        # two log-odds for "the working order runs apex -> base", summed: the ordered decoding's
        # score difference and the direction model's (stackcls.models.direction)
        use_rev = (s_f - s_r) + dir_logit < 0
    probs_w = p_r if use_rev else p_f
    if mode == "slice":
        lab_w = probs_w.argmax(1)
    else:
        lab_w = lab_r if use_rev else lab_f
    apex_first = np.arange(S)[::-1] if use_rev else np.arange(S)     # working indices, apex -> base
    caller = w.caller_index
    labels = [None] * S
    probs = np.zeros((S, 3), np.float32)
    for wi in range(S):
        labels[caller[wi]] = CLASSES[int(lab_w[wi])]
        probs[caller[wi]] = probs_w[wi]
    rank_to_caller = [int(caller[wi]) for wi in apex_first]
    rng = in_range(lab_w[apex_first])
    return Prediction(
        labels=labels, probabilities=probs, in_range=in_range(labels),
        sources=list(w.sources), apex_to_base=rank_to_caller, mode=mode,
        orientation="reversed" if use_rev else "as_given", orientation_source=w.source,
        orientation_scores={"as_given": s_f, "reversed": s_r, "direction_logit": dir_logit},
        orientation_warning=warning, in_range_apex_to_base=rng,
        subject=w.subject, phase=w.phase, slice_ids=w.slice_ids, spacing=w.spacing_used,
        **how_sure(probs_w[apex_first], rng, rank_to_caller, labels, mode, model))


def how_sure(probs, rng, rank_to_caller, labels, mode: str, model) -> dict:
    """The range fields of a Prediction from the mode's per-slice probabilities (S, 3) apex ->
    base and the returned IN range `rng` (ranks)."""
    # the log-scores the decoder used: the classifier's are clipped at PROB_FLOOR (as
    # slice_features), the head's are its log-softmax, recovered to float32 precision
    floor = np.finfo(np.float32).tiny if mode == "stack" else PROB_FLOOR
    calibration = getattr(model, "calibration", None)
    t = calibration.temperature(mode) if calibration is not None else 1.0
    d = distribution(np.log(np.clip(np.asarray(probs, np.float64), floor, 1.0)), t)

    def as_range(r):
        if r is None:
            return dict(in_range_apex_to_base=None, in_range=None)
        span = [rank_to_caller[k] for k in range(r[0], r[1] + 1)]
        return dict(in_range_apex_to_base=[int(r[0]), int(r[1])], in_range=[min(span), max(span)])

    alternatives = [dict(as_range(r), probability=round(p, 6)) for r, p in d.ranges()
                    if r != rng][:ALTERNATIVES]
    level = [None] * len(labels)
    for k, lv in enumerate(levels(rng, len(labels))):
        if lv is not None and labels[rank_to_caller[k]] == "IN":
            level[rank_to_caller[k]] = lv
    return dict(range_probability=round(d.probability(rng), 6), alternatives=alternatives,
                boundary_probabilities=dict(first_in=np.round(d.first, 6).tolist(),
                                            last_in=np.round(d.last, 6).tolist(),
                                            no_in=round(d.none, 6)),
                coverage=d.coverage(), level=level, temperature=float(t))
