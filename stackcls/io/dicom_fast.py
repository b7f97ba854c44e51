"""A minimal DICOM parser for the files most scans hold: uncompressed little-endian (explicit or
implicit VR), well formed. pydicom spends most of a scan's time building its element objects
(about 1.5 ms a file); this walks the bytes once with struct and converts only the values read.

`parse(raw)` returns a `FastDataset` that the readers use like a pydicom Dataset (`get`, `in`,
`[]`, attribute access by keyword, iteration, sequences as lists of datasets), or None whenever the
file is anything else: no 'DICM' preamble, another transfer syntax (deflated, big endian,
compressed), an unknown VR, a length past the end, nesting deeper than _MAX_DEPTH. Values are
converted as pydicom converts them (text stripped of trailing spaces and NULs, DS/IS as numbers,
multiple values split on backslash); a text value with bytes outside ASCII raises `Fallback`, as
its meaning would depend on SpecificCharacterSet. The caller reads with pydicom whenever this
returns None or anything raises, so a file this cannot read exactly is read as before.
"""

from __future__ import annotations

import struct

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
_MAX_DEPTH = 8
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# explicit VR: these have 2 reserved bytes and a 4-byte length
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_TEXT = {"SH", "LO", "UC", "PN"}            # pydicom convert_text: split, each rstrip("\0 ")
_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}     # one value, rstrip("\0 ")
_STRING = {"AE", "AS", "CS", "DA", "DT", "TM", "UI"}  # whole value rstrip(" \0"), then split
_NUMBERS = {vr: (fmt, struct.calcsize(fmt)) for vr, fmt in
            {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q",
             "SV": "q"}.items()}
_U32 = struct.Struct("<I")
_TAG_LEN_EXPLICIT = struct.Struct("<HH2sH")
_TAG_LEN_IMPLICIT = struct.Struct("<HHI")


class Fallback(Exception):
    """This file or value needs pydicom."""


_keyword_cache: dict[int, str] = {}
_tag_cache: dict[str, int | None] = {}
_vr_cache: dict[int, str] = {}


def _keyword(tag: int) -> str:
    kw = _keyword_cache.get(tag)
    if kw is None:
        from pydicom.datadict import keyword_for_tag
        kw = _keyword_cache[tag] = keyword_for_tag(tag) or ""
    return kw


def _tag(keyword: str) -> int | None:
    if keyword not in _tag_cache:
        from pydicom.datadict import tag_for_keyword
        _tag_cache[keyword] = tag_for_keyword(keyword)
    return _tag_cache[keyword]


def _implicit_vr(tag: int) -> str:
    vr = _vr_cache.get(tag)
    if vr is None:
        from pydicom.datadict import dictionary_VR
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        if tag == 0x7FE00010:  # PixelData, 'OB or OW': the bytes either way
            vr = "OW"
        elif " or " in vr:  # e.g. 'US or SS' (depends on PixelRepresentation): reading the value
            vr = "??"       # is left to pydicom
        _vr_cache[tag] = vr
    return vr


def _ascii(b: bytes) -> str:
    if not b.isascii() or b"\x1b" in b:
        raise Fallback("text outside ASCII")
    return b.decode("ascii")


class FastElement:
    __slots__ = ("tag", "VR", "_raw", "_items", "_value", "_done")

    def __init__(self, tag: int, vr: str, raw: bytes | None, items=None):
        self.tag, self.VR, self._raw, self._items, self._done = tag, vr, raw, items, False

    @property
    def keyword(self) -> str:
        return _keyword(self.tag)

    @property
    def value(self):
        if not self._done:
            self._value, self._done = self._convert(), True
        return self._value

    def _convert(self):
        vr, raw = self.VR, self._raw
        if vr == "SQ":
            return self._items
        if vr == "??":
            raise Fallback("ambiguous VR")
        if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
            return raw
        if not raw:  # pydicom: empty text is '', an empty number None
            return "" if vr in _TEXT or vr in _SINGLE_TEXT or vr in _STRING else None
        if vr in _NUMBERS:
            fmt, size = _NUMBERS[vr]
            n = len(raw) // size
            if n * size != len(raw):
                raise Fallback("odd number length")
            vals = struct.unpack(f"<{n}{fmt}", raw)
            return vals[0] if n == 1 else list(vals)
        s = _ascii(raw)
        if vr == "DS" or vr == "IS":
            parts = [p.strip() for p in s.split("\\")]
            if any(not p for p in parts):
                raise Fallback("empty number in a list")
            conv = float if vr == "DS" else _int
            vals = [conv(p) for p in parts]
            return vals[0] if len(vals) == 1 else vals
        if vr in _TEXT:
            parts = [p.rstrip("\0 ") for p in s.split("\\")]
            return parts[0] if len(parts) == 1 else parts
        if vr in _SINGLE_TEXT:
            return s.rstrip("\0 ")
        if vr in _STRING:
            parts = s.rstrip(" \0").split("\\")
            return parts[0] if len(parts) == 1 else parts
        raise Fallback(f"VR {vr}")


def _int(s: str) -> int:
    """IS as pydicom reads it: an integer, or a float string with an integral value ('3.0')."""
    try:
        return int(s)
    except ValueError:
        f = float(s)
        if not f.is_integer():
            raise
        return int(f)


class FastDataset:
    """The pydicom Dataset surface the readers use, over parsed elements (tag -> FastElement)."""

    def __init__(self, elems: dict, file_meta=None):
        self._elems = elems
        self.file_meta = file_meta

    def _elem(self, key):
        tag = _tag(key) if isinstance(key, str) else key
        return None if tag is None else self._elems.get(tag)

    def __contains__(self, key) -> bool:
        return self._elem(key) is not None

    def __getitem__(self, key):
        e = self._elem(key)
        if e is None:
            raise KeyError(key)
        return e

    def get(self, key, default=None):
        e = self._elem(key)
        return default if e is None else e.value

    def __getattr__(self, name):
        if name.startswith("_") or not name[:1].isupper():
            raise AttributeError(name)
        e = self._elem(name)
        if e is None:
            raise AttributeError(name)
        return e.value

    def __iter__(self):
        return iter(self._elems.values())

    def __len__(self) -> int:
        return len(self._elems)


def _dataset(raw: bytes, p: int, end: int, implicit: bool, depth: int,
             stop_tag: int | None = None) -> tuple[dict, int]:
    """Elements from raw[p:end] (to an item delimiter when stop_tag is given); (elements, end)."""
    elems = {}
    while p < end:
        if implicit:
            if p + 8 > end:
                raise Fallback("truncated element")
            g, e, length = _TAG_LEN_IMPLICIT.unpack_from(raw, p)
            tag = g << 16 | e
            p += 8
            vr = "SQ" if length == _UNDEFINED else _implicit_vr(tag)
        else:
            if p + 8 > end:
                raise Fallback("truncated element")
            g, e, vrb, length = _TAG_LEN_EXPLICIT.unpack_from(raw, p)
            tag = g << 16 | e
            if g == 0xFFFE:  # item / delimiter tags carry no VR
                length = _U32.unpack_from(raw, p + 4)[0]
                p += 8
                vr = ""
            elif vrb in _SHORT_VRS:
                p += 8
                vr = vrb.decode()
            elif vrb in _LONG_VRS:
                if p + 12 > end:
                    raise Fallback("truncated element")
                length = _U32.unpack_from(raw, p + 8)[0]
                p += 12
                vr = vrb.decode()
            else:
                raise Fallback(f"unknown VR {vrb!r}")
        if tag == stop_tag:
            return elems, p
        if g == 0xFFFE:
            raise Fallback("stray item tag")
        if length == _UNDEFINED:
            if vr not in ("SQ", "UN") or depth >= _MAX_DEPTH:
                raise Fallback("undefined length")
            items, p = _items(raw, p, len(raw), implicit or vr == "UN", depth + 1, None)
            elems[tag] = FastElement(tag, "SQ", None, items)
            continue
        if p + length > end:
            raise Fallback("value past the end")
        if vr == "SQ":
            if depth >= _MAX_DEPTH:
                raise Fallback("nested too deep")
            items, _ = _items(raw, p, p + length, implicit, depth + 1, p + length)
            elems[tag] = FastElement(tag, "SQ", None, items)
        else:
            elems[tag] = FastElement(tag, vr, raw[p:p + length])
        p += length
    if stop_tag is not None:
        raise Fallback("no item delimiter")
    return elems, p


def _items(raw: bytes, p: int, end: int, implicit: bool, depth: int, bound: int | None):
    """Sequence items from p: up to `bound`, or to the sequence delimiter when bound is None."""
    items = []
    while bound is None or p < bound:
        if p + 8 > end:
            raise Fallback("truncated sequence")
        g, e, length = _TAG_LEN_IMPLICIT.unpack_from(raw, p)
        tag = g << 16 | e
        p += 8
        if tag == _SEQ_END and bound is None:
            return items, p
        if tag != _ITEM:
            raise Fallback("not an item")
        if length == _UNDEFINED:
            elems, p = _dataset(raw, p, end, implicit, depth, _ITEM_END)
        else:
            if p + length > end:
                raise Fallback("item past the end")
            elems, _ = _dataset(raw, p, p + length, implicit, depth)
            p += length
        items.append(FastDataset(elems))
    return items, p


def parse(raw: bytes) -> FastDataset | None:
    """The dataset of a well-formed uncompressed little-endian DICOM file, else None."""
    if len(raw) < 144 or raw[128:132] != b"DICM":
        return None
    try:
        # the meta group is explicit VR little endian; its length element says where it ends
        g, e, vrb, n = _TAG_LEN_EXPLICIT.unpack_from(raw, 132)
        if (g, e, vrb, n) != (2, 0, b"UL", 4):
            return None
        meta_end = 144 + _U32.unpack_from(raw, 140)[0]
        if meta_end > len(raw):
            return None
        meta, _ = _dataset(raw, 132, meta_end, False, _MAX_DEPTH)
        ts_elem = meta.get(0x00020010)
        if ts_elem is None:
            return None
        ts = ts_elem.value
        if ts not in (EXPLICIT_LE, IMPLICIT_LE):
            return None
        elems, _ = _dataset(raw, meta_end, len(raw), ts == IMPLICIT_LE, 0)
        if any(t >> 16 == 2 for t in elems):  # meta elements after the meta group: odd file
            return None
    except (Fallback, struct.error, UnicodeDecodeError):
        return None
    return FastDataset(elems, {"TransferSyntaxUID": _uid(ts)})


_uids: dict = {}


def _uid(ts: str):
    if ts not in _uids:
        from pydicom.uid import UID
        _uids[ts] = UID(ts)
    return _uids[ts]
