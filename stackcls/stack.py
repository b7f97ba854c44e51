"""The `Stack`: one cardiac phase of one subject's short-axis stack, ordered apex to base.

Every stage after file reading works on Stacks (or on arrays cut from them), so this is the one
place that says what a stack holds. Slice order is always apex -> base; readers are responsible for
getting there (from DICOM/NIfTI geometry, or from a dataset convention when geometry is missing).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

CLASSES: tuple[str, str, str] = ("OAP", "IN", "OBS")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
# Per-pixel anatomy, ACDC's label convention (its papillary muscles count as LV cavity).
MASK_CLASSES: tuple[str, str, str, str] = ("background", "rv_cavity", "lv_myocardium", "lv_cavity")


@dataclasses.dataclass
class Stack:
    """One phase of one subject, slices ordered from apex to base.

    images: (S, H, W) float32, slice 0 is the most apical.
    sources: one id per slice for people (a DICOM file path, "path [frame k]" for a frame of a
        multi-frame file, or the slice index within a NIfTI file as str).
    slice_ids: the integer that names each slice in a labels CSV (NIfTI: the slice index within the
        file; DICOM: the apex-to-base rank). Defaults to range(S).
    phase: "ED", "ES" or a phase index as str.
    frame: the frame number within the cine (ACDC's frameYY, or the DICOM temporal index), if known.
    positions: (S,) slice positions in mm along the apex -> base axis, if known.
    spacing: (row, col, slice) spacing in mm, if known.
    orientation_known: True when apex/base were decided from patient geometry.
    labels: optional list of "OAP" / "IN" / "OBS", one per slice.
    masks: optional (S, H, W) uint8 anatomy, same slices as `images`, values index MASK_CLASSES.
    meta: free-form provenance (series UID, how ES was chosen, warnings, ...).
    files: the file each slice was read from (DICOM), if any: what code matches slices to files by,
        never `sources`, whose text is for display.
    """

    images: np.ndarray
    sources: list[str]
    subject: str
    phase: str
    slice_ids: list[int] | None = None
    frame: int | None = None
    positions: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    orientation_known: bool = False
    labels: list[str] | None = None
    masks: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    files: list[str] | None = None

    def __post_init__(self):
        self.images = np.asarray(self.images, dtype=np.float32)
        if self.images.ndim != 3:
            raise ValueError(f"stack {self.key}: images must be (S, H, W), got shape {self.images.shape}")
        n = self.images.shape[0]
        self.sources = [str(s) for s in self.sources]
        if len(self.sources) != n:
            raise ValueError(f"stack {self.key}: {len(self.sources)} sources for {n} slices")
        if self.files is not None:
            self.files = [str(f) for f in self.files]
            if len(self.files) != n:
                raise ValueError(f"stack {self.key}: {len(self.files)} files for {n} slices")
        if self.slice_ids is None:
            self.slice_ids = list(range(n))
        self.slice_ids = [int(i) for i in self.slice_ids]
        if len(self.slice_ids) != n:
            raise ValueError(f"stack {self.key}: {len(self.slice_ids)} slice ids for {n} slices")
        if self.positions is not None:
            self.positions = np.asarray(self.positions, dtype=np.float64)
            if self.positions.shape != (n,):
                raise ValueError(f"stack {self.key}: positions shape {self.positions.shape} != ({n},)")
        if self.labels is not None:
            self.labels = list(self.labels)
            validate_labels(self.labels, n, where=f"stack {self.key}")
        if self.masks is not None:
            self.masks = validate_masks(self.masks, self.images.shape, where=f"stack {self.key}")

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.phase}"

    @property
    def n_slices(self) -> int:
        return int(self.images.shape[0])

    def label_indices(self) -> np.ndarray:
        """Labels as class indices (S,) int32; raises if the stack is unlabelled."""
        if self.labels is None:
            raise ValueError(f"stack {self.key} has no labels")
        return np.array([CLASS_INDEX[l] for l in self.labels], dtype=np.int32)

    def reversed(self) -> "Stack":
        """The same stack with its slice order flipped (used for orientation augmentation/tests)."""
        return dataclasses.replace(
            self,
            images=self.images[::-1].copy(),
            sources=self.sources[::-1],
            files=None if self.files is None else self.files[::-1],
            slice_ids=self.slice_ids[::-1],
            positions=None if self.positions is None else self.positions[::-1].copy(),
            labels=None if self.labels is None else self.labels[::-1],
            masks=None if self.masks is None else self.masks[::-1].copy(),
            meta=dict(self.meta),
        )


def validate_labels(labels: Sequence[str], n: int, where: str = "labels") -> None:
    if len(labels) != n:
        raise ValueError(f"{where}: {len(labels)} labels for {n} slices")
    bad = sorted({l for l in labels if l not in CLASS_INDEX})
    if bad:
        raise ValueError(f"{where}: unknown label(s) {bad}; expected one of {CLASSES}")


def mask_problem(masks: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Why `masks` cannot be the anatomy of images of `shape`, or None: another shape, a dtype that
    is not numeric, values that are not integers in 0..len(MASK_CLASSES)-1."""
    k = len(MASK_CLASSES)
    if masks.shape != tuple(shape):
        return f"masks of shape {masks.shape} for images of shape {tuple(shape)}"
    if masks.dtype.kind not in "uif":
        return f"masks of dtype {masks.dtype}; expected integer class ids 0..{k - 1} {MASK_CLASSES}"
    if masks.dtype.kind == "f" and not np.all(np.isfinite(masks) & (masks == np.round(masks))):
        return f"masks hold non-integer values; expected class ids 0..{k - 1} {MASK_CLASSES}"
    if masks.size and (masks.min() < 0 or masks.max() >= k):
        bad = [f"{v:g}" for v in np.unique(masks) if not 0 <= v < k]
        return f"mask value(s) {', '.join(bad[:5])} outside 0..{k - 1} {MASK_CLASSES}"
    return None


def validate_masks(masks, shape: tuple[int, ...], where: str = "masks") -> np.ndarray:
    """`masks` as uint8, or ValueError naming `where` and the `mask_problem`."""
    m = np.asarray(masks)
    if (problem := mask_problem(m, shape)) is not None:
        raise ValueError(f"{where}: {problem}")
    return m.astype(np.uint8, copy=False)


def is_ordered(labels: Sequence[str]) -> bool:
    """True if labels run OAP..., IN..., OBS... from apex to base (any run may be empty)."""
    idx = [CLASS_INDEX[l] for l in labels]
    return all(a <= b for a, b in zip(idx, idx[1:]))
