"""One DICOM file -> its images (`DicomSlice`): a classic file is one image; an enhanced
(functional-group) file is one image per frame, each placed by its own functional groups
(dicom_enhanced.py). Whether a file is read through functional groups is decided by its SOP class
and NumberOfFrames (dicom_header.is_functional_group_iod), never by the mere presence of a
per-frame sequence. Headers are checked before any pixel is decoded (dicom_header.py: size limits,
geometry, rescale); a gzipped file is inflated first, within the per-file size limit; large files
are memory-mapped."""

from __future__ import annotations

import dataclasses
import io
import mmap
import os
import threading
import weakref
import zlib

import numpy as np

from stackcls.io import dicom_enhanced as enh
from stackcls.io import dicom_fast, dicom_values
from stackcls.io import dicom_header as hdr
from stackcls.io.errors import StackReadError
from stackcls.io.limits import StackBudget, check_file, decoded_bytes
from stackcls.io.dicom_pixels import PixelStore, _decode

_checked: dict = {}      # check() results by their sources' bytes, for a whole scan


GZIP_MAGIC = b"\x1f\x8b"



_CHECKED_MAX = 1 << 14



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
        fn for fn in _FRAME_CHECKS if varying.isdisjoint(dicom_values.tags_of(fn.reads))}

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
