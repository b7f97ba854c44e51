"""The fast DICOM paths give what the pydicom path gives: the minimal parser (io/dicom_fast.py)
against pydicom on every file bundled with pydicom and on written classic / enhanced / implicit-VR
series, and a scan in worker processes against the same scan in one process."""

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from stackcls.io import dicom as dcm
from stackcls.io import dicom_slices
from stackcls.io import dicom_series
from stackcls.io import dicom_fast
from test_io_dicom import PYDICOM_FILES, make_series
from test_io_enhanced import same_stacks, to_enhanced

ROOT = Path(__file__).resolve().parents[1]


def _pydicom_only(path):
    """read_images as before the fast parser: every file through pydicom."""
    orig = dicom_fast.parse
    dicom_fast.parse = lambda raw: None
    try:
        return _outcome(path)
    finally:
        dicom_fast.parse = orig


def _outcome(path):
    try:
        return dicom_slices.read_images(path)
    except dcm.StackReadError as e:
        return e.reason


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x.__dataclass_fields__:
            u, v = getattr(x, k), getattr(y, k)
            assert type(u) is type(v), k
            if isinstance(u, np.ndarray):
                np.testing.assert_array_equal(u, v, err_msg=k)
            else:
                assert u == v, k


def _fast_reads(path) -> bool:
    """True when the fast parser alone gives the result (no pydicom fallback)."""
    with open(path, "rb") as f:
        ds = dicom_fast.parse(f.read())
    if ds is None:
        return False
    try:
        dicom_slices._slices_from_dataset(str(path), ds)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_parser_equals_pydicom_on_pydicom_files():
    parsed = 0
    for f in PYDICOM_FILES:
        _same(_outcome(f), _pydicom_only(f))
        with open(f, "rb") as fh:
            parsed += dicom_fast.parse(fh.read()) is not None
    assert parsed >= 40  # explicit and implicit VR, sequences, private tags among them


def test_fast_parser_equals_pydicom_on_series(tmp_path):
    files = make_series(tmp_path / "c", n_slices=3, n_phases=2)
    files += make_series(tmp_path / "i", n_slices=3, n_phases=2, ts=ImplicitVRLittleEndian,
                         series="1.2.3.4.6")
    files += [to_enhanced(make_series(tmp_path / "e", n_slices=3, n_phases=2, series="1.2.3.4.7"),
                          tmp_path / "enh.dcm")]
    for f in files:
        assert _fast_reads(f), f  # the test compares the fast parser, not pydicom with itself
        _same(_outcome(f), _pydicom_only(f))


def _undefined_lengths(ds):
    """Every sequence and item of ds written with undefined length, as Siemens XA writes them."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def test_fast_parser_equals_pydicom_on_enhanced_layouts(tmp_path):
    """Multi-frame files whose frames repeat functional group items byte for byte (parsed once,
    dicom_fast._items) and rescale with negative slopes, in defined- and undefined-length layouts;
    and classic files sharing their header values (checked once per scan, dicom.check)."""
    classic = make_series(tmp_path / "c", n_slices=3, n_phases=3, slope=-2.5, intercept=0)
    classic += make_series(tmp_path / "d", n_slices=2, n_phases=2, series="1.2.3.4.8", slope=1.5,
                           intercept=-1024)
    for k, f in enumerate(classic[9:]):  # values alike up to their last byte: told apart
        ds = pydicom.dcmread(f)
        ds.RescaleSlope = f"2.5{k}"
        ds.save_as(f)
    defined = to_enhanced(classic, tmp_path / "defined.dcm")
    ds = pydicom.dcmread(defined)
    _undefined_lengths(ds)
    ds.save_as(tmp_path / "undefined.dcm", enforce_file_format=True)
    raw = (tmp_path / "undefined.dcm").read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw  # a sequence delimiter: the layout was written
    for f in [*classic, defined, str(tmp_path / "undefined.dcm")]:
        assert _fast_reads(f), f
        _same(_outcome(f), _pydicom_only(f))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mapped_files_read_as_read_files(tmp_path, monkeypatch):
    """A file from dicom_slices.MAP_MIN_BYTES is memory-mapped (its pixels views of the mapping), not
    read: the same images or reasons either way, for classic, enhanced (defined and undefined
    lengths), gzipped, pydicom-only (compressed, deflated, big endian) and truncated files, and
    the same stacks from a scan."""
    import gzip
    classic = make_series(tmp_path / "c", n_slices=3, n_phases=3)
    enhanced = to_enhanced(classic, tmp_path / "e" / "enh.dcm")
    ds = pydicom.dcmread(enhanced)
    _undefined_lengths(ds)
    ds.save_as(tmp_path / "e" / "undefined.dcm", enforce_file_format=True)
    with open(enhanced, "rb") as src, gzip.open(tmp_path / "e" / "enh.dcm.gz", "wb") as dst:
        dst.write(src.read())
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(Path(enhanced).read_bytes()[:-100])
    files = [*classic, enhanced, tmp_path / "e" / "undefined.dcm", tmp_path / "e" / "enh.dcm.gz",
             cut, *PYDICOM_FILES]
    mapped = []
    real_map = dicom_slices._map
    monkeypatch.setattr(dicom_slices, "_map", lambda f: mapped.append(r := real_map(f)) or r)
    monkeypatch.setattr(dicom_slices, "MAP_MIN_BYTES", 1 << 62)
    read = [_outcome(f) for f in files]
    scan_read = dcm.scan_dicom([str(f) for f in [*classic, enhanced]], phases="all",
                               progress=False)[0]
    assert not any(mapped)
    monkeypatch.setattr(dicom_slices, "MAP_MIN_BYTES", 0)
    for f, want in zip(files, read):
        _same(_outcome(f), want)
    assert sum(m is not None for m in mapped) >= len(files) - 2  # empty files cannot be mapped
    same_stacks(dcm.scan_dicom([str(f) for f in [*classic, enhanced]], phases="all",
                               progress=False)[0], scan_read)
    # each live mapping holds a file descriptor: past MAP_MAX_LIVE at once, files are read
    del mapped[:]
    monkeypatch.setattr(dicom_slices, "MAP_MAX_LIVE", dicom_slices._live_maps[0] + 2)
    held = [dicom_slices.read_images(f) for f in classic]
    assert [m is not None for m in mapped] == [True, True] + [False] * (len(classic) - 2)
    _same([s for sl in held for s in sl], [s for f in classic for s in _outcome(f)])
    del held, mapped[:]
    assert dicom_slices.read_images(classic[0]) and mapped[0] is not None  # released with their views


def test_rescale_into_float32():
    """DicomSlice.image_into against the plain float32 arithmetic it stands for (astype, then
    times slope, plus intercept), bit for bit: signed zeros included (a stored 0 times a negative
    slope is -0.0, and + 0 makes it +0.0)."""
    stored = np.array([[0, 1, 7], [300, 65535, 2]], np.uint16)
    for slope in (1.0, -1.0, 2.5, -2.0, 1e-3):
        for intercept in (0.0, -1024.0, 0.5):
            ref = stored.astype(np.float32)
            ref *= np.float32(slope)
            ref += np.float32(intercept)
            s = dicom_slices.DicomSlice(path="x", subject="s", study="", series="", group="",
                               series_description="", shape=stored.shape, ipp=np.zeros(3),
                               normal=np.ones(3), pixel_spacing=(1.0, 1.0), thickness=None,
                               trigger=None, instance=None, sop="", stored=stored, slope=slope,
                               intercept=intercept)
            out = s.image
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, ref)
            assert (np.signbit(out) == np.signbit(ref)).all(), (slope, intercept)


def test_fast_parser_refuses_what_it_does_not_know():
    head = b"\0" * 128 + b"DICM"
    assert dicom_fast.parse(b"") is None and dicom_fast.parse(head) is None
    f = next(p for p in PYDICOM_FILES if p.endswith("MR_small.dcm"))
    with open(f, "rb") as fh:
        raw = fh.read()
    assert dicom_fast.parse(raw) is not None
    assert dicom_fast.parse(raw[:len(raw) // 2]) is None  # truncated value
    big = next(p for p in PYDICOM_FILES if p.endswith("MR_small_bigendian.dcm"))
    with open(big, "rb") as fh:
        assert dicom_fast.parse(fh.read()) is None       # another transfer syntax


def test_pool_equals_one_process(tmp_path):
    files = make_series(tmp_path / "a", n_slices=4, n_phases=3)
    files += make_series(tmp_path / "b", n_slices=3, n_phases=3, series="1.9.2", seed=1)
    phase = make_series(tmp_path / "p", n_slices=3, n_phases=3, series="1.9.3", seed=2)
    for f in phase:  # set aside: the pool never decodes these
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        ds.save_as(f)
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    # in a fresh interpreter: this session may hold JAX's threads, and then no worker is forked
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)]),
           # series a (12 images of 32 x 32 float32: 48 KB) is over the limit, b and p (36 KB) not
           "STACKCLS_MAX_STACK_MB": str(40_000 / 2 ** 20)}
    run = subprocess.run([sys.executable, "-c", "import sys, test_io_fast as t; "
                          "t._pool_check(sys.argv[1])", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("pool ok"), run.stderr[-3000:]


def _pool_check(folder):
    warnings.simplefilter("ignore")
    folder = Path(folder)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert dcm._pool_size(files, 2) == 2
    for phases in ("all", ("ED", "ES")):
        one = dcm.scan_dicom(files, phases, progress=False, workers=1)
        pooled = dcm.scan_dicom(files, phases, progress=False, workers=2)
        same_stacks(one[0], pooled[0])
        assert sorted(one[1]) == sorted(pooled[1]) and one[2] == pooled[2]
        # automatic: a sample read here, timed, then (every file "slow") the rest in workers
        saved = dcm.POOL_MIN_FILES, dcm.POOL_SAMPLE, dcm.POOL_SLOW_FILE_S
        dcm.POOL_MIN_FILES, dcm.POOL_SAMPLE, dcm.POOL_SLOW_FILE_S = 1, 5, 0.0
        try:
            auto = dcm.scan_dicom(files, phases, progress=False)
        finally:
            dcm.POOL_MIN_FILES, dcm.POOL_SAMPLE, dcm.POOL_SLOW_FILE_S = saved
        same_stacks(one[0], auto[0])
        assert sorted(one[1]) == sorted(auto[1]) and one[2] == auto[2]
    reasons = dict(one[1])
    assert str(folder / "bad.dcm") in reasons
    assert all("per-stack limit" in r for p, r in one[1] if "/a/" in p)
    assert all("set aside" in r for p, r in one[1] if "/p/" in p)
    assert len(one[0]) == 2 and all("/b/" in s.sources[0] for s in one[0])  # series b: ED, ES
    print("pool ok")


def test_no_fork_beside_other_threads(tmp_path):
    files = [str(tmp_path / str(i)) for i in range(3)]
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert dcm._pool_size(files, 2) == 1
    finally:
        stop.set()
        t.join()


def test_small_scans_stay_in_process(tmp_path):
    files = [str(f) for f in make_series(tmp_path, n_slices=3)]
    assert dcm._pool_size(files, None) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(dcm.scan_dicom(files, progress=False)[0]) == 1


def _bright_areas_by_the_definition(cine):
    """estimate_es's threshold and per-phase areas as its docstring says, written plainly: the
    whole-image disk mask, np.histogram, Otsu's cut by brute force over the 128 bins."""
    T, S, H, W = cine.shape
    yy, xx = np.mgrid[:H, :W]
    disk = (yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2 <= (0.3 * min(H, W)) ** 2
    vals = cine[..., disk]
    hist, edges = np.histogram(vals.ravel(), bins=128)
    centers = (edges[:-1] + edges[1:]) / 2
    best, thr = -1.0, None
    for k in range(len(hist)):  # between-class variance at each cut
        w0, w1 = hist[:k + 1].sum(), hist[k + 1:].sum()
        v = 0.0
        if w0 and w1:
            mu0 = (hist[:k + 1] * centers[:k + 1]).sum() / w0
            mu1 = (hist[k + 1:] * centers[k + 1:]).sum() / w1
            v = float(w0) * float(w1) * (mu0 - mu1) ** 2
        if v > best:
            best, thr = v, centers[k]
    return thr, (vals > thr).reshape(T, -1).sum(axis=1)


def test_es_areas_equal_their_definition():
    """estimate_es's threshold and bright areas (cropped disk) against the plain definition:
    integer-valued cines (narrow, negative, wide, values on the cut) and float cines; and the
    phase chosen."""
    from stackcls.io.geometry import _bright_areas, estimate_es
    rng = np.random.default_rng(3)
    for k in range(40):
        T, S, H, W = int(rng.integers(3, 12)), int(rng.integers(2, 10)), int(rng.integers(5, 40)), \
            int(rng.integers(5, 40))
        top = [300, 4000, 65_535, 1 << 26][k % 4]
        cine = rng.integers(-top // 8 if k % 3 == 0 else 0, top, (T, S, H, W)).astype(np.float32)
        yy, xx = np.mgrid[:H, :W]
        for t in range(T):  # a bright pool whose radius changes with the phase, as in a cine
            r = min(H, W) * (0.1 + 0.15 * rng.random())
            cine[t, :, (yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= r * r] += top
        if k % 5 == 1:  # odd values 1..255 and 0, 256 in 128 bins: values on the cut (odd centres)
            cine = np.minimum(np.round(cine * (128 / cine.max())) * 2 + 1, 255)
            cine[0, 0, H // 2, W // 2], cine[-1, -1, H // 2, W // 2] = 0, 256  # in the disk
        noisy = cine + rng.normal(0, 0.3, cine.shape).astype(np.float32)
        for c in (cine, noisy):
            thr, area = _bright_areas_by_the_definition(c)
            ours = _bright_areas(c)
            assert ours[0] == thr, k
            np.testing.assert_array_equal(ours[1], area, err_msg=str(k))
        lo, hi = S // 3, max(S // 3 + 1, (2 * S + 2) // 3)
        want = 1 + int(np.argmin(_bright_areas_by_the_definition(cine[:, lo:hi])[1][1:]))
        assert estimate_es(cine)[0] == want, k


def _series(rng, T, S, H, W, dtype, slope=1.0, intercept=0.0, drop=0):
    """DicomSlices of a T-phase, S-position cine (noise plus a bright pool changing with the phase),
    `drop` images missing; and the float cine they make (dicom_series._fill_cine)."""
    from collections import defaultdict
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 5000)
    normal = np.array([0.0, 0.0, 1.0])
    yy, xx = np.mgrid[:H, :W]
    slices = []
    for t in range(T):
        r = min(H, W) * (0.1 + 0.2 * rng.random())
        pool = (yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= r * r
        for z in range(S):
            img = rng.integers(lo, (lo + hi) // 2, (H, W))
            img[pool] = rng.integers((lo + hi) // 2, hi, int(pool.sum()))
            slices.append(dicom_slices.DicomSlice(
                path=f"f{t}_{z}", subject="s", study="st", series="se", group="se",
                series_description="", shape=(H, W), ipp=np.array([0.0, 0.0, 10.0 * z]),
                normal=normal, pixel_spacing=(1.0, 1.0), thickness=10.0, trigger=40.0 * t,
                instance=t, sop=f"{t}.{z}", stored=img.astype(dtype), slope=slope,
                intercept=intercept))
    for k in rng.choice(np.arange(S, len(slices)), drop, replace=False):  # never phase 0
        slices[k] = None
    ser = dicom_series._plan([x for x in slices if x is not None], defaultdict(set), [], [])
    cine = np.empty((ser.n_phases, len(ser.centers), H, W), np.float32)
    dicom_series._fill_cine(cine, ser.timeline, ser.rank)
    return ser, cine


def test_es_from_stored_values_equals_the_cine_estimate():
    """dicom_series._stored_es (the stored integer values of the disks counted, each distinct value
    rescaled once, missing images as zeros) against estimate_es on the float cine the images make:
    unsigned and signed stored values, slopes and intercepts (negative too), images missing; and
    None where it does not apply (float stored values, two rescales, a range too wide)."""
    from stackcls.io.geometry import estimate_es
    rng = np.random.default_rng(5)
    for k in range(60):
        dtype = [np.uint16, np.int16, np.uint8, np.int32][k % 4]
        slope, intercept = [(1.0, 0.0), (2.5, -1024.0), (-0.75, 3.0), (1.0, 0.0)][k // 4 % 4]
        T, S = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        ser, cine = _series(rng, T, S, int(rng.integers(8, 40)), int(rng.integers(8, 40)), dtype,
                            slope, intercept, drop=int(rng.integers(0, 3)) if k % 3 else 0)
        assert dicom_series._stored_es(ser, [np.empty(0, np.intp)]) == estimate_es(cine), k
    for change in (lambda s: setattr(s, "stored", s.stored.astype(np.float32)),
                   lambda s: setattr(s, "slope", 2.0),
                   lambda s: setattr(s, "stored", s.stored * 100_000)):
        ser, _ = _series(rng, 5, 4, 16, 16, np.int32)
        middle = next(p for p in ser.timeline if ser.rank[p] == 1)  # slices 1..2 of 4 are read
        change(ser.timeline[middle][2])
        assert dicom_series._stored_es(ser, [np.empty(0, np.intp)]) is None


def test_integer_histogram_equals_numpy():
    """The ES threshold's histogram from a count table (geometry._histogram_of_counts: each
    distinct value binned once with its count as weight, as dicom_series._stored_es bins stored values)
    against np.histogram: counts, dtypes and edges, on negative, constant and wide ranges."""
    from stackcls.io.geometry import _histogram_of_counts
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 900, 60_000), rng.integers(-2000, 3000, 1000), np.full(100, 7),
             rng.integers(0, 65_535, 20_000), np.array([-5, 12]), np.array([3])]
    for c in cases:
        v = c.astype(np.float32).reshape(-1, 1)  # any shape: ravelled
        lo = int(c.min())
        counts = np.bincount(c - lo)  # zeros between the values: bins of absent values
        ours = _histogram_of_counts(np.arange(lo, lo + counts.size).astype(v.dtype), counts, 128)
        ref = np.histogram(v, bins=128)
        for a, b in zip(ref, ours):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
