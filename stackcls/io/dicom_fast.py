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

What makes it cheap: an element is parsed to (VR, start, end) in the file's bytes and converted
when first read; a conversion is kept for the scan by its bytes (headers repeat from file to file);
an item whose bytes repeat an item of the same file (an enhanced file's frames repeat most of their
functional groups) is that item's dataset again; the pixel data is a view of the file's bytes.
"""

from __future__ import annotations

import struct

from stackcls.io.dicom_values import (_BINARY, _CONVERTED_BYTES, _CONVERTED_MAX, Fallback, _convert,
                                       _converted, _implicit_vr, _keyword, _tag, _tag_cache, tag_of,
                                       tags_of)

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
_U32 = struct.Struct("<I")
_TAG_LEN_EXPLICIT = struct.Struct("<HH2sH")
_TAG_LEN_IMPLICIT = struct.Struct("<HHI")


_VRS = {v: (v.decode(), v in _LONG_VRS) for v in _LONG_VRS | _SHORT_VRS}
_VIEW_BYTES = 1 << 16   # a binary value this long (the pixel data) is a view of the file, no copy
_MISSING = object()
_MEMO_TRIES = 8        # undefined-length items compared against per first bytes (see _items)


def _value(raw: bytes, vr: str, a, b: int):
    """The value of the element whose bytes are raw[a:b] (for a sequence, `a` is its items)."""
    if vr == "SQ":
        return a
    if b - a > _CONVERTED_BYTES:
        if vr in _BINARY and b - a >= _VIEW_BYTES:
            return memoryview(raw)[a:b]
        return _convert(vr, raw[a:b])
    key = (vr, raw[a:b])
    v = _converted.get(key, _MISSING)
    if v is _MISSING:
        v = _convert(vr, key[1])
        if len(_converted) >= _CONVERTED_MAX:
            _converted.clear()
        _converted[key] = v
    return list(v) if v.__class__ is list else v


class FastElement:
    """One element of a FastDataset, as `ds[key]` and iteration give it: tag, VR, keyword, value."""

    __slots__ = ("tag", "VR", "_ds")

    def __init__(self, tag: int, vr: str, ds: "FastDataset"):
        self.tag, self.VR, self._ds = tag, vr, ds

    @property
    def keyword(self) -> str:
        return _keyword(self.tag)

    @property
    def value(self):
        return self._ds.get(self.tag)


class FastDataset:
    """The pydicom Dataset surface the readers use, over parsed elements: tag -> (VR, start, end)
    of the value in the file's bytes (a sequence: ("SQ", items, 0)), converted when first read."""

    __slots__ = ("_elems", "_raw", "_vals", "_owner", "file_meta")

    def __init__(self, elems: dict, raw: bytes, file_meta=None):
        self._elems, self._raw, self._vals, self.file_meta = elems, raw, {}, file_meta
        self._owner = None

    def first_items(self) -> list:
        """The first item of each non-empty sequence, in tag order (the functional groups of an
        enhanced frame)."""
        return [e[1][0] for e in self._elems.values() if e[0] == "SQ" and e[1]]

    def sources(self, keys) -> tuple | None:
        """The (VR, bytes) of each of `keys` (None where absent): what their values are made from,
        so that equal sources mean equal values, in any file. None if one is a sequence."""
        out = []
        for tag in tags_of(keys):
            e = self._elems.get(tag)
            if e is None:
                out.append(None)
            elif e[0] == "SQ":
                return None
            else:
                out.append((e[0], self._raw[e[1]:e[2]]))
        return tuple(out)

    def get(self, key, default=None):
        v = self._vals.get(key, _MISSING)  # by the key asked with: a keyword or a tag
        if v is not _MISSING:
            return v
        tag = _tag_cache.get(key)
        if tag is None:
            if key.__class__ is not str:
                tag = key
            elif (tag := _tag(key)) is None:
                return default
        e = self._elems.get(tag)
        if e is None:
            return default
        v = self._vals[key] = _value(self._raw, *e)
        return v

    def __contains__(self, key) -> bool:
        return tag_of(key) in self._elems

    def owner_index(self) -> dict:
        """tag -> this dataset, for each of its elements. Kept: the items an enhanced file repeats
        frame after frame are one dataset (see _items), indexed once."""
        if self._owner is None:
            self._owner = dict.fromkeys(self._elems, self)
        return self._owner

    def __getitem__(self, key):
        tag = tag_of(key)
        e = self._elems.get(tag)
        if e is None:
            raise KeyError(key)
        return FastElement(tag, e[0], self)

    def __getattr__(self, name):
        if name.startswith("_") or not name[:1].isupper():
            raise AttributeError(name)
        tag = _tag(name)
        if tag is None or tag not in self._elems:
            raise AttributeError(name)
        return self.get(tag)

    def __iter__(self):
        return (FastElement(tag, e[0], self) for tag, e in self._elems.items())

    def __len__(self) -> int:
        return len(self._elems)


def _dataset(raw: bytes, p: int, end: int, implicit: bool, depth: int, memo: dict,
             stop_tag: int | None = None) -> tuple[dict, int]:
    """Elements from raw[p:end] (to an item delimiter when stop_tag is given); (elements, end)."""
    elems = {}
    while p < end:
        if p + 8 > end:
            raise Fallback("truncated element")
        if implicit:
            g, e, length = _TAG_LEN_IMPLICIT.unpack_from(raw, p)
            tag = g << 16 | e
            p += 8
            vr = "SQ" if length == _UNDEFINED else _implicit_vr(tag)
        else:
            g, e, vrb, length = _TAG_LEN_EXPLICIT.unpack_from(raw, p)
            tag = g << 16 | e
            if g == 0xFFFE:  # item / delimiter tags carry no VR
                length = _U32.unpack_from(raw, p + 4)[0]
                p += 8
                vr = ""
            else:
                info = _VRS.get(vrb)
                if info is None:
                    raise Fallback(f"unknown VR {vrb!r}")
                vr, long = info
                if long:
                    if p + 12 > end:
                        raise Fallback("truncated element")
                    length = _U32.unpack_from(raw, p + 8)[0]
                    p += 12
                else:
                    p += 8
        if tag == stop_tag:
            return elems, p
        if g == 0xFFFE:
            raise Fallback("stray item tag")
        if length == _UNDEFINED:
            if vr not in ("SQ", "UN") or depth >= _MAX_DEPTH:
                raise Fallback("undefined length")
            items, p = _items(raw, p, len(raw), implicit or vr == "UN", depth + 1, None, memo)
            elems[tag] = ("SQ", items, 0)
            continue
        if p + length > end:
            raise Fallback("value past the end")
        if vr == "SQ":
            if depth >= _MAX_DEPTH:
                raise Fallback("nested too deep")
            items, _ = _items(raw, p, p + length, implicit, depth + 1, p + length, memo)
            elems[tag] = ("SQ", items, 0)
        else:
            elems[tag] = (vr, p, p + length)
        p += length
    if stop_tag is not None:
        raise Fallback("no item delimiter")
    return elems, p


def _items(raw: bytes, p: int, end: int, implicit: bool, depth: int, bound: int | None,
           memo: dict):
    """Sequence items from p: up to `bound`, or to the sequence delimiter when bound is None.

    An item whose bytes equal an item parsed before in this file is that item's dataset again
    (`memo`): the frames of an enhanced file repeat most functional group items byte for byte.
    Exact: parsing reads nothing past where it stops, and every bound it checks lies past that."""
    items = []
    while bound is None or p < bound:
        if p + 8 > end:
            raise Fallback("truncated sequence")
        g, e, length = _TAG_LEN_IMPLICIT.unpack_from(raw, p)
        tag = g << 16 | e
        start = p
        p += 8
        if tag == _SEQ_END and bound is None:
            return items, p
        if tag != _ITEM:
            raise Fallback("not an item")
        if length == _UNDEFINED:
            # same start, same bytes up to the delimiter: look up by the first bytes, then compare
            key = (implicit, depth, raw[start:start + 32])
            for seen, ds in memo.get(key, ()):
                if start + len(seen) <= end and raw[start:start + len(seen)] == seen:
                    items.append(ds)
                    p = start + len(seen)
                    break
            else:
                elems, p = _dataset(raw, p, end, implicit, depth, memo, _ITEM_END)
                ds = FastDataset(elems, raw)
                items.append(ds)
                tries = memo.setdefault(key, [])
                tries.append((raw[start:p], ds))
                if len(tries) > _MEMO_TRIES:  # items alike in their first bytes only: a bounded
                    del tries[0]              # search, not one growing with the frames
            continue
        if p + length > end:
            raise Fallback("item past the end")
        key = (implicit, depth, raw[start:p + length])
        ds = memo.get(key)
        if ds is None:
            elems, stop = _dataset(raw, p, p + length, implicit, depth, memo)
            ds = FastDataset(elems, raw)
            if stop == p + length:  # read nothing past the item (see above)
                memo[key] = ds
        items.append(ds)
        p += length
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
        memo: dict = {}
        meta, _ = _dataset(raw, 132, meta_end, False, _MAX_DEPTH, memo)
        ts = FastDataset(meta, raw).get(0x00020010)
        if ts not in (EXPLICIT_LE, IMPLICIT_LE):
            return None
        elems, _ = _dataset(raw, meta_end, len(raw), ts == IMPLICIT_LE, 0, memo)
        # meta elements after the meta group: odd file (min first: the loop only for odd files)
        if elems and min(elems) >> 16 <= 2 and any(t >> 16 == 2 for t in elems):
            return None
    except (Fallback, struct.error, UnicodeDecodeError):
        return None
    return FastDataset(elems, raw, {"TransferSyntaxUID": _uid(ts)})


_uids: dict = {}


def _uid(ts: str):
    if ts not in _uids:
        from pydicom.uid import UID
        _uids[ts] = UID(ts)
    return _uids[ts]
