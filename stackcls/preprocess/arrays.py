"""Stacks -> arrays a model can learn from (Ho & Kim 2021, "Image preprocessing and augmentation").

Per slice: a 2-98 percentile intensity window to [0, 1], a centre crop keeping the central 60 % of
each axis (the paper's "outer 40 % cropped", a fixed 0.6 zoom about the centre), a bilinear resize
to the backbone's input size (antialiased when shrinking), and grey copied into 3 channels on the
0..255 scale every Keras `preprocess_input` expects. Plus the patient-level splits and the class
oversampling of the training protocol. Everything here is host-side numpy: it runs once per dataset.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from stackcls.progress import bar as tqdm
from stackcls.stack import CLASS_INDEX, Stack


def _as_slices(images, name: str) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected images of shape (S, H, W) or (H, W), got {a.shape}")
    return a


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize: size must be positive, got {size!r}")
    return h, w


def _window_params(x: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (offset, scale) of the percentile window of x (S, H, W)."""
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"window: need 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    if not np.all(np.isfinite(x)):
        raise ValueError("window: images contain NaN or infinite values")
    flat = x.reshape(x.shape[0], -1)
    p_lo, p_hi = np.percentile(flat, [lo, hi], axis=1)
    # Degenerate window: fall back to the full range, so a sparse bright structure survives.
    bad = p_hi <= p_lo
    if bad.any():
        p_lo = np.where(bad, flat.min(axis=1), p_lo)
        p_hi = np.where(bad, flat.max(axis=1), p_hi)
    span = p_hi - p_lo
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)  # constant slice -> 0
    return p_lo.astype(np.float32), scale.astype(np.float32)


def _apply_window(x: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out = x - offset[:, None, None]
    out *= scale[:, None, None]
    return np.clip(out, 0.0, 1.0, out=out)


def window(images, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
    """Map each slice's [lo, hi] percentile range linearly to [0, 1], clipping outside it.

    images: (S, H, W) or (H, W). Returns float32 of the same shape. A slice whose percentiles
    coincide (e.g. mostly background) falls back to its min..max range; a constant slice gives
    zeros. Non-finite pixels are an error (they would poison the percentiles silently).
    """
    a = np.asarray(images, dtype=np.float32)
    x = _as_slices(a, "window")
    return _apply_window(x, *_window_params(x, lo, hi)).reshape(a.shape)


def center_crop(images, keep: float = 0.6) -> np.ndarray:
    """Keep the central `keep` fraction of each image axis (keep=1.0: no crop).

    images: (..., H, W). The kept size is round(keep * H) x round(keep * W) (at least 1 pixel),
    placed symmetrically; with an odd leftover the extra row/column is dropped at the far end.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"center_crop: keep must be in (0, 1], got {keep}")
    a = np.asarray(images)
    if a.ndim < 2:
        raise ValueError(f"center_crop: expected (..., H, W), got shape {a.shape}")
    if keep == 1.0:
        return a
    H, W = a.shape[-2:]
    h, w = max(1, int(round(keep * H))), max(1, int(round(keep * W)))
    r0, c0 = (H - h) // 2, (W - w) // 2
    return a[..., r0:r0 + h, c0:c0 + w]


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights with half-pixel centres; the triangle kernel is
    widened by the scale factor when shrinking (antialiasing). Same definition as
    `jax.image.resize(method="linear", antialias=True)`, which the tests compare against."""
    inv = n_in / n_out
    support = max(inv, 1.0)
    sample = (np.arange(n_out, dtype=np.float64) + 0.5) * inv - 0.5
    d = np.abs(sample[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / support
    w = np.maximum(0.0, 1.0 - d)
    return w / w.sum(axis=1, keepdims=True)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero band of `_linear_weights` as (taps, n_out) input indices and weights: a few
    taps per output pixel instead of a dense matrix."""
    w = _linear_weights(n_in, n_out)
    nz = w > 0
    start = nz.argmax(axis=1)
    k = np.arange(nz.sum(axis=1).max())[:, None]
    idx = start[None, :] + k
    valid = idx < n_in
    idx = np.minimum(idx, n_in - 1)
    wt = np.where(valid, np.take_along_axis(w.T, idx, axis=0), 0.0)
    return idx, wt.astype(np.float32)


def resize(images, size) -> np.ndarray:
    """Bilinear resize of (S, H, W) or (H, W) images to `size` (int or (h, w)); float32 out.

    Separable: a matmul along columns, then a few weighted row gathers (only the input rows under
    the kernel), so a few hundred slices take well under a second. Antialiased when shrinking (the kernel widens with the
    scale factor), as `jax.image.resize(method="linear", antialias=True)`.
    """
    a = np.asarray(images, dtype=np.float32)
    x = _as_slices(a, "resize")
    h, w = _size_hw(size)
    H, W = x.shape[1:]
    if (H, W) == (h, w):
        return a.copy()
    out = x
    if W != w:  # along rows in memory: one BLAS matmul beats a strided gather
        out = (x.reshape(-1, W) @ _linear_weights(W, w).T.astype(np.float32)).reshape(len(x), H, w)
    if H != h:  # whole rows gathered per tap
        idx, wt = _taps(H, h)
        out = sum(out[:, i, :] * t[:, None] for i, t in zip(idx, wt))
    out = np.asarray(out, dtype=np.float32)
    return out if a.ndim == 3 else out[0]


def to_model_input(images, size, keep: float = 0.6) -> np.ndarray:
    """(S, H, W) raw slices -> (S, size, size, 3) float32 in 0..255, the input every backbone's
    `preprocess_input` expects: window (on the whole slice), centre crop, resize, grey to RGB."""
    g = grey_model_input(images, size, keep)
    return np.broadcast_to(g[..., None], g.shape + (3,)).copy()


def grey_model_input(images, size, keep: float = 0.6) -> np.ndarray:
    """`to_model_input`'s one grey channel, (S, size, size) float32 in 0..255: a third of the
    bytes, for callers that copy it to RGB where it is used (`stackcls.predict.archive`, on the device)."""
    x = _as_slices(np.asarray(images, dtype=np.float32), "to_model_input")
    h, w = _size_hw(size)
    out = np.empty((len(x), h, w), np.float32)
    for i in range(0, len(x), 16):  # chunks small enough to stay in cache
        c = x[i:i + 16]
        params = _window_params(c, 2.0, 98.0)  # percentiles of the whole slice, as exported images
        r = resize(_apply_window(center_crop(c, keep).copy(), *params), (h, w))
        r *= np.float32(255.0)
        out[i:i + 16] = np.clip(r, 0.0, 255.0, out=r)
    return out


def stack_arrays(stacks: Sequence[Stack], size, keep: float = 0.6, progress: bool = True) -> dict:
    """All slices of `stacks` as one array set, in stack order then apex -> base.

    Returns dict(x (N, size, size, 3) float32 0..255, y (N,) int32 class index or -1 for an
    unlabelled stack, stack_index (N,) int32 position in `stacks`, slice_index (N,) int32 position
    within its stack (0 = most apical), subject (N,) str).
    """
    if len(stacks) == 0:
        raise ValueError("stack_arrays: no stacks given")

    xs, ys, si, sl, subj = [], [], [], [], []
    it = tqdm(stacks, desc="preprocess", unit="stack", disable=not progress or len(stacks) < 20)
    for i, st in enumerate(it):
        n = st.n_slices
        xs.append(to_model_input(st.images, size, keep))
        ys.append(st.label_indices() if st.labels is not None else np.full(n, -1, np.int32))
        si.append(np.full(n, i, np.int32))
        sl.append(np.arange(n, dtype=np.int32))
        subj.extend([st.subject] * n)
    return dict(x=np.concatenate(xs), y=np.concatenate(ys).astype(np.int32),
                stack_index=np.concatenate(si), slice_index=np.concatenate(sl),
                subject=np.array(subj, dtype=str))


def _subject_groups(subjects) -> tuple[np.ndarray, np.ndarray]:
    """Unique subject ids (sorted, so the result ignores item order) and each item's group."""
    s = np.asarray([str(x) for x in subjects])
    if s.ndim != 1 or s.size == 0:
        raise ValueError("subjects: expected a non-empty 1-D list of subject ids (one per item)")
    uniq, inv = np.unique(s, return_inverse=True)
    return uniq, inv


def patient_folds(subjects, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-level K-fold: [(train_idx, val_idx)] * k, indices into `subjects` (one id per item).

    Subjects are shuffled with `seed` and dealt into k folds of near-equal subject count; every
    item of a subject (both phases, all slices) lands in the same fold. Deterministic for a given
    set of subject ids and seed, whatever the item order.
    """
    if k < 2:
        raise ValueError(f"patient_folds: k must be >= 2, got {k}")
    uniq, inv = _subject_groups(subjects)
    if len(uniq) < k:
        raise ValueError(f"patient_folds: {len(uniq)} subjects cannot fill {k} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = np.empty(len(uniq), np.int64)
    for f, part in enumerate(np.array_split(order, k)):
        fold_of[part] = f
    item_fold = fold_of[inv]
    idx = np.arange(len(inv))
    return [(idx[item_fold != f], idx[item_fold == f]) for f in range(k)]


def fold_units(stacks, by: str = "subject") -> np.ndarray:
    """What the CV folds keep together, one id per stack: its subject (patient folds), or the value
    of meta key `by`, e.g. "group" (ACDC's pathology group: patient_folds over these ids with as
    many folds as groups is leave-one-group-out)."""
    if by == "subject":
        return np.array([str(st.subject) for st in stacks])
    missing = [st.subject for st in stacks if st.meta.get(by) in (None, "")]
    if missing:
        raise ValueError(f"fold_by={by!r}: {len(missing)} stack(s) have no {by!r} in their meta "
                         f"(first: subject {missing[0]!r}); use fold_by=subject")
    return np.array([str(st.meta[by]) for st in stacks])


def split_subjects(subjects, test_size: float | int = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic patient-level train/test split: (train_idx, test_idx) into `subjects`.

    test_size: a fraction of the subjects (0 < f < 1, rounded, at least 1) or a subject count.
    Both sides get at least one subject.
    """
    uniq, inv = _subject_groups(subjects)
    n = len(uniq)
    if 0 < test_size < 1:
        n_test = max(1, int(round(test_size * n)))
    elif float(test_size).is_integer():
        n_test = int(test_size)
    else:
        raise ValueError(f"split_subjects: test_size must be a fraction in (0, 1) or a subject count, "
                         f"got {test_size}")
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"split_subjects: cannot put {n_test} of {n} subjects in the test set "
                         "(each side needs at least one)")
    order = np.random.default_rng(seed).permutation(n)
    is_test = np.zeros(n, bool)
    is_test[order[:n_test]] = True
    idx = np.arange(len(inv))
    return idx[~is_test[inv]], idx[is_test[inv]]


def oversample(y, factor: int = 6, classes: Sequence[int] = (CLASS_INDEX["OAP"], CLASS_INDEX["OBS"]),
               seed: int = 0) -> np.ndarray:
    """Indices into `y` in which every item of a class in `classes` appears `factor` times and every
    other item once, shuffled with `seed` (the paper: OAP and OBS 6x)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"oversample: y must be 1-D, got shape {y.shape}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"oversample: factor must be a positive integer, got {factor}")
    reps = np.where(np.isin(y, np.asarray(classes)), int(factor), 1)
    idx = np.repeat(np.arange(len(y)), reps)
    return np.random.default_rng(seed).permutation(idx)
