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


def window(images, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
    """Map each slice's [lo, hi] percentile range linearly to [0, 1], clipping outside it.

    images: (S, H, W) or (H, W). Returns float32 of the same shape. A slice whose percentiles
    coincide (e.g. mostly background) falls back to its min..max range; a constant slice gives
    zeros. Non-finite pixels are an error (they would poison the percentiles silently).
    """
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"window: need 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    a = np.asarray(images, dtype=np.float32)
    x = _as_slices(a, "window")
    if not np.all(np.isfinite(x)):
        raise ValueError("window: images contain NaN or infinite values")
    flat = x.reshape(x.shape[0], -1)
    p_lo, p_hi = np.percentile(flat, [lo, hi], axis=1)
    # Degenerate window: fall back to the full range, so a sparse bright structure survives.
    mn, mx = flat.min(axis=1), flat.max(axis=1)
    bad = p_hi <= p_lo
    p_lo = np.where(bad, mn, p_lo)
    p_hi = np.where(bad, mx, p_hi)
    span = p_hi - p_lo
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)  # constant slice -> 0
    out = (flat - p_lo[:, None]) * scale[:, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(a.shape)


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
    scale = n_out / n_in
    inv = 1.0 / scale
    support = max(inv, 1.0)
    sample = (np.arange(n_out, dtype=np.float64) + 0.5) * inv - 0.5
    d = np.abs(sample[:, None] - np.arange(n_in, dtype=np.float64)[None, :]) / support
    w = np.maximum(0.0, 1.0 - d)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def resize(images, size) -> np.ndarray:
    """Bilinear resize of (S, H, W) or (H, W) images to `size` (int or (h, w)); float32 out.

    Separable: two small weight matrices and one einsum, so a few hundred slices take
    milliseconds. Antialiased when shrinking (the kernel widens with the scale factor).
    """
    a = np.asarray(images, dtype=np.float32)
    x = _as_slices(a, "resize")
    h, w = _size_hw(size)
    H, W = x.shape[1:]
    if (H, W) == (h, w):
        out = x.copy()
    else:
        wr, wc = _linear_weights(H, h), _linear_weights(W, w)
        out = np.einsum("hH,sHW,wW->shw", wr, x, wc, optimize=True).astype(np.float32)
    return out if a.ndim == 3 else out[0]


def to_model_input(images, size, keep: float = 0.6) -> np.ndarray:
    """(S, H, W) raw slices -> (S, size, size, 3) float32 in 0..255, the input every backbone's
    `preprocess_input` expects: window (on the whole slice), centre crop, resize, grey to RGB."""
    x = _as_slices(images, "to_model_input")
    x = resize(center_crop(window(x), keep), size) * np.float32(255.0)
    return np.repeat(np.clip(x, 0.0, 255.0)[..., None], 3, axis=-1)


def stack_arrays(stacks: Sequence[Stack], size, keep: float = 0.6, progress: bool = True) -> dict:
    """All slices of `stacks` as one array set, in stack order then apex -> base.

    Returns dict(x (N, size, size, 3) float32 0..255, y (N,) int32 class index or -1 for an
    unlabelled stack, stack_index (N,) int32 position in `stacks`, slice_index (N,) int32 position
    within its stack (0 = most apical), subject (N,) str).
    """
    if len(stacks) == 0:
        raise ValueError("stack_arrays: no stacks given")
    from tqdm.auto import tqdm

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
