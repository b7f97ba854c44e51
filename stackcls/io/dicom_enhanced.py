"""Enhanced (multi-frame) DICOM: per-frame headers from the functional groups, and the image type.

An enhanced MR file (Siemens XA, Philips and Canon exports) holds many 2-D frames; each frame's
geometry, rescale, timing and image type sit in its item of PerFrameFunctionalGroupsSequence, or,
when equal for all frames, once in SharedFunctionalGroupsSequence. `FrameView` presents one frame
as if it were a classic single-frame header (per-frame groups first, then shared, then the
top-level dataset), so the checks of dicom_header.py apply to frames unchanged.

`image_kind` says what an image shows (magnitude, phase, real, imaginary, field map) from the
classic ImageType values or the enhanced FrameType / ComplexImageComponent, so that images of
different kinds never merge into one stack's phases.
"""

from __future__ import annotations

from stackcls.io.dicom_fast import FastDataset, tag_of, tags_of
from stackcls.io.errors import StackReadError

MAGNITUDE = "MAGNITUDE"
# ImageType / FrameType values (3rd on) naming a non-magnitude image. Siemens writes M/P/R/I; Philips
# writes M_FFE, P_SE, R_IR...; enhanced files write the words and ComplexImageComponent.
_KIND_OF_TOKEN = {"P": "PHASE", "PHASE": "PHASE", "PHASE_MAP": "PHASE",
                  "R": "REAL", "REAL": "REAL", "I": "IMAGINARY", "IMAGINARY": "IMAGINARY",
                  "FIELD_MAP": "FIELD_MAP", "B0_MAP": "FIELD_MAP", "B0": "FIELD_MAP"}
_KIND_OF_PREFIX = {"P_": "PHASE", "R_": "REAL", "I_": "IMAGINARY"}


def image_kind(hdr) -> str:
    """MAGNITUDE, PHASE, REAL, IMAGINARY or FIELD_MAP; MAGNITUDE when nothing says otherwise.
    `hdr`: a dataset or a FrameView."""
    tokens = [str(t).strip().upper() for t in (_values(hdr.get("FrameType")) or
                                               _values(hdr.get("ImageType")))[2:]]
    for t in tokens:  # a field map is often flagged MAGNITUDE in ComplexImageComponent (Philips)
        if _KIND_OF_TOKEN.get(t) == "FIELD_MAP":
            return "FIELD_MAP"
    complex_part = str(hdr.get("ComplexImageComponent", "") or "").strip().upper()
    if complex_part in ("PHASE", "REAL", "IMAGINARY"):
        return complex_part
    if complex_part == MAGNITUDE:
        return MAGNITUDE
    for t in tokens:
        kind = _KIND_OF_TOKEN.get(t) or next((k for p, k in _KIND_OF_PREFIX.items()
                                              if t.startswith(p)), None)
        if kind is not None:
            return kind
    return MAGNITUDE


def _values(v) -> list:
    if v in (None, ""):
        return []
    return list(v) if not isinstance(v, (str, bytes)) else [v]


class FrameView:
    """One frame of a multi-frame dataset, read like a classic header: `get`, `in` and `[]` (by
    keyword) look in the frame's functional group items, then the shared ones, then the top-level
    dataset. The group elements are indexed once (the shared ones once per file): a lookup is then a
    dict access, not a walk over a dozen sequence items per frame. A dicom_fast dataset is indexed
    by tag, to the item holding it (no element objects made for the many never read)."""

    def __init__(self, ds, per_frame_item, shared: dict):
        self.file_meta = getattr(ds, "file_meta", None)
        self._ds = ds
        self._fast = isinstance(ds, FastDataset)
        self._frame_index = _index(per_frame_item)
        self._own = {**shared, **self._frame_index}

    def _find(self, key):
        if self._fast:
            key = tag_of(key)
            item = self._own.get(key)
            if item is not None:
                return item[key]
        else:
            elem = self._own.get(key)
            if elem is not None:
                return elem
        return self._ds[key] if key in self._ds else None

    def __contains__(self, key) -> bool:
        return self._find(key) is not None

    def __getitem__(self, key):
        elem = self._find(key)
        if elem is None:
            raise KeyError(key)
        return elem

    def get(self, key, default=None):
        if self._fast:
            tag = tag_of(key)
            item = self._own.get(tag)
            return item.get(tag) if item is not None else self._ds.get(tag, default)
        elem = self._find(key)
        return default if elem is None else elem.value

    def sources(self, keys) -> tuple | None:
        """The item each of `keys` is found in among the frame's own groups (None: at the file's
        top level or nowhere, the same for every frame): frames with equal sources read equal
        values. None for a pydicom dataset, read without the tag index."""
        if not self._fast:
            return None
        own = self._own
        return tuple([own.get(t) for t in tags_of(keys)])


def _index(item) -> dict:
    """keyword -> element over the first item of each functional group sequence in a (per-frame or
    shared) group item; the first sequence holding a keyword wins. For a dicom_fast dataset the
    same as tag -> the item holding it."""
    out = {}
    if item is None:
        return out
    if isinstance(item, FastDataset):
        for first in reversed(item.first_items()):
            out.update(first.owner_index())
        return out
    for elem in item:
        if elem.VR == "SQ" and len(elem.value):
            for e in elem.value[0]:
                if e.keyword and e.keyword not in out:
                    out[e.keyword] = e
    return out


def frame_views(path: str, ds) -> list[FrameView]:
    """One FrameView per frame of an enhanced multi-frame dataset; StackReadError for a multi-frame
    object without per-frame functional groups (RT dose grids, ultrasound and legacy cines), whose
    frames carry no geometry of their own."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) == 0:
        from stackcls.io.dicom_header import sop_kind
        raise StackReadError(path, f"multi-frame image ({frames} frames, {sop_kind(ds)}) without "
                                   "per-frame functional groups: its frames have no position of "
                                   "their own, so they cannot be placed in a stack")
    if len(per_frame) != frames:
        raise StackReadError(path, f"NumberOfFrames {frames} but {len(per_frame)} items in "
                                   "PerFrameFunctionalGroupsSequence: truncated or corrupt header")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_index = _index(shared[0] if shared else None)
    return [FrameView(ds, item, shared_index) for item in per_frame]


def varying_tags(views: list[FrameView]) -> set | None:
    """The tags that some frame holds in its own functional groups: a value read from any other
    tag (in the shared groups or the file's top level) is the same for every frame. None for a
    pydicom dataset, read without the tag index."""
    if not views or not views[0]._fast:
        return None
    out = set()
    for v in views:
        out.update(v._frame_index)
    return out


def temporal_index(view) -> int | None:
    """FrameContentSequence's TemporalPositionIndex (1-based), None when absent."""
    v = view.get("TemporalPositionIndex")
    try:
        return None if v in (None, "") else int(v)
    except (TypeError, ValueError):
        return None


image_kind.reads = ("FrameType", "ImageType", "ComplexImageComponent")  # see dicom_header's end
temporal_index.reads = ("TemporalPositionIndex",)
