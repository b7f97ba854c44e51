"""Fuzzing the readers, bounded and deterministic (about a minute in all): mutated DICOM headers
and pixel data, mutated NIfTI headers, random labels CSVs.

The contract under fuzzing: `scan` raises nothing but `StackReadError`; every skipped file carries
a reason; an accepted DICOM stack is never misordered (each file of the base series knows its
apex-to-base rank); a labels CSV either loads or fails with `StackReadError`; memory stays bounded.
"""

import gzip
import struct
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackcls.io import StackReadError, load_labels, scan
from stackcls.stack import CLASSES
from test_io_dicom import make_series   # the DICOM series writer of the reader's tests

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MAX_PEAK_BYTES = 256 * 2**20          # the base inputs are a few KB; nothing may balloon
N_SLICES = 6


@contextmanager
def bounded_memory():
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"peak memory {peak / 2**20:.0f} MB"


def scan_contract(path):
    """scan's promises, whatever the input; returns the result (None if it raised StackReadError)."""
    try:
        res = scan(path, progress=False)
    except StackReadError as e:
        assert e.reason
        return None
    for p, reason in res.skipped:
        assert isinstance(reason, str) and reason.strip(), f"{p} skipped without a reason"
    return res


# ----------------------------------------------------------------------------- DICOM

BAD_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "", "abc", "0", "-1"])
TAG_VALUES = {
    "ImagePositionPatient": st.lists(BAD_NUMBERS, min_size=0, max_size=4),
    "ImageOrientationPatient": st.one_of(st.lists(BAD_NUMBERS, min_size=0, max_size=7),
                                         st.just(["0", "0", "0", "0", "0", "0"])),
    "PixelSpacing": st.lists(BAD_NUMBERS, min_size=0, max_size=3),
    "RescaleSlope": BAD_NUMBERS,
    "RescaleIntercept": BAD_NUMBERS,
    "TriggerTime": BAD_NUMBERS,
    "Rows": st.sampled_from([0, 1, 31, 33, 4096, 65535]),
    "Columns": st.sampled_from([0, 1, 31, 33, 4096, 65535]),
    "BitsAllocated": st.sampled_from([0, 1, 7, 12, 32, 64]),
    "BitsStored": st.sampled_from([0, 1, 17, 64]),
    "SamplesPerPixel": st.sampled_from([0, 3, 4]),
    "NumberOfFrames": st.sampled_from([0, 2, 100000]),
    "SeriesInstanceUID": st.sampled_from(["", "1.2.3.4.5.6"]),
    "PatientID": st.sampled_from(["", "../../x", "=1+1", "\x00"]),
}
HEADER = st.tuples(st.just("set"), st.sampled_from(sorted(TAG_VALUES)), st.data())
DELETE = st.tuples(st.just("delete"), st.sampled_from(sorted(TAG_VALUES)), st.none())
BYTES = st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                             min_size=1, max_size=20), st.none())
TRUNCATE = st.tuples(st.just("truncate"), st.floats(0.0, 0.999), st.none())


def mutate_dicom(path: Path, kind, what, extra):
    if kind in ("bytes", "truncate"):
        raw = bytearray(path.read_bytes())
        if kind == "truncate":
            raw = raw[:int(len(raw) * what)]
        else:
            for pos, val in what:
                raw[132 + pos % max(1, len(raw) - 132)] = val     # keep the preamble and 'DICM'
        path.write_bytes(bytes(raw))
        return
    ds = pydicom.dcmread(path)
    if kind == "delete":
        if what in ds:
            delattr(ds, what)
    else:
        value = extra.draw(TAG_VALUES[what])
        if what in ds:
            delattr(ds, what)
        try:
            ds.add_new(what, pydicom.datadict.dictionary_VR(what), value)
        except ValueError:                    # pydicom will not even hold it as a number:
            text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
            ds.add_new(what, "LO", text)      # the file declares it as text, as broken writers do
    ds.save_as(path)


@pytest.fixture(autouse=True, scope="module")
def _lenient_pydicom():
    """Let the fuzzer write values a scanner should not (pydicom would refuse them on write)."""
    cfg = pydicom.config.settings
    old = cfg.writing_validation_mode, cfg.reading_validation_mode
    cfg.writing_validation_mode = cfg.reading_validation_mode = pydicom.config.IGNORE
    yield
    cfg.writing_validation_mode, cfg.reading_validation_mode = old


@FUZZ
@given(target=st.integers(0, N_SLICES - 1), mutation=st.one_of(HEADER, DELETE, BYTES, TRUNCATE),
       second=st.one_of(st.none(), HEADER, DELETE))
def test_mutated_dicom_series(target, mutation, second):
    with tempfile.TemporaryDirectory() as d:
        files = [Path(f) for f in make_series(Path(d) / "s", n_slices=N_SLICES)]   # rank k = files[k]
        rank = {str(f): k for k, f in enumerate(files)}
        mutate_dicom(files[target], *mutation)
        if second is not None:
            mutate_dicom(files[(target + 3) % N_SLICES], *second)
        with bounded_memory():
            res = scan_contract(Path(d) / "s")
        if res is None or mutation[0] in ("bytes", "truncate"):
            return          # a flipped byte may sit in the pixels or the geometry: no order truth
        for stack in res.stacks:
            ranks = [rank[s] for s in stack.sources]
            assert ranks == sorted(ranks), f"misordered after {mutation[:2]}: {ranks}"
            assert np.isfinite(stack.images).all()


# ----------------------------------------------------------------------------- NIfTI

# (offset, struct format) of NIfTI-1 header fields a broken converter gets wrong
NIFTI_FIELDS = {
    "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"),
    "srow": (280, "<12f"),
}
INT16 = st.sampled_from([-32768, -1, 0, 1, 2, 3, 4, 5, 7, 16, 64, 256, 512, 2304, 30000, 32767])
FLOAT = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30, 1e-30]),
                  st.floats(-1e4, 1e4))


@FUZZ
@given(field=st.sampled_from(sorted(NIFTI_FIELDS)), data=st.data(), gz=st.booleans())
def test_mutated_nifti_header(field, data, gz):
    off, fmt = NIFTI_FIELDS[field]
    n = struct.calcsize(fmt) // struct.calcsize(fmt[-1])
    values = [data.draw(INT16 if fmt[-1] == "h" else FLOAT) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        vol = np.random.default_rng(0).random((16, 12, 5)).astype(np.float32)
        p = Path(d) / "s.nii"
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 8.0, 1.0])), str(p))
        raw = bytearray(p.read_bytes())
        raw[off:off + struct.calcsize(fmt)] = struct.pack(fmt, *values)
        if gz:
            p = p.with_suffix(".nii.gz")
            p.write_bytes(gzip.compress(bytes(raw)))
        else:
            p.write_bytes(bytes(raw))
        with bounded_memory():
            res = scan_contract(p)
        for stack in (res.stacks if res else []):
            assert np.isfinite(stack.images).all() and stack.n_slices >= 2


# ----------------------------------------------------------------------------- labels CSV

CSV_TEXT = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=st.sampled_from(list("subjectframphslielabOAPINBS,;\"'\n\r\t =+-@0123456789\x00é")),
            max_size=300),
    st.lists(st.tuples(st.sampled_from(["s1", "", "=1", "s\x002"]), st.sampled_from(["", "1", "x", "-3"]),
                       st.sampled_from(["ED", "ES", ""]), st.sampled_from(["0", "1", "1.5", ""]),
                       st.sampled_from(["IN", "OAP", "OBS", "in", ""])), max_size=8).map(
        lambda rows: "subject,frame,phase,slice,label\n" + "".join(",".join(r) + "\n" for r in rows)),
)


@FUZZ
@given(content=CSV_TEXT)
def test_random_labels_csv(content):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "labels.csv"
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        try:
            rows = load_labels(p)
        except StackReadError as e:
            assert str(p) in str(e) and e.reason
            return
        assert all(r.label in CLASSES for r in rows)
