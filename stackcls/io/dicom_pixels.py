"""DICOM pixel data -> numpy: the stored values of a file's frames (a fast path for plain
little-endian grey data, pydicom's decoders for the rest, with the decoder to install named when
one is missing), and PixelStore, the large buffers a scan's arrays are cut from."""

from __future__ import annotations

import functools

import numpy as np

from stackcls.io.errors import StackReadError



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
