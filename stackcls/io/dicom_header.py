"""DICOM header checks done before any pixel is decoded: size limits (decompression bombs), slice
geometry, rescale values, trigger time, and the series key used for grouping.

Each check raises StackReadError(path, reason) for the one file; the scan skips that file and goes
on. A value that would place or order a slice (ImagePositionPatient, ImageOrientationPatient,
TriggerTime) is never replaced by a guess: a non-finite or absurd value skips the file.
"""

from __future__ import annotations

import io
import math
import os
import zlib

import numpy as np

from stackcls.io.errors import StackReadError
from stackcls.io.limits import check_file, decoded_bytes

GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_POSITION_MM = 1e5        # |ImagePositionPatient| beyond 100 m is not a patient coordinate
MAX_PIXEL_SPACING_MM = 1e3
MAX_ABS_SLOPE = 1e6          # float32 pixels stay finite and meaningful within these
MAX_ABS_INTERCEPT = 1e7
_CHUNK = 1 << 20


def check_file_size(path: str) -> None:
    """Refuse a file larger on disk than the per-file limit before reading it."""
    check_file(path, os.path.getsize(path), "file size on disk")


def check_deflated(path: str, f, read_preamble, read_file_meta, read_dataset) -> None:
    """Deflated Explicit VR Little Endian compresses the whole dataset, and pydicom inflates it all
    at once on read. Inflate it here first, in bounded chunks, counting (not keeping) the bytes;
    the header elements before the pixel data (the first MiB inflated) are parsed on the way, so
    the declared image size is checked before the pixels are inflated at all. `f`: the file's
    bytes as a binary file object (read from its start; left wherever this stops)."""
    f.seek(0)
    head = f.read(144)  # fast path: the meta group length says where to look for the UID
    if len(head) == 144 and head[128:138] == b"DICM\x02\x00\x00\x00UL":
        n = int.from_bytes(head[140:144], "little")
        if n < 65536 and DEFLATED.encode() not in f.read(n):
            return
    f.seek(0)
    try:
        read_preamble(f, False)
        meta = read_file_meta(f)
    except Exception:  # noqa: BLE001 - not a DICOM file / bad meta: dcmread says why
        return
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total, buf, head = 0, f.read(_CHUNK), None
    try:
        while buf and not d.eof:
            out = d.decompress(buf, _CHUNK)
            total += len(out)
            if head is None:
                head = out
                _check_head(path, head, read_dataset)
            check_file(path, total, "deflated DICOM dataset (inflated so far)")
            buf = d.unconsumed_tail or f.read(_CHUNK)
    except zlib.error:
        return  # corrupt stream: dcmread reports it


def _check_head(path: str, head: bytes, read_dataset) -> None:
    """Declared size from the elements in front of PixelData; a header that does not parse from
    this much is left to the full read (whose size the inflated-bytes count bounds)."""
    try:
        ds = read_dataset(io.BytesIO(head), False, True,
                          stop_when=lambda tag, vr, length: tag >= 0x7FE00010)
        if "Rows" not in ds or "Columns" not in ds:
            return
        check_declared_size(path, ds)
    except StackReadError:
        raise
    except Exception:  # noqa: BLE001 - a value that does not parse here: the full read says why
        return


def check_declared_size(path: str, ds) -> None:
    """Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8, from the header."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if min(rows, cols, frames, spp, bits) < 0:
        raise StackReadError(path, f"negative size in the header (Rows {rows}, Columns {cols}, "
                                   f"NumberOfFrames {frames}, SamplesPerPixel {spp}, "
                                   f"BitsAllocated {bits})")
    check_file(path, decoded_bytes(rows * cols * frames * spp, bits / 8),
               f"declared image {rows} x {cols} x {frames} frame(s) x {spp} sample(s) at {bits} "
               "bits")


def float_list(ds, tag, n):
    v = ds.get(tag)
    if v is None or v == "" or (hasattr(v, "__len__") and len(v) != n):
        return None
    try:
        return [float(x) for x in (v if n > 1 else [v])]
    except (TypeError, ValueError):
        return None


def geometry(path: str, ds):
    """(ImagePositionPatient, unit normal, PixelSpacing) checked, or StackReadError."""
    missing = [t for t in GEOMETRY_TAGS if ds.get(t) in (None, "", [])]
    if missing:
        raise StackReadError(path, f"missing geometry tag(s) {', '.join(missing)} ({sop_kind(ds)}): "
                                   "cannot place the slice in a stack")
    ipp = float_list(ds, "ImagePositionPatient", 3)
    iop = float_list(ds, "ImageOrientationPatient", 6)
    ps = float_list(ds, "PixelSpacing", 2)
    if ipp is None or iop is None or ps is None:
        raise StackReadError(path, "malformed geometry tag(s): ImagePositionPatient needs 3 numbers, "
                                   "ImageOrientationPatient 6, PixelSpacing 2")
    if not all(math.isfinite(v) and abs(v) <= MAX_POSITION_MM for v in ipp):
        raise StackReadError(path, f"bad ImagePositionPatient {ipp} (NaN, infinite or beyond "
                                   f"{MAX_POSITION_MM:g} mm): cannot place the slice in a stack")
    if not all(math.isfinite(v) and 0 < v <= MAX_PIXEL_SPACING_MM for v in ps):
        raise StackReadError(path, f"bad PixelSpacing {ps} (must be finite, > 0 and at most "
                                   f"{MAX_PIXEL_SPACING_MM:g} mm)")
    # the cross product written out: np.cross costs more than the rest of the header (same floats)
    r0, r1, r2, c0, c1, c2 = iop
    normal = np.array([r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0])
    finite = all(math.isfinite(v) for v in iop)
    if finite and all(abs(v) < 1e50 for v in iop):  # nothing can overflow: no warning to silence
        nn = math.sqrt(normal.dot(normal))  # what np.linalg.norm computes, bit for bit
    else:
        with np.errstate(all="ignore"):
            nn = float(np.linalg.norm(normal))
    if not (finite and math.isfinite(nn) and nn > 0.5):
        raise StackReadError(path, f"degenerate ImageOrientationPatient {iop}")
    return np.array(ipp), normal / nn, (ps[0], ps[1])




def _number(path: str, ds, tag: str, default):
    v = ds.get(tag)
    if v in (None, ""):
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        raise StackReadError(path, f"{tag} {str(v)[:40]!r} is not a number") from None


def rescale(path: str, ds) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept): finite, slope non-zero and within +-1e6, intercept within
    +-1e7."""
    slope = _number(path, ds, "RescaleSlope", 1.0)
    intercept = _number(path, ds, "RescaleIntercept", 0.0)
    if not (math.isfinite(slope) and 0 < abs(slope) <= MAX_ABS_SLOPE):
        raise StackReadError(path, f"bad RescaleSlope {slope:g} (must be finite, non-zero and "
                                   f"within +-{MAX_ABS_SLOPE:g})")
    if not (math.isfinite(intercept) and abs(intercept) <= MAX_ABS_INTERCEPT):
        raise StackReadError(path, f"bad RescaleIntercept {intercept:g} (must be finite and within "
                                   f"+-{MAX_ABS_INTERCEPT:g})")
    return slope, intercept


def trigger_time(path: str, ds) -> float | None:
    """TriggerTime in ms (an enhanced frame's NominalCardiacTriggerDelayTime), None when absent; a
    NaN or infinite value would misorder phases."""
    tag = "TriggerTime" if "TriggerTime" in ds else "NominalCardiacTriggerDelayTime"
    t = _number(path, ds, tag, None)
    if t is not None and not math.isfinite(t):
        raise StackReadError(path, f"bad {tag} {t:g}: cannot order the cine phases")
    return t


def echo(ds) -> str | None:
    """Which echo an image belongs to: EchoNumbers, or an enhanced frame's EffectiveEchoTime (no
    EchoNumbers there); None when neither is given."""
    n = ds.get("EchoNumbers")
    if n not in (None, ""):
        return f"echo {str(n)[:16]}"
    te = ds.get("EffectiveEchoTime")
    try:
        return None if te in (None, "") else f"TE {float(te):g} ms"
    except (TypeError, ValueError):
        return None


def thickness(ds) -> float | None:
    """SliceThickness in mm, None when absent or unusable (it is never used for order)."""
    try:
        t = _number("", ds, "SliceThickness", None)
    except StackReadError:
        return None
    return t if t is not None and math.isfinite(t) and t > 0 else None


def series_group(path: str, ds) -> str:
    """SeriesInstanceUID, or for a file without one a key that keeps apart what is likely apart:
    the file's folder, SeriesNumber and SeriesDescription (slice orientation splits further)."""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    return (f"no SeriesInstanceUID: folder {os.path.dirname(os.path.abspath(path))}, SeriesNumber "
            f"{str(ds.get('SeriesNumber', '') or '?')}, SeriesDescription "
            f"{str(ds.get('SeriesDescription', '') or '')!r}")


# Image IODs built from functional groups (PS3.3 C.7.6.16): their geometry is per frame even when
# they hold one frame. Any other file is read from its top level, whatever sequences it carries.
FUNCTIONAL_GROUP_IODS = frozenset({
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",    # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",    # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.130",    # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
})


def is_functional_group_iod(ds) -> bool:
    """True for an enhanced (functional-group) image, by its SOP class."""
    sop_class = ds.get("SOPClassUID")
    if not sop_class and getattr(ds, "file_meta", None) is not None:
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID")
    return str(sop_class or "").strip() in FUNCTIONAL_GROUP_IODS


def sop_kind(ds) -> str:
    sop_class = ds.get("SOPClassUID")
    if not sop_class and getattr(ds, "file_meta", None) is not None:  # e.g. DICOMDIR
        sop_class = ds.file_meta.get("MediaStorageSOPClassUID")
    return getattr(sop_class, "name", None) or (str(sop_class) if sop_class else "unknown SOP class")


# The keywords each per-frame check reads: dicom.py computes a check once for all the frames of a
# multi-frame file that find these in the same elements (a memo; a check reading more must say so).
geometry.reads = GEOMETRY_TAGS
rescale.reads = ("RescaleSlope", "RescaleIntercept")
trigger_time.reads = ("TriggerTime", "NominalCardiacTriggerDelayTime")
echo.reads = ("EchoNumbers", "EffectiveEchoTime")
thickness.reads = ("SliceThickness",)
