"""Predict the OAP / IN / OBS labels of a stack: `predict_stack` (Python) and `stackcls predict`.

    from stackcls import load_model, predict_stack
    model = load_model(run_dir)
    pred = predict_stack(stack, model, mode="stack")     # or "slice", "slice_ordered"

`stack`: a `Stack`; a DICOM folder holding one stack; a list of the DICOM files of one stack in
any order (outputs then follow the list); a NIfTI file (outputs follow the file's slice index); or
an array (S, H, W) with orientation="apex_to_base" | "base_to_apex" | "unknown".
`model`: a run directory (loaded with `stackcls.checkpoint.load_model`) or a loaded model with
`.preprocess(images (S, H, W))`, `.slice_outputs(x) -> (penultimate (S, 256), probs (S, 3))` and
`.stack_head` (a `stackcls.stack_model.StackModel` or None).

Modes: "slice" is the paper's per-slice argmax; "slice_ordered" decodes the single-slice
log-probabilities with the order constraint (OAP..IN..OBS from apex to base, `decode.py`);
"stack" runs the bidirectional stack head over the slice features and decodes its scores the same
way. Probabilities are the per-slice probabilities of the mode's model (stack head or classifier);
labels are the decoded ones.

Orientation: both directions are scored (best ordered labelling; for "stack" the head is run on the
reversed stack too). Unknown orientation (`Stack.orientation_known=False`, an array given as
"unknown", or orientation="unknown"): the direction with the higher total evidence wins: the score
difference plus the direction model's log-odds (`stackcls.direction`, saved with the run). Known orientation (geometry, or
the caller): it is used, but if the reversed direction scores better by more than
`ORIENTATION_MARGIN` nats the prediction carries `orientation_warning` and a warning is issued
(wrong geometry, e.g. LPS coordinates stored as RAS, reverses apex and base).

After warm-up a stack is one jitted call (preprocessing on the host, then slice outputs, stack
head in both directions and both decodings in one compiled function per model, mode and S).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stackcls.decode import _decode_batch
from stackcls.stack import CLASSES, Stack
from stackcls.stack_model import PROB_FLOOR

MODES = ("stack", "slice", "slice_ordered")
ORIENTATIONS = ("apex_to_base", "base_to_apex", "unknown")
# Log-score margin (nats, summed over the stack) by which the reversed direction must beat a known
# orientation before we warn: e^3 ~ 20x more likely under the model. Below it, geometry is trusted.
ORIENTATION_MARGIN = 3.0
NIFTI_SUFFIXES = (".nii", ".nii.gz")
FIGURE_ROWS = 16           # stacks per figure page


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["probabilities"] = np.round(np.asarray(self.probabilities, float), 6).tolist()
        for k in ("in_range", "in_range_apex_to_base"):
            d[k] = None if d[k] is None else [int(v) for v in d[k]]
        d["orientation_scores"] = {k: float(v) for k, v in self.orientation_scores.items()}
        return d


# ----------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class _Work:
    """A stack in working order (putatively apex -> base) and how it maps to the caller's order."""
    images: np.ndarray          # (S, H, W) working order
    caller_index: np.ndarray    # (S,) caller index of each working slice
    sources: list[str]          # caller order
    known: bool                 # working order's apex->base direction is known
    source: str                 # "geometry" | "caller" | "data"
    subject: str | None = None
    phase: str | None = None
    slice_ids: list[int] | None = None   # caller order


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _one_stack(stacks: list[Stack], where: str) -> Stack:
    if not stacks:
        raise ValueError(f"{where}: no readable stack found")
    if len(stacks) > 1:
        desc = ", ".join(f"{s.key} ({s.meta.get('series_uid', s.meta.get('series', '?'))}, {s.n_slices} slices)"
                         for s in stacks)
        raise ValueError(f"{where}: holds {len(stacks)} stacks ({desc}); predict_stack takes one stack "
                         f"(pass phase=..., a single series, or use `stackcls predict` for many)")
    return stacks[0]


def _load(source, phase: str | None) -> list[Stack]:
    from stackcls.io import load_stacks
    if phase is not None:
        return load_stacks(source, phases=(phase,))
    return load_stacks(source)


def _from_stack(st: Stack, orientation: str | None, caller_index=None, sources=None) -> _Work:
    S = st.n_slices
    ci = np.arange(S) if caller_index is None else np.asarray(caller_index)
    srcs = list(st.sources) if sources is None else list(sources)
    ids = [None] * S
    for w in range(S):
        ids[ci[w]] = st.slice_ids[w]
    if orientation is None:
        known, how = bool(st.orientation_known), "geometry" if st.orientation_known else "data"
    elif orientation == "unknown":
        known, how = False, "data"
    elif orientation == "apex_to_base":
        known, how = True, "caller"
    else:
        raise ValueError(f"orientation={orientation!r} for a Stack / files: use None (the reader's), "
                         f"'apex_to_base' (trust the stack order) or 'unknown'")
    return _Work(st.images, ci, srcs, known, how, st.subject, st.phase, ids)


def _resolve_input(stack, orientation: str | None, phase: str | None) -> _Work:
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS} or None, got {orientation!r}")
    if isinstance(stack, Stack):
        w = _from_stack(stack, orientation)
    elif isinstance(stack, (str, os.PathLike)):
        p = Path(stack)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        st = _one_stack(_load(p, phase), str(p))
        if _is_nifti(p):   # caller order = slice index in the file
            order = np.argsort(np.argsort(np.asarray(st.slice_ids)))
            srcs = [None] * st.n_slices
            for wi, c in enumerate(order):
                srcs[c] = st.sources[wi]
            w = _from_stack(st, orientation, order, srcs)
        else:
            w = _from_stack(st, orientation)
    elif isinstance(stack, (list, tuple)):
        if len(stack) == 0:
            raise ValueError("predict_stack: empty list of DICOM files")
        if not all(isinstance(s, (str, os.PathLike)) for s in stack):
            raise TypeError("predict_stack: a list must hold DICOM file paths")
        paths = [Path(s) for s in stack]
        st = _one_stack(_load(paths, phase), f"list of {len(paths)} DICOM files")
        pos = {os.path.realpath(p): i for i, p in enumerate(paths)}
        try:
            order = [pos[os.path.realpath(s)] for s in st.sources]
        except KeyError as e:
            raise ValueError(f"predict_stack: the reader returned slice {e} which is not in the list") from None
        if len(order) != len(paths):
            used = set(order)
            left = [str(paths[i]) for i in range(len(paths)) if i not in used]
            raise ValueError(f"predict_stack: {len(left)} of the {len(paths)} files are not slices of the "
                             f"stack read (other phase or not an image?): {left[:5]}")
        w = _from_stack(st, orientation, np.asarray(order), [str(p) for p in paths])
    else:
        arr = np.asarray(stack, np.float32)
        if arr.ndim != 3:
            raise ValueError(f"predict_stack: an array stack must be (S, H, W), got shape {arr.shape}")
        if orientation is None:
            raise ValueError("predict_stack: an array needs orientation='apex_to_base', 'base_to_apex' or 'unknown'")
        S = arr.shape[0]
        if orientation == "base_to_apex":
            w = _Work(arr[::-1], np.arange(S)[::-1].copy(), [str(i) for i in range(S)], True, "caller")
        else:
            w = _Work(arr, np.arange(S), [str(i) for i in range(S)], orientation == "apex_to_base",
                      "caller" if orientation == "apex_to_base" else "data")
        w.slice_ids = list(range(S))
    if w.images.shape[0] < 2:
        raise ValueError(f"predict_stack: {w.subject or 'stack'} has {w.images.shape[0]} slice(s); a stack "
                         f"needs at least 2 (boundaries and orientation are undefined for one slice)")
    return w


# ----------------------------------------------------------------------------- model and jitted core

def _as_model(model):
    if isinstance(model, (str, os.PathLike)):
        from stackcls.checkpoint import load_model
        return load_model(model)
    for attr in ("preprocess", "slice_outputs"):
        if not hasattr(model, attr):
            raise TypeError(f"predict_stack: model must be a run directory or have .preprocess and "
                            f".slice_outputs (missing .{attr}); got {type(model).__name__}")
    return model


def _core(model, mode: str):
    """fn(x) -> (probs_fwd (S,3), probs_rev (S,3) in working order, labels_fwd, labels_rev, score_f, score_r)."""
    head = getattr(model, "stack_head", None) if mode == "stack" else None
    direction = getattr(model, "direction", None)

    def fn(x):
        pen, probs = model.slice_outputs(x)
        lp = jnp.log(jnp.clip(jnp.asarray(probs, jnp.float32), PROB_FLOOR, 1.0))   # as slice_features
        S = lp.shape[0]
        n = jnp.array([S], jnp.int32)
        feats = jnp.concatenate([jnp.asarray(pen, jnp.float32), lp], axis=1)
        if head is not None:
            lp_f = head.log_probs_padded(feats[None], n)[0]
            lp_r = head.log_probs_padded(feats[None, ::-1], n)[0][::-1]   # back in working order
        else:
            lp_f = lp_r = lp
        both = jnp.stack([lp_f, lp_r[::-1]])                           # decode each along its own direction
        labels, _, _, score = _decode_batch(both, jnp.array([S, S], jnp.int32))
        dir_logit = direction.logit(feats) if direction is not None else jnp.float32(0.0)
        return (jnp.exp(lp_f), jnp.exp(lp_r), labels[0], labels[1][::-1], score[0], score[1],
                dir_logit)

    return fn


_CACHE: dict = {}


def _compiled(model, mode: str):
    """The per-model, per-mode runner: x -> outputs of `_core`, one compiled call per input shape.

    The function is traced once per shape with `make_jaxpr`, and the arrays it closes over (the
    model's weights) become arguments of the jitted evaluation instead of constants baked into the
    program (a closed-over VGG16 would otherwise be copied into the HLO and slow compilation)."""
    key = (id(model), mode)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    fn = _core(model, mode)
    per_shape: dict = {}

    def run(x):
        x = jnp.asarray(x)
        k = (x.shape, str(x.dtype))
        if k not in per_shape:
            try:
                closed, shapes = jax.make_jaxpr(fn, return_shape=True)(x)
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                    jax.errors.TracerBoolConversionError):
                per_shape[k] = None             # slice_outputs is not traceable: run it eagerly
            else:
                jaxpr, tree = closed.jaxpr, jax.tree.structure(shapes)
                jitted = jax.jit(lambda consts, x: jax.tree.unflatten(tree, jax.core.eval_jaxpr(jaxpr, consts, x)))
                per_shape[k] = (jitted, closed.consts)
        entry = per_shape[k]
        if entry is None:
            return fn(x)
        return entry[0](entry[1], x)

    run.per_shape = per_shape
    while len(_CACHE) >= 8:                     # keep a few models' executables, not all ever seen
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (model, run)
    return run


# ----------------------------------------------------------------------------- predict_stack

def predict_stack(stack, model, mode: str = "stack", orientation: str | None = None,
                  phase: str | None = None) -> Prediction:
    """Labels, probabilities and IN range of one stack (see the module docstring).

    orientation: for arrays, required ("apex_to_base" | "base_to_apex" | "unknown"); for Stacks and
    files, None uses the reader's geometry (`orientation_known`), "unknown" decides from the data,
    "apex_to_base" trusts the stack order. phase: for DICOM/NIfTI inputs holding a cine, which phase
    ("ED", "ES" or an index), passed to `stackcls.io.load_stacks`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = _as_model(model)
    if mode == "stack" and getattr(model, "stack_head", None) is None:
        raise ValueError("predict_stack: this model has no stack head (trained without one); "
                         "use mode='slice_ordered' or 'slice'")
    w = _resolve_input(stack, orientation, phase)
    x = model.preprocess(w.images)
    out = _compiled(model, mode)(x)
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
        # score difference and the direction model's (stackcls.direction)
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
    in_caller = [int(caller[wi]) for wi in range(S) if lab_w[wi] == 1]
    ranks = [r for r, wi in enumerate(apex_first) if lab_w[wi] == 1]
    return Prediction(
        labels=labels, probabilities=probs,
        in_range=(min(in_caller), max(in_caller)) if in_caller else None,
        sources=list(w.sources), apex_to_base=[int(caller[wi]) for wi in apex_first], mode=mode,
        orientation="reversed" if use_rev else "as_given", orientation_source=w.source,
        orientation_scores={"as_given": s_f, "reversed": s_r, "direction_logit": dir_logit},
        orientation_warning=warning,
        in_range_apex_to_base=(ranks[0], ranks[-1]) if ranks else None,
        subject=w.subject, phase=w.phase, slice_ids=w.slice_ids)


# ----------------------------------------------------------------------------- CLI

def _short(source: str) -> str:
    return Path(source).name if os.sep in source else source


def _summary(pred: Prediction) -> str:
    head = f"{pred.subject or '?'}/{pred.phase or '?'}: {len(pred.labels)} slices, mode {pred.mode}, "
    head += f"orientation {pred.orientation} ({pred.orientation_source})"
    if pred.in_range_apex_to_base is None:
        rng = "IN range: none"
    else:
        a, b = pred.in_range_apex_to_base
        rng = f"IN range: apex->base ranks {a}..{b} ({b - a + 1} slices)"
    lines = [head, "  " + rng]
    if pred.orientation_warning:
        lines.append("  WARNING: " + pred.orientation_warning)
    lines.append(f"  {'rank':>4} {'slice':>5}  {'label':<4} {'OAP':>5} {'IN':>5} {'OBS':>5}  source")
    for r, c in enumerate(pred.apex_to_base):
        p = pred.probabilities[c]
        lines.append(f"  {r:>4} {pred.slice_ids[c] if pred.slice_ids else c:>5}  {pred.labels[c]:<4} "
                     f"{p[0]:5.2f} {p[1]:5.2f} {p[2]:5.2f}  {_short(pred.sources[c])}")
    return "\n".join(lines)


def figure(preds: Sequence[Prediction], images: Sequence[np.ndarray], path) -> Path:
    """Each stack a row (apex -> base): thumbnail, label, and OAP/IN/OBS probability bars."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncol = max(len(p.labels) for p in preds)
    fig = plt.figure(figsize=(1.3 * ncol, 2.7 * len(preds)), dpi=80)
    gs = fig.add_gridspec(2 * len(preds), ncol, height_ratios=[3, 1.2] * len(preds), hspace=0.7, wspace=0.08)
    colors = ("tab:orange", "tab:green", "tab:blue")
    for row, (pred, imgs) in enumerate(zip(preds, images)):
        for r, c in enumerate(pred.apex_to_base):
            ax = fig.add_subplot(gs[2 * row, r])
            im = imgs[c]
            lo, hi = np.percentile(im, (2, 98))
            ax.imshow(np.clip((im - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
            ax.set_xticks([]); ax.set_yticks([])
            ax.set_title(f"{pred.labels[c]}", fontsize=8, color=colors[CLASSES.index(pred.labels[c])])
            if r == 0:
                rng = pred.in_range_apex_to_base
                ax.set_ylabel(f"{pred.subject}/{pred.phase}\nIN {'none' if rng is None else f'{rng[0]}..{rng[1]}'}"
                              f"\napex", fontsize=7)
            bx = fig.add_subplot(gs[2 * row + 1, r])
            bx.bar(range(3), pred.probabilities[c], color=colors)
            bx.set_ylim(0, 1); bx.set_xticks(range(3)); bx.set_xticklabels(CLASSES, fontsize=5)
            bx.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def predict_command(path, model, json_out=None, figure_out=None, mode: str = "stack") -> int:
    """`stackcls predict PATH --model RUN_DIR [--json OUT] [--figure OUT.png] [--mode ...]`."""
    from stackcls.io import scan
    path = Path(path)
    if not path.exists():
        print(f"error: {path}: no such file or folder", file=sys.stderr)
        return 2
    try:
        m = _as_model(model)
    except Exception as e:  # noqa: BLE001 - report any loading failure as a message, not a trace
        print(f"error: cannot load model {model}: {e}", file=sys.stderr)
        return 2
    if mode not in MODES:
        print(f"error: mode must be one of {MODES}, got {mode!r}", file=sys.stderr)
        return 2
    if mode == "stack" and getattr(m, "stack_head", None) is None:
        print(f"error: model {model} has no stack head (trained without one); use --mode slice_ordered",
              file=sys.stderr)
        return 2
    res = scan(path)
    for p, why in res.skipped:
        print(f"skipped {p}: {why}", file=sys.stderr)
    if not res.stacks:
        print(f"error: {path}: no stack found", file=sys.stderr)
        return 1
    preds, imgs, failed = [], [], []
    for st in res.stacks:
        try:
            pred = predict_stack(st, m, mode=mode)
        except ValueError as e:
            print(f"skipped {st.key}: {e}", file=sys.stderr)
            failed.append(dict(stack=st.key, reason=str(e)))
            continue
        print(_summary(pred))
        preds.append(pred)
        imgs.append(st.images)
    if json_out is not None:
        blob = dict(model=str(model), mode=mode, stacks=[p.to_dict() for p in preds],
                    skipped=[dict(path=str(p), reason=str(r)) for p, r in res.skipped] + failed)
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(json.dumps(blob, indent=1))
        tmp.replace(json_out)
        print(f"wrote {json_out}")
    if figure_out is not None and preds:
        # one row per stack; large trees are split into pages OUT.png, OUT-2.png, ...
        figure_out = Path(figure_out)
        for k in range(0, len(preds), FIGURE_ROWS):
            page = figure_out if k == 0 else figure_out.with_name(
                f"{figure_out.stem}-{k // FIGURE_ROWS + 1}{figure_out.suffix or '.png'}")
            print(f"wrote {figure(preds[k:k + FIGURE_ROWS], imgs[k:k + FIGURE_ROWS], page)}")
    return 0 if preds else 1
