"""DICOM element values as pydicom converts them, for dicom_fast's parser: text stripped and
split, DS/IS as numbers, binary numbers unpacked; keywords and tags looked up once; conversions
kept for a scan by their bytes (headers repeat from file to file). `Fallback` says a value needs
pydicom (text outside ASCII, whose meaning would depend on SpecificCharacterSet)."""

from __future__ import annotations

import struct

_BINARY = {"OB", "OW", "UN", "OD", "OF", "OL", "OV"}



_tags_cache: dict = {}


_TEXT = {"SH", "LO", "UC", "PN"}            # pydicom convert_text: split, each rstrip("\0 ")



_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}     # one value, rstrip("\0 ")



_STRING = {"AE", "AS", "CS", "DA", "DT", "TM", "UI"}  # whole value rstrip(" \0"), then split



_NUMBERS = {vr: (fmt, struct.calcsize(fmt)) for vr, fmt in
            {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q",
             "SV": "q"}.items()}



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



# Values converted once per scan, not once per file: most header values (UIDs, orientation,
# spacing, sizes) repeat from file to file. Keyed by (VR, bytes); a list is copied out (the caller
# owns it).
_converted: dict = {}



_CONVERTED_MAX = 1 << 16



_CONVERTED_BYTES = 128



def _convert(vr: str, raw: bytes):
    if vr == "??":
        raise Fallback("ambiguous VR")
    if vr in _BINARY:
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



def tag_of(key) -> int | None:
    """The tag of a keyword (None for an unknown one); a tag as it is."""
    tag = _tag_cache.get(key)
    if tag is None:
        tag = _tag(key) if key.__class__ is str else key
    return tag



def tags_of(keys: tuple) -> tuple:
    """tag_of for each of `keys` (a tuple, looked up once)."""
    tags = _tags_cache.get(keys)
    if tags is None:
        tags = _tags_cache[keys] = tuple(tag_of(k) for k in keys)
    return tags
