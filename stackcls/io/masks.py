"""A masks folder: anatomy masks for stacks of any format (DICOM above all), one NIfTI per stack.

    FOLDER/<subject>/<phase>.nii.gz    uint8 (rows, cols, slices), values 0..3 = stack.MASK_CLASSES

Slice k of the volume is the stack's slice whose id (`Stack.slice_ids`, the `slice` column of the
labels CSV) is k: for DICOM the apex-to-base rank of the slice position (0 = most apical), for a
NIfTI image its slice index in the file. Rows and columns are the image's (DICOM Rows x Columns).
The affine only records the pixel spacing; it is never used to place a slice. <subject> and <phase>
are `Stack.subject` and `Stack.phase` ("ED", "ES" or a phase index) through
`stackcls.atomic.safe_name`. The built-in cohort writes this folder beside its DICOM (`masks/`);
ACDC's `_gt` files beside the images need none (`stackcls.io.nifti`).

`attach_masks(stacks, folder)` raises StackReadError naming the file for a mask that does not fit
its stack (another image size, another slice count, values outside 0..3), and naming the folder
when none of its subject folders matches a loaded stack (the wrong folder, or names that differ).
A stack without a file keeps `masks=None`; files of subjects or phases not loaded are not read.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from stackcls.atomic import inside, replace_atomically, safe_name
from stackcls.io.errors import StackReadError
from stackcls.io.nifti import NIFTI_SUFFIXES, nifti_stem, read_mask
from stackcls.stack import Stack, validate_masks


def mask_file(folder, subject: str, phase: str) -> Path:
    """Where the masks of (subject, phase) live in a masks folder (the .nii.gz name)."""
    return inside(folder, Path(safe_name(subject)) / (safe_name(phase) + ".nii.gz"))


def write_mask(path, masks: np.ndarray, spacing: tuple[float, float, float] | None = None) -> Path:
    """Write (S, rows, cols) masks, slice k = slice id k, as the folder's NIfTI (atomically)."""
    import nibabel as nib  # ~0.6 s, only where masks are written

    if np.ndim(masks) != 3:
        raise ValueError(f"{path}: masks must be (S, rows, cols), got shape {np.shape(masks)}")
    m = validate_masks(masks, np.shape(masks), where=str(path))
    zooms = spacing or (1.0, 1.0, 1.0)
    img = nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(m, 0, 2)),
                          np.diag([*map(float, zooms), 1.0]))
    img.header.set_xyzt_units("mm")
    path = Path(path)
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: a cohort stays byte-for-byte reproducible
    with replace_atomically(path, "wb") as f:
        f.write(data)
    return path


def attach_masks(stacks: list[Stack], folder) -> list[Stack]:
    """Set `masks` on the stacks that have a file in `folder` (in place; returns `stacks`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StackReadError(folder, "masks folder not found")
    by_key: dict[tuple[str, str], Stack] = {}
    for st in stacks:
        key = (safe_name(st.subject), safe_name(st.phase))
        if key in by_key:  # e.g. two short-axis series of one patient: one file cannot serve both
            raise StackReadError(folder, f"{st.key} names two loaded stacks "
                                         f"({by_key[key].meta.get('series_uid', '?')} and "
                                         f"{st.meta.get('series_uid', '?')}); load one series at a time")
        by_key[key] = st
    subjects = {k[0] for k in by_key}
    found = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    if found and stacks and not subjects.intersection(found):  # the wrong folder, or names differ
        raise StackReadError(folder, f"no subject folder matches a loaded stack (found "
                                     f"{', '.join(found[:5])}{', ...' if len(found) > 5 else ''}; "
                                     f"loaded {', '.join(sorted(subjects)[:5])}"
                                     f"{', ...' if len(subjects) > 5 else ''})")
    for sub in (folder / name for name in found if name in subjects):
        for f in sorted(sub.iterdir()):
            if not f.name.lower().endswith(NIFTI_SUFFIXES):
                continue
            st = by_key.get((sub.name, nifti_stem(f)))
            if st is not None:
                st.masks = _fit(read_mask(f), st, f)
    return stacks


def _fit(vol: np.ndarray, st: Stack, path: Path) -> np.ndarray:
    """The volume's slices in the stack's order (slice k = slice id k), or an error naming `path`."""
    rows, cols, depth = vol.shape
    if (rows, cols) != st.images.shape[1:]:
        raise StackReadError(path, f"mask slices of {rows} x {cols} pixels for {st.key}, whose images "
                                   f"are {st.images.shape[1]} x {st.images.shape[2]}")
    ids = np.asarray(st.slice_ids)
    gapless = sorted(st.slice_ids) == list(range(st.n_slices))
    if ids.min() < 0 or depth <= ids.max() or (gapless and depth != st.n_slices):
        raise StackReadError(path, f"mask of {depth} slices for {st.key}, whose {st.n_slices} slices "
                                   f"have ids {ids.min()}..{ids.max()} (slice k of the mask is the "
                                   "slice with id k)")
    return np.moveaxis(vol[:, :, ids], 2, 0)
