"""DICOM cine short-axis series -> Stacks ordered apex to base.

Files are found by content, not by name (any file under a folder; extensions are not trusted); a
gzipped file (.dcm.gz) is inflated first, within the per-file size limit. A classic file is one
image; an enhanced multi-frame file is one image per frame, each placed by its own functional
groups (dicom_enhanced.py), so both kinds go through the same grouping, ordering and ES logic.
Grouping: (PatientID or StudyInstanceUID, SeriesInstanceUID, image size, image kind and echo, slice
orientation); a file without SeriesInstanceUID is grouped by its folder, SeriesNumber and
SeriesDescription instead. Only magnitude images form stacks by default: phase, real, imaginary and
field-map images are set aside with the reason (they would otherwise pass for cine phases).
Headers are checked before any pixel is decoded (dicom_header.py: size limits, geometry, rescale).
Within a group: slice position = ImagePositionPatient . normal (normal = row x col of
ImageOrientationPatient); phases are ranked by TriggerTime at every position (InstanceNumber only as
a warned fallback); the apex end comes from LPS geometry (see geometry.apex_to_base), never from
InstanceNumber, file names or SliceLocation (whose sign differs between scanners).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import mmap
import multiprocessing
import os
import sys
import threading
import time
import weakref
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from stackcls.io import dicom_enhanced as enh
from stackcls.io import dicom_fast
from stackcls.io import dicom_header as hdr
from stackcls.io.errors import StackReadError
from stackcls.io.geometry import (apex_to_base, es_disk, estimate_es, estimate_es_from_counts,
                                  middle_slices, resolve_phases)
from stackcls.io.limits import StackBudget, check_file, decoded_bytes, max_stack_bytes, mb
from stackcls.progress import bar as tqdm
from stackcls.stack import Stack

POSITION_TOL_MM = 0.1    # two images closer than this along the normal are at the same position
TRIGGER_TOL_MS = 0.5     # two images at one position closer than this in time are duplicates
ORIENT_COS_TOL = 0.9998  # ~1.1 degrees: normals closer than this belong to one stack
GZIP_MAGIC = b"\x1f\x8b"
_checked: dict = {}      # check() results by their sources' bytes, for a whole scan
_CHECKED_MAX = 1 << 14
POOL_MIN_FILES = 400     # a scan of fewer files reads in this process (benchmarks/io.py)
POOL_SAMPLE = 24         # files read here first, timed, to choose between this process and a pool
POOL_SLOW_FILE_S = 0.002  # CPU seconds per file from which workers pay (see _read_in_pool)
MAX_WORKERS = 8
_CHUNK = 1 << 22
# A file from this size is memory-mapped, not read: its pixels are then views of the page cache,
# neither copied into a fresh buffer nor into the scan's PixelStore (an enhanced cine file is a few
# MB; reading the enhanced phantom cohort's 57 MB cost ~15 ms plus ~11 ms of copying, mapping it
# ~1.5 ms). Smaller files, most classic single-frame images, are read as before: thousands of
# small mappings held through a scan would approach the kernel's limit on mappings.
MAP_MIN_BYTES = 1 << 20
# Each live mapping holds a file descriptor (Python's mmap keeps a duplicate) until the last view of
# it goes: past this many at once (a scan holds them all), files are read instead, far below the
# usual limit of 1,024 open files.
MAP_MAX_LIVE = 256
_live_maps = [0]
_live_maps_lock = threading.Lock()  # archive readers run scans in threads
STACK_CHUNK = 16 << 20  # the stacks' images are cut from buffers this large (PixelStore)
MAX_COUNT_BINS = 1 << 22  # _stored_es counts values in a table this long at most (8 bytes a bin)

# Decoder hints by transfer syntax, for a broken install: the decoders are dependencies (pyproject;
# docs/io.md lists them with their licences). pydicom decodes uncompressed, RLE and deflate itself.
_JPEG = "pip install python-gdcm"
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg (or pip install python-gdcm)"
_JLS = "pip install pyjpegls (or pip install python-gdcm)"
_DECODER_HINT = {
    "1.2.840.10008.1.2.4.50": _JPEG, "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG, "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": _JLS, "1.2.840.10008.1.2.4.81": _JLS,
    "1.2.840.10008.1.2.4.90": _J2K, "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K, "1.2.840.10008.1.2.4.202": _J2K,
    "1.2.840.10008.1.2.4.203": _J2K,
}


@dataclasses.dataclass
class DicomSlice:
    """One readable image (a classic file, or one frame of a multi-frame file) with the header
    fields the grouping needs."""

    path: str
    subject: str
    study: str
    series: str
    group: str  # SeriesInstanceUID, or folder + SeriesNumber + SeriesDescription without one
    series_description: str
    shape: tuple[int, int]
    ipp: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    thickness: float | None
    trigger: float | None
    instance: int | None
    sop: str
    # the stored values as decoded (None: header only) and their rescale; `image` applies it. Kept
    # as stored until a stack is built, which converts each image once, straight into its place.
    stored: np.ndarray | None
    slope: float = 1.0
    intercept: float = 0.0
    kind: str = enh.MAGNITUDE     # enh.image_kind: images of different kinds never share a stack
    echo: str | None = None
    order_tag: str = "InstanceNumber"  # what `instance` holds: the phase order without TriggerTime
    frame_no: int | None = None   # 1-based frame of a multi-frame file

    @property
    def image(self) -> np.ndarray | None:
        """The rescaled image, float32 (rows, cols)."""
        if self.stored is None:
            return None
        out = np.empty(self.stored.shape, np.float32)
        self.image_into(out)
        return out

    def image_into(self, out: np.ndarray) -> None:
        """The rescaled image written into `out` (float32): stored value x slope + intercept in
        float32. A pass is skipped only where it changes no bit: x * 1 is x, and x + 0 is x unless x
        is -0.0, which only a negative slope makes from a stored 0."""
        out[...] = self.stored
        if self.slope != 1:
            out *= np.float32(self.slope)
        if self.intercept != 0 or self.slope < 0:
            out += np.float32(self.intercept)

    @property
    def source(self) -> str:
        """The file, and for a multi-frame file the frame: what Stack.sources names."""
        return self.path if self.frame_no is None else f"{self.path} [frame {self.frame_no}]"


def _looks_like_raw_dataset(head: bytes) -> bool:
    """True for DICOM written without the 128-byte preamble + 'DICM' (old ACR-NEMA style files):
    they start with a little-endian group 0008 (or 0002) tag."""
    return len(head) >= 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[3:4] == b"\x00"


def _native_pixels(ds) -> np.ndarray | None:
    """Fast path for the common case (uncompressed little-endian 8/16-bit grey): numpy straight
    from the bytes, skipping pydicom's generic pixel pipeline (~1 ms per file). (Rows, Columns),
    or (NumberOfFrames, Rows, Columns) for a multi-frame file. Returns None for anything else
    (pydicom then decodes it, or explains why it cannot)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or not _native_syntax(ts) or "PixelData" not in ds:
        return None
    bits, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16) or not 0 < stored <= bits or (signed and stored != bits):
        return None  # signed data with unused high bits needs sign extension: leave to pydicom
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    raw = ds.PixelData
    n = frames * rows * cols * bits // 8
    if not isinstance(raw, (bytes, memoryview)) or len(raw) < n:
        return None  # pydicom reports the truncation
    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2"}[bits, signed]
    arr = np.frombuffer(raw, dtype=dtype, count=frames * rows * cols)
    arr = arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    if stored < bits:  # unused high bits (e.g. old overlays) are not part of the value
        arr = arr & ((1 << stored) - 1)
    return arr


@functools.lru_cache(maxsize=64)
def _native_syntax(ts) -> bool:
    """Uncompressed little endian (pydicom's UID properties, asked once per syntax)."""
    return not ts.is_compressed and ts.is_little_endian


def _map(f) -> "mmap.mmap | None":
    """The open file `f` mapped read-only (MAP_MIN_BYTES or more), None to read it instead: a
    small file, or a mapping refused (no mmap on this file system, the kernel's mapping limit).
    Like nibabel's memory-mapped NIfTI, a file truncated by another program while its scan runs
    ends the process (SIGBUS) rather than reading changed bytes."""
    try:
        size = os.fstat(f.fileno()).st_size
        if size < MAP_MIN_BYTES or _live_maps[0] >= MAP_MAX_LIVE:
            return None
        if hasattr(mmap, "MAP_POPULATE"):  # Linux: the pages mapped at once, not fault by fault
            m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                          prot=mmap.PROT_READ)
        else:
            m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    with _live_maps_lock:
        _live_maps[0] += 1
    weakref.finalize(m, _unmapped)
    return m


def _unmapped() -> None:
    with _live_maps_lock:
        _live_maps[0] -= 1


def _gunzip(path: str, raw: bytes) -> bytes:
    """A gzipped file (.dcm.gz, one or more gzip members) inflated in bounded chunks, the inflated
    size checked against the per-file limit as it grows: a small .gz cannot become a huge file."""
    out, total = [], 0
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    buf = raw
    try:
        while True:
            chunk = d.decompress(buf, _CHUNK)
            total += len(chunk)
            check_file(path, total, "gzipped file (inflated so far)")
            out.append(chunk)
            if d.eof:
                if d.unused_data[:2] != GZIP_MAGIC:
                    break
                buf, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
                continue
            buf = d.unconsumed_tail
            if not buf and not chunk:
                raise StackReadError(path, f"truncated gzip file (ends after {total} inflated "
                                           "bytes)")
    except zlib.error as e:
        raise StackReadError(path, f"corrupt gzip file ({e})") from None
    return b"".join(out)


def read_images(path, budget: StackBudget | None = None, pixels: bool = True,
                into: np.ndarray | None = None, keep: "PixelStore | None" = None
                ) -> list[DicomSlice]:
    """Read one DICOM file (gzipped or not) into DicomSlices, one per image or frame; raises
    StackReadError(path, reason) if unusable. Sizes are checked before decoding (limits.py);
    `budget` caps the decoded bytes per series. pixels=False: the header only (`image` None).
    into: a float32 (images, rows, cols) array the rescaled images are also written into (the
    worker pool's shared memory). keep: a PixelStore the stored values are copied to (a scan's),
    so that the file's bytes are not kept with them."""
    # imported on the first DICOM read: pydicom takes ~0.8 s, and NIfTI-only users never need it
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    path = str(path)
    hdr.check_file_size(path)
    # read once and parsed from memory (the file size is capped above): a corrupt element length
    # then reads what is there, where a file object would first allocate the length it claims
    # (1.6 GB for one byte flipped in the meta group, found by tests/test_fuzz.py)
    with open(path, "rb") as f:
        raw = _map(f)
        if raw is None:
            raw = f.read()
    if raw[:2] == GZIP_MAGIC:
        raw = _gunzip(path, raw)
    if isinstance(raw, mmap.mmap):
        keep = None  # the pixels are views of the mapping: no file bytes of ours to drop
    fast = dicom_fast.parse(raw)
    if fast is not None:
        # any failure is read again by pydicom below, which then gives the result or the reason
        # (the messages name pydicom's view of the file). The stack budget is charged once, after
        # this succeeds: the decoded file (within the per-file limit) is dropped if over budget.
        log = _ChargeLog()
        try:
            out = _slices_from_dataset(path, fast, log, pixels, into, keep)
        except Exception:  # noqa: BLE001
            out = None
        if out is not None:
            if budget is not None:
                for charge in log.calls:
                    budget.charge(*charge)
            return out
    data = io.BytesIO(raw)
    hdr.check_deflated(path, data, read_preamble, _read_file_meta_info, read_dataset)
    data.seek(0)
    try:
        ds = pydicom.dcmread(data, force=False)
    except InvalidDicomError:
        if not _looks_like_raw_dataset(data.getbuffer()[:4].tobytes()):
            raise StackReadError(path, "not a DICOM file (no 'DICM' marker after the 128-byte "
                                       "preamble)") from None
        try:
            data.seek(0)
            ds = pydicom.dcmread(data, force=True)
        except Exception as e:  # noqa: BLE001 - any parser failure is a corrupt file
            raise StackReadError(path, f"corrupt DICOM ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001
        raise StackReadError(path, f"corrupt or truncated DICOM ({type(e).__name__}: {e})") from None
    try:
        return _slices_from_dataset(path, ds, budget, pixels, into, keep)
    except StackReadError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom parses values lazily: bad bytes surface here
        raise StackReadError(path, f"corrupt or truncated DICOM ({type(e).__name__}: {e})") from None


class _ChargeLog:
    """Records a file's stack-budget charges (StackBudget.charge's arguments), for the caller to
    apply to the real budget: after a fast read succeeds, or in file order in the parent process
    when workers read the headers (so the per-stack limit decides exactly as in one process)."""

    def __init__(self):
        self.calls = []

    def charge(self, path, key, where, nbytes) -> None:
        self.calls.append((path, key, where, nbytes))


def _decode(path: str, ds) -> np.ndarray:
    """All frames' stored values, (frames, Rows, Columns)."""
    try:
        arr = _native_pixels(ds)
        if arr is None:
            arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        ts = getattr(getattr(ds, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID")
        if ts is not None and ts.is_compressed:
            hint = _DECODER_HINT.get(str(ts), "pip install python-gdcm")
            raise StackReadError(path, f"compressed transfer syntax {ts.name} ({ts}) and no working "
                                       f"decoder: {hint} ({type(e).__name__}: {e})") from None
        raise StackReadError(path, f"unreadable pixel data, truncated or corrupt? "
                                   f"({type(e).__name__}: {e})") from None
    frames, shape = int(ds.get("NumberOfFrames", 1) or 1), (int(ds.Rows), int(ds.Columns))
    if arr.shape != ((frames, *shape) if frames > 1 else shape):
        raise StackReadError(path, f"pixel data shape {arr.shape} != NumberOfFrames x Rows x "
                                   f"Columns {frames} x {shape}")
    return arr.reshape(frames, *shape)


_FRAME_CHECKS = (hdr.geometry, hdr.rescale, hdr.trigger_time, enh.temporal_index, enh.image_kind,
                 hdr.echo, hdr.thickness)


def _slices_from_dataset(path: str, ds, budget: StackBudget | None = None,
                         pixels: bool = True, into: np.ndarray | None = None,
                         keep: "PixelStore | None" = None) -> list[DicomSlice]:
    if "PixelData" not in ds:
        kind = hdr.sop_kind(ds)
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise StackReadError(path, f"float pixel data ({kind}) is not supported")
        raise StackReadError(path, f"not an image: {kind} without pixel data")
    hdr.check_declared_size(path, ds)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise StackReadError(path, f"colour image ({spp} samples per pixel, "
                                   f"{ds.get('PhotometricInterpretation', '?')}): not a grey-level slice")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    # the IOD decides where geometry lives, not a stray per-frame sequence: anonymisers and
    # converters leave one-item PerFrameFunctionalGroupsSequences in classic single-frame files
    multi = frames > 1 or hdr.is_functional_group_iod(ds)
    views = enh.frame_views(path, ds) if multi else [ds]
    framed = frames > 1  # a single-frame file's slice is named by its path alone
    shape = (int(ds.Rows), int(ds.Columns))
    subject = str(ds.get("PatientID", "") or "").strip() or str(ds.get("StudyInstanceUID", "") or "")
    subject = subject or "unknown"
    study = str(ds.get("StudyInstanceUID", "") or "")
    group = hdr.series_group(path, ds)
    series = str(ds.get("SeriesInstanceUID", "") or "")
    description = str(ds.get("SeriesDescription", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    inst = ds.get("InstanceNumber")
    inst = None if inst in (None, "") else int(inst)
    heads, frame_memo = [], {}
    varying = enh.varying_tags(views) if multi else None
    fixed = set() if varying is None else {  # checks whose value is the same for every frame
        fn for fn in _FRAME_CHECKS if varying.isdisjoint(dicom_fast.tags_of(fn.reads))}

    def check(fn, v, *where):
        """fn(*where, v), computed once for the images that read `fn.reads` from the same sources:
        the same elements of one multi-frame file (FrameView.sources; once for the file when no
        frame holds any of them in its own groups), or the same bytes in any file read by
        dicom_fast (FastDataset.sources; the position repeats at every phase, the orientation and
        rescale in every file of a series). A check that raises is not kept, so the first image
        raising still ends its file."""
        if fn in fixed:
            key = None
        elif not hasattr(v, "sources") or (key := v.sources(fn.reads)) is None:
            return fn(*where, v)
        memo = frame_memo if multi else _checked
        key = (fn, key)
        out = memo.get(key, memo)  # memo itself: not there (None is a result)
        if out is memo:
            if len(memo) >= _CHECKED_MAX:
                memo.clear()
            out = memo[key] = fn(*where, v)
        return out

    for k, v in enumerate(views):
        where = f"{path} [frame {k + 1}]" if framed else path
        ipp, normal, ps = check(hdr.geometry, v, where)
        slope, intercept = check(hdr.rescale, v, where)
        trig = check(hdr.trigger_time, v, where)
        if multi:  # frames of one file share its InstanceNumber: order by time index, then frame
            tp = check(enh.temporal_index, v)
            order = (tp, "TemporalPositionIndex") if tp is not None else \
                ((inst or 0) * 100000 + k + 1, "InstanceNumber and frame number")
        else:
            order = (inst, "InstanceNumber")
        heads.append((ipp, normal, ps, slope, intercept, trig, order, check(enh.image_kind, v),
                      check(hdr.echo, v), check(hdr.thickness, v)))
    if budget is not None:
        budget.charge(path, (subject, study, group, shape), f"series {group} of {subject}",
                      decoded_bytes(frames * shape[0] * shape[1],
                                    int(ds.get("BitsAllocated", 0) or 0) / 8))
    stored = _decode(path, ds) if pixels else None
    if stored is not None and keep is not None:
        stored = keep.copy(stored)
    if into is not None and into.shape != stored.shape:
        raise StackReadError(path, f"{stored.shape[0]} image(s) of {shape} where the header pass "
                                   f"read {into.shape[0]} of {into.shape[1:]}: file changed "
                                   "during the scan?")
    out = []
    for k, (ipp, normal, ps, slope, intercept, trig, order, kind_, echo, thick) in enumerate(heads):
        out.append(DicomSlice(
            path=path, subject=subject, study=study, series=series, group=group,
            series_description=description, shape=shape, ipp=ipp, normal=normal,
            pixel_spacing=ps, thickness=thick, trigger=trig, instance=order[0],
            sop=f"{sop} [frame {k + 1}]" if framed and sop else sop,
            stored=None if stored is None else stored[k], slope=slope, intercept=intercept,
            kind=kind_, echo=echo, order_tag=order[1], frame_no=k + 1 if framed else None,
        ))
        # stored integers of up to 32 bits times a slope within +-1e6 plus an intercept within
        # +-1e7 (hdr.rescale) are finite in float32: only float stored values need the check
        if stored is not None and (stored.dtype.kind == "f" or stored.dtype.itemsize > 4) and \
                not np.isfinite(out[-1].image).all():
            raise StackReadError(path, "pixel values are not finite after RescaleSlope/Intercept"
                                 + (f" (frame {k + 1})" if framed else ""))
        if into is not None:
            out[-1].image_into(into[k])
    return out


def _groups(slices: list[DicomSlice]) -> list[list[DicomSlice]]:
    """Split by (subject, series, image size, image kind, echo), then by slice orientation (normals
    within ~1 deg)."""
    by_key = defaultdict(list)
    for s in slices:
        by_key[(s.subject, s.study, s.group, s.shape, s.kind, s.echo)].append(s)
    out = []
    for key in sorted(by_key, key=str):
        clusters: list[tuple[np.ndarray, list]] = []
        for s in by_key[key]:
            for ref, members in clusters:
                # the same array as ref (check() shares it across a series' files) is its own
                # unit normal: always within the tolerance
                if s.normal is ref or abs(float(np.dot(ref, s.normal))) > ORIENT_COS_TOL:
                    members.append(s)
                    break
            else:
                clusters.append((s.normal, [s]))
        out.extend(m for _, m in clusters)
    return out


def _phase_order(items: list[DicomSlice], use_trigger: bool):
    """Sort the images at one position in time; returns (kept in time order, duplicates as
    (slice, kept_slice))."""
    key = (lambda s: (s.trigger, s.instance or 0, s.path, s.frame_no or 0)) if use_trigger else \
          (lambda s: (s.instance if s.instance is not None else 0, s.path, s.frame_no or 0))
    items = sorted(items, key=key)
    kept, dups = [], []
    for s in items:
        if kept:
            prev = kept[-1]
            same = (s.sop and s.sop == prev.sop) or (
                abs(s.trigger - prev.trigger) < TRIGGER_TOL_MS if use_trigger
                else s.instance == prev.instance)
            if same:
                dups.append((s, prev))
                continue
        kept.append(s)
    return kept, dups


def stacks_from_slices(slices: list[DicomSlice], phases=("ED", "ES"), es=None):
    """Group readable slices into stacks. Returns (stacks, skipped [(path, reason)], warnings)."""
    stacks, skipped, warns = [], [], []
    echoes = defaultdict(set)  # a stack names its echo only where its series has several
    for s in slices:
        echoes[(s.subject, s.study, s.group)].add(s.echo)
    # With every phase kept, the cines are the stacks' memory: taken from one buffer, which numpy
    # asks the kernel to back with huge pages (a few page faults, not one per 4 KB, which cost ~20%
    # of a scan). Full grids need exactly one value per image pixel; a cine that does not fit (a
    # grid with gaps) gets its own array. Untouched parts (skipped series) take no memory.
    arena = np.empty(sum(s.shape[0] * s.shape[1] for s in slices) if phases == "all" else 0,
                     np.float32)
    arena_used = 0
    scratch = [np.empty(0, np.intp)]  # _stored_es's
    images = PixelStore(STACK_CHUNK)  # the other stacks' images
    for group in _groups(slices):
        ser = _plan(group, echoes, skipped, warns)
        if ser is None:
            continue
        n_phases, (H, W) = ser.n_phases, ser.g0.shape
        subject_es = es.get(ser.g0.subject) if isinstance(es, dict) else es
        if subject_es is not None:
            es_t = int(subject_es)
            es_how = "given by the labels CSV" if isinstance(es, dict) else "given by the caller"
            if not 0 <= es_t < n_phases:
                warns.append(f"{ser.where}: ES frame {es_t} is outside the {n_phases} phases; ES "
                             "not loaded")
                es_t = -1
        elif phases == "all" and n_phases > 2:
            # the cine (T, S, H, W): every phase's stack; missing slices are zeros
            size = n_phases * len(ser.centers) * H * W
            if arena_used + size <= arena.size:
                ser.cine = arena[arena_used:arena_used + size].reshape(n_phases, -1, H, W)
                arena_used += size
            else:
                ser.cine = np.empty((n_phases, len(ser.centers), H, W), np.float32)
            _fill_cine(ser.cine, ser.timeline, ser.rank)
            es_t, es_how = _stored_es(ser, scratch) or estimate_es(ser.cine)
        elif "ES" in ((phases,) if isinstance(phases, (str, int)) else phases) and n_phases > 2:
            # the stacks are made from their own images: the estimate needs no cine when it can
            # count stored values, else only the middle slices it reads
            es_t, es_how = _stored_es(ser, scratch) or _middle_es(ser)
        else:
            es_t, es_how = estimate_es(np.zeros((n_phases, 1, 1, 1), np.float32))
        _add_stacks(ser, phases, es_t, es_how, stacks, skipped, images)
    return stacks, skipped, warns


@dataclasses.dataclass
class _Series:
    """One group of slices on its way to stacks: what grouping them by position and time found."""

    g0: DicomSlice
    where: str           # how messages name it
    several: bool        # its series has several echoes: stacks name theirs
    centers: np.ndarray  # slice positions along the normal, one per position cluster
    timeline: dict       # position cluster -> its images in time order
    n_phases: int
    use_trigger: bool
    meta_warn: list
    ab_pos: np.ndarray   # positions in mm, apex to base
    known: bool          # apex end known from geometry
    note: str
    rank: np.ndarray     # position cluster -> apex-to-base rank
    cine: np.ndarray | None = None  # every phase, when all are kept


def _plan(group: list[DicomSlice], echoes, skipped: list, warns: list) -> _Series | None:
    """A group's positions and phases, or None (reasons in `skipped`) when it makes no stack."""
    g0 = group[0]
    normal = g0.normal
    several = len(echoes[(g0.subject, g0.study, g0.group)]) > 1
    where = (f"series {g0.group} of {g0.subject}"
             + (f" ({g0.kind.lower()} images)" if g0.kind != enh.MAGNITUDE else "")
             + (f" ({g0.echo})" if several and g0.echo else ""))
    along = {}  # one product per position array (check() shares it across the phases)
    d = np.array([along[id(s.ipp)] if id(s.ipp) in along else
                  along.setdefault(id(s.ipp), float(s.ipp @ normal)) for s in group])
    # cluster positions along the normal: a new position where the gap to the previous image in
    # position order exceeds the tolerance
    order = np.argsort(d, kind="stable")
    d_sorted = d[order]
    new = np.empty(len(d), bool)
    new[0] = True
    new[1:] = np.diff(d_sorted) > POSITION_TOL_MM
    pos_id = np.empty(len(group), dtype=int)
    pos_id[order] = np.cumsum(new) - 1
    bounds = [*np.flatnonzero(new), len(d)]
    # each the mean of its cluster, as np.mean sums and divides it (~5x less overhead)
    centers = np.array([d_sorted[a:b].sum() / (b - a) for a, b in zip(bounds, bounds[1:])])
    if len(centers) < 2:
        for s in group:
            skipped.append((s.source, f"single-slice series: {where} has {len(group)} image(s), "
                                      f"all at one position ({centers[0]:.2f} mm along the "
                                      "normal); a stack needs at least 2 slice positions"))
        return None
    use_trigger = all(s.trigger is not None for s in group)
    at_pos = defaultdict(list)
    for s, p in zip(group, pos_id):
        at_pos[int(p)].append(s)
    timeline = {}
    for p, items in at_pos.items():
        kept, dups = _phase_order(items, use_trigger)
        for s, prev in dups:
            why = (f"trigger time {s.trigger:g} ms" if use_trigger
                   else f"{s.order_tag} {s.instance}")
            skipped.append((s.source, f"duplicate: same position ({centers[p]:.2f} mm) and {why} "
                                      f"as {prev.source} in {where}; kept that one"))
        timeline[p] = kept
    n_phases = max(len(v) for v in timeline.values())
    grid = n_phases * len(centers) * g0.shape[0] * g0.shape[1] * 4  # the (T, S, H, W) cine
    if grid > (limit := max_stack_bytes()):  # a sparse grid: few files, a huge cine
        for s in (s for items in timeline.values() for s in items):  # duplicates: said above
            skipped.append((s.source, f"{where}: {n_phases} phases x {len(centers)} positions of "
                                    f"{g0.shape[0]} x {g0.shape[1]} need {mb(grid)} as a cine, "
                                    f"over the per-stack limit of {mb(limit)} (set "
                                    "STACKCLS_MAX_STACK_MB to raise it): the series is skipped"))
        return None
    meta_warn = []
    if not g0.series:
        msg = (f"{where}: grouped by folder, SeriesNumber, SeriesDescription and orientation; "
               "two series sharing all four would be merged")
        meta_warn.append(msg)
        warns.append(msg)
    if not use_trigger and n_phases > 1:
        msg = f"{where}: TriggerTime missing, cine phases ordered by {g0.order_tag}"
        meta_warn.append(msg)
        warns.append(msg)
    counts = {len(v) for v in timeline.values()}
    if len(counts) > 1:
        msg = (f"{where}: positions have different phase counts {sorted(counts)}; phases are "
               "matched by their rank in time, some slices are missing from some phases")
        meta_warn.append(msg)
        warns.append(msg)
    ab_order, ab_pos, known, note = apex_to_base(normal, centers)
    rank = np.empty(len(centers), dtype=int)
    rank[ab_order] = np.arange(len(centers))  # position cluster -> apex-to-base rank
    return _Series(g0, where, several, centers, timeline, n_phases, use_trigger, meta_warn, ab_pos,
                   known, note, rank)


def _add_stacks(ser: "_Series", phases, es_t: int, es_how: str, stacks: list,
                skipped: list, store: PixelStore) -> None:
    """The series' stacks, the phases asked for, appended to `stacks`."""
    g0, where, timeline, rank, centers, cine = (ser.g0, ser.where, ser.timeline, ser.rank,
                                                ser.centers, ser.cine)
    n_phases, ab_pos, normal, H, W = ser.n_phases, ser.ab_pos, g0.normal, *g0.shape
    if n_phases == 1:
        es_t = -1
        es_how = "single-phase series: no ES"
    for t, name in resolve_phases(phases, n_phases, es_t):
        sl = sorted(((rank[p], items[t]) for p, items in timeline.items() if t < len(items)),
                    key=lambda x: x[0])
        if len(sl) < 2:
            for _, s in sl:
                skipped.append((s.source, f"{where}: phase {t} has a single slice"))
            continue
        ranks = [int(r) for r, _ in sl]
        ss = [s for _, s in sl]
        pos = np.array([ab_pos[r] for r in ranks])
        gaps = np.diff(ab_pos)
        spacing = (ss[0].pixel_spacing[0], ss[0].pixel_spacing[1],
                   float(np.median(gaps)) if len(gaps) else (ss[0].thickness or float("nan")))
        meta = dict(
            format="dicom", series_uid=g0.series, study_uid=g0.study,
            series_description=g0.series_description, normal=[float(x) for x in normal],
            orientation=ser.note, n_phases=n_phases, es_frame=es_t if es_t >= 0 else None,
            es_source=es_how, phase_source="TriggerTime" if ser.use_trigger else g0.order_tag,
            trigger_time=ss[0].trigger, thickness=ss[0].thickness, warnings=list(ser.meta_warn),
            image_type=g0.kind,
        )
        if ser.several:
            meta["echo"] = g0.echo
        if len(ranks) < len(centers):
            meta["warnings"].append(f"phase {t}: {len(centers) - len(ranks)} slice(s) missing")
        if cine is not None and len(ranks) == len(centers):
            images = cine[t]  # every phase kept: the stacks share the cine's memory
        else:
            images = store.empty((len(ss), H, W), np.float32)
            for i, s in enumerate(ss):
                s.image_into(images[i])
        stacks.append(Stack(
            images=images, sources=[s.source for s in ss], files=[s.path for s in ss],
            subject=g0.subject, phase=name, slice_ids=ranks, frame=t, positions=pos,
            spacing=spacing, orientation_known=ser.known, meta=meta,
        ))


def _fill_cine(cine: np.ndarray, timeline: dict, rank: np.ndarray) -> None:
    """cine[t, rank[p]] = the images at position p in time order, zeros after its last; positions
    whose rank falls outside the cine are left out."""
    S = cine.shape[1]
    for p, items in timeline.items():
        r = rank[p]
        if 0 <= r < S:
            for t, s in enumerate(items):
                s.image_into(cine[t, r])
            cine[len(items):, r] = 0


def _middle_es(ser: _Series) -> tuple[int, str]:
    """estimate_es from a cine of only the middle slices it reads."""
    S, (H, W) = len(ser.centers), ser.g0.shape
    lo, hi = middle_slices(S)
    mid = np.empty((ser.n_phases, hi - lo, H, W), np.float32)
    _fill_cine(mid, ser.timeline, ser.rank - lo)
    return estimate_es(mid, n_slices=S)


def _stored_es(ser: _Series, scratch: list) -> tuple[int, str] | None:
    """estimate_es of the series' cine, counted from the stored integer values of the disks it
    reads, nothing converted: each distinct stored value is rescaled once, as image_into rescales
    it, and a phase missing at a position counts as that many zeros, as in the cine. None where
    that does not apply: float stored values, more than one rescale among those images, a range
    of values too wide to count in a table. scratch: [a buffer reused by the scan's series], so
    that each does not fault in fresh pages (~3 us a page on a VM, most of this otherwise)."""
    S, (H, W), T = len(ser.centers), ser.g0.shape, ser.n_phases
    lo, hi = middle_slices(S)
    mid = [(ser.rank[p] - lo, items) for p, items in ser.timeline.items() if lo <= ser.rank[p] < hi]
    s0 = mid[0][1][0]
    if any(s.stored.dtype.kind not in "iu" or s.slope != s0.slope or s.intercept != s0.intercept
           for _, items in mid for s in items):
        return None
    (rows, cols), disk = es_disk(H, W)
    shape = (T, hi - lo, int(disk.sum()))
    if scratch[0].size < np.prod(shape):
        scratch[0] = np.empty(int(np.prod(shape)), np.intp)
    values_at = scratch[0][:np.prod(shape)].reshape(shape)
    missing = np.zeros((T, hi - lo), bool)
    for r, items in mid:
        for t, s in enumerate(items):
            values_at[t, r] = s.stored[rows, cols][disk]
        values_at[len(items):, r] = values_at[0, r]  # a value present, until the range is known
        missing[len(items):, r] = True
    v0 = 0 if all(s.stored.dtype.kind == "u" for _, items in mid for s in items) else \
        int(values_at.min())  # unsigned values count from 0: a pass saved, a few more bins
    if v0:
        values_at -= v0
    span = int(values_at.max()) + 1
    if (span + 1) * T > MAX_COUNT_BINS:
        return None
    if missing.any():
        values_at[missing] = span  # one more value: the zeros of the missing images
    counts = np.stack([np.bincount(values_at[t].ravel(), minlength=span + 1) for t in range(T)])
    values = np.zeros(span + 1, np.float32)
    dataclasses.replace(s0, stored=np.arange(v0, v0 + span)).image_into(values[:span])
    return estimate_es_from_counts(values, counts, S)


class PixelStore:
    """Arrays cut from large buffers: the stored pixel values of a scan's images (copied out of
    each file's bytes, which are then dropped as soon as it is read and their memory reused for
    the next file), and the images of its stacks. Fresh memory costs a page fault per 4 KB (~2-3 us
    each on a VM), and numpy backs buffers from 4 MB with huge pages (one fault per 2 MB): without
    this, the 53 MB of the enhanced phantom cohort's files cost 13k page faults (~15 % of that
    scan's time), its ED and ES stacks 8k. A buffer is freed when no array of it is left, so a
    stack kept alone keeps its buffer (at most `chunk` bytes). Buffers grow with the scan (each
    room for 8 more arrays like this one, or as large as all before it, up to `chunk`), so a
    small scan takes little more than it keeps."""

    CHUNK = 64 << 20

    def __init__(self, chunk: int = CHUNK):
        self._buf, self._used, self._total, self.chunk = None, 0, 0, chunk

    def empty(self, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._buf is None or self._used + n > self._buf.size:
            size = max(n, min(self.chunk, max(self._total, 8 * n)))
            self._buf, self._used = np.empty(size, np.uint8), 0
        self._total += n
        out = self._buf[self._used:self._used + n].view(dtype).reshape(shape)
        self._used += -(-n // 64) * 64  # each array 64-byte aligned
        return out

    def copy(self, arr: np.ndarray) -> np.ndarray:
        out = self.empty(arr.shape, arr.dtype)
        out[...] = arr
        return out


def _read_one(f: str, budget=None, pixels: bool = True, into=None, keep=None):
    """read_images, with a failure as the skipped entry (path, reason)."""
    try:
        return read_images(f, budget, pixels, into, keep)
    except StackReadError as e:
        return e.path, e.reason
    except OSError as e:
        return f, f"cannot read file ({e.strerror or e})"


def _read_header(f: str):
    log = _ChargeLog()
    return _read_one(f, log, pixels=False), log.calls


_shared: np.ndarray | None = None  # the pool's pass-2 output, float32, set before the fork


def _read_pixels(job):
    """Pass 2 in a worker: the file's images decoded into the shared memory at `offset`, as
    `n` images of `shape`; None, or the skipped entry (path, reason)."""
    f, offset, n, shape = job
    res = _read_one(f, into=_shared[offset:offset + n * shape[0] * shape[1]].reshape(n, *shape))
    return res if isinstance(res, tuple) else None


def _pool_size(files: list[str], workers: int | None) -> int:
    """Worker processes to read `files`: 1 (in this process) for fewer than POOL_MIN_FILES files,
    where starting workers costs more than they save; else one per usable core, at most
    MAX_WORKERS (scan_dicom still reads fast files here, see there). Workers are forked (a fresh
    interpreter would spend longer importing numpy and pydicom than most scans take), so only
    from a process without other threads: forking a
    multi-threaded process (JAX, a GUI) can deadlock the child. tqdm's monitor thread only sleeps
    between checks of its bars, and is allowed."""
    if workers is None:
        if len(files) < POOL_MIN_FILES:
            return 1
        try:
            workers = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        except AttributeError:  # not Linux
            workers = min(os.cpu_count() or 1, MAX_WORKERS)
    threads = [t for t in threading.enumerate()
               if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods() or threads \
            or "jax" in sys.modules:
        return 1
    return min(workers, len(files))


def _read_in_pool(files: list[str], n_workers: int, kinds, budget: StackBudget):
    """(slices, skipped) as the in-process loop gives them, read by n_workers processes in two
    passes: headers of every file (nothing decoded), `budget` charged here in file order, then
    pixels only for the files that have an image in a kept stack (not over the budget, a kept
    kind). Each worker holds one chunk of files at a time; the per-file limits apply in the
    workers as in one process. The rescaled images come back through memory shared with the
    workers of pass 2 (forked after it is allocated), not pickled through a pipe (which copies
    each image twice more)."""
    global _shared
    # imported here, not once per worker: it is most of what a small scan costs a worker (~0.5 s)
    import pydicom  # noqa: F401
    from pydicom import datadict, filereader, uid  # noqa: F401
    skipped, per_file = [], {}
    chunk = max(1, min(64, len(files) // (n_workers * 8)))
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
        for f, (res, charges) in zip(files, pool.map(_read_header, files, chunksize=chunk)):
            if isinstance(res, tuple):
                skipped.append(res)
                continue
            try:
                for charge in charges:
                    budget.charge(*charge)
            except StackReadError as e:
                skipped.append((e.path, e.reason))
                continue
            per_file[f] = res
    need = [f for f, sl in per_file.items()
            if any((s.subject, s.study, s.group, s.shape) not in budget.over
                   and (kinds is None or s.kind in kinds) for s in sl)]
    jobs, offset = [], 0
    for f in need:
        sl = per_file[f]
        jobs.append((f, offset, len(sl), sl[0].shape))
        offset += len(sl) * sl[0].shape[0] * sl[0].shape[1]
    if jobs:
        # anonymous shared memory: the forked workers write into the pages this process reads
        _shared = np.frombuffer(mmap.mmap(-1, max(offset, 1) * 4), np.float32)
        try:
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                for (f, start, n, (h, w)), res in zip(jobs, pool.map(_read_pixels, jobs,
                                                                       chunksize=chunk)):
                    if res is not None:
                        skipped.append(res)
                        del per_file[f]
                        continue
                    block = _shared[start:start + n * h * w].reshape(n, h, w)
                    for k, s in enumerate(per_file[f]):  # rescaled by the worker
                        s.stored, s.slope, s.intercept = block[k], 1.0, 0.0
        finally:
            _shared = None
    return [s for sl in per_file.values() for s in sl], skipped


def _read_here(f: str, budget: StackBudget, slices: list, skipped: list, keep) -> None:
    res = _read_one(f, budget, keep=keep)
    if isinstance(res, tuple):
        skipped.append(res)
    else:
        slices += res


def scan_dicom(files, phases=("ED", "ES"), es=None, progress: bool = True,
               kinds=(enh.MAGNITUDE,), workers: int | None = None):
    """Read DICOM files (any order) into stacks. Returns (stacks, skipped, warnings).
    kinds: the image kinds (enh.image_kind) that form stacks; the others are set aside, one skipped
    entry per file saying how many images and why. None keeps every kind (each in its own stacks).
    workers: processes reading the files (_pool_size; None: automatic, 1: in this process)."""
    files = [str(f) for f in files]
    n_workers = _pool_size(files, workers)
    slices, skipped, budget = [], [], StackBudget()
    # Workers pay only for files slow to read (compressed, or read by pydicom): their two passes
    # cost about twice the CPU of one (measured: 1,480 fast-path files, 0.22 CPU s here, 0.46 in
    # two workers). So an automatic pool first reads a sample here and goes on in workers only
    # when it took POOL_SLOW_FILE_S a file (the first file, which pays for imports, not counted).
    # The budget is charged in file order either way.
    head = files if n_workers == 1 else files[:POOL_SAMPLE] if workers is None else []
    keep = PixelStore()
    with tqdm(total=len(files), desc="reading DICOM", unit="file", leave=False,
              disable=not progress or len(files) < 200) as bar:
        t = None
        for f in head:
            _read_here(f, budget, slices, skipped, keep)
            bar.update()
            t = time.process_time() if t is None else t
        rest = files[len(head):]
        if rest and workers is None and \
                time.process_time() - t < POOL_SLOW_FILE_S * (len(head) - 1):
            for f in rest:
                _read_here(f, budget, slices, skipped, keep)
                bar.update()
        elif rest:
            more, skipped2 = _read_in_pool(rest, n_workers, kinds, budget)
            slices += more
            skipped += skipped2
    if budget.over:  # a series over the per-stack limit is dropped whole, not loaded in part
        for path in dict.fromkeys(s.path for s in slices
                                  if (s.subject, s.study, s.group, s.shape) in budget.over):
            s = next(s for s in slices if s.path == path)
            skipped.append((path, budget.over[s.subject, s.study, s.group, s.shape]))
        slices = [s for s in slices if (s.subject, s.study, s.group, s.shape) not in budget.over]
    if kinds is not None:
        aside, per_file = defaultdict(list), Counter(s.path for s in slices)
        for s in slices:
            if s.kind not in kinds:
                aside[s.path].append(s)
        for path, items in aside.items():
            n = per_file[path]
            what = "image" if n == 1 else f"{len(items)} of {n} frames"
            found = ", ".join(sorted({s.kind.lower() for s in items}))
            skipped.append((path, f"set aside: {what} {'is' if n == 1 else 'are'} {found} "
                                  f"images, and stacks are built from "
                                  f"{' / '.join(k.lower() for k in kinds)} images only"))
        slices = [s for s in slices if s.kind in kinds]
    stacks, skipped2, warns = stacks_from_slices(slices, phases=phases, es=es)
    return stacks, skipped + skipped2, warns
