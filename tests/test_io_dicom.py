"""DICOM reading: apex->base order from geometry, cine phases, and every kind of bad input.

Series are written from scratch with pydicom. Each image carries its truth in its pixels:
pixel [0, 0] = apex-to-base rank, pixel [0, 1] = temporal index, so order checks do not depend on
the code under test. The blood pool (a bright central disk) is smallest at phase T // 2.
"""

import glob
import os
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit,
                         MRImageStorage, generate_uid)

from stackcls.io import StackReadError, load_stacks, scan
from stackcls.io.dicom_pixels import _native_pixels
from stackcls.io.geometry import APEX_DIRECTION, estimate_es
from stackcls.io.limits import max_file_bytes

H = W = 32


def write_mr(path, *, patient="P1", study=None, series=None, iop, ipp, trigger=None, sliceloc=None,
             instance=1, pixels, slope=None, intercept=None, drop=(), ts=ExplicitVRLittleEndian,
             sop_class=MRImageStorage, pixel_bytes=None):
    """Write one classic single-frame MR image (16-bit unsigned) with the given geometry."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    sop = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study or "1.2.3.4"
    ds.SeriesInstanceUID = series or "1.2.3.4.5"
    ds.Modality = "MR"
    ds.PatientID = patient
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.PixelSpacing = ["1.5", "1.5"]
    ds.SliceThickness = "8"
    if trigger is not None:
        ds.TriggerTime = f"{trigger:.1f}"
    if sliceloc is not None:
        ds.SliceLocation = f"{sliceloc:.4f}"
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
    else:
        ds.PixelData = np.ascontiguousarray(pixels).astype("<u2").tobytes()
    for tag in drop:
        delattr(ds, tag)
    ds.save_as(path, enforce_file_format=True)
    return path


def rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def image(rank, t, n_phases):
    """Truth in pixel [0, 0] / [0, 1]; a central blood pool smallest at t = T // 2."""
    img = np.full((H, W), 100, np.uint16)
    r = 6 + 3 * np.cos(2 * np.pi * t / max(n_phases, 1))
    yy, xx = np.mgrid[:H, :W]
    img[(yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= r * r] = 1000
    img[0, 0], img[0, 1] = rank, t
    return img


def make_series(folder, *, n_slices=8, n_phases=1, tilt=(0.0, (0, 0, 1)), flip=False, sliceloc_sign=1,
                spacing=10.0, shuffle_instances=False, seed=0, names=None, **kw):
    """A short-axis stack, apex rank 0 first. The long axis (apex -> base) is -APEX_DIRECTION
    rotated by `tilt` (degrees, axis); `flip` makes the slice normal point towards the apex."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    u = rotation(tilt[1], tilt[0]) @ (-APEX_DIRECTION)
    row = np.cross(u, [0.3, 0.2, 0.9])
    row /= np.linalg.norm(row)
    col = np.cross(u, row) if not flip else np.cross(row, u)
    normal = np.cross(row, col)
    apex = np.array([20.0, -30.0, -40.0])
    n = n_slices * n_phases
    instances = rng.permutation(n) + 1 if shuffle_instances else np.arange(n) + 1
    files, i = [], 0
    for k in range(n_slices):
        centre = apex + k * spacing * u
        ipp = centre - (W / 2) * 1.5 * row - (H / 2) * 1.5 * col
        for t in range(n_phases):
            name = names(k, t) if names else f"{rng.integers(1 << 40):010x}"
            files.append(write_mr(folder / name, iop=[*row, *col], ipp=ipp,
                                  trigger=None if n_phases == 1 and kw.get("no_trigger") else 40.0 * t,
                                  sliceloc=sliceloc_sign * float(ipp @ normal),
                                  instance=int(instances[i]), pixels=image(k, t, n_phases),
                                  **{a: b for a, b in kw.items() if a != "no_trigger"}))
            i += 1
    return files


def truth(st):
    return st.images[:, 0, 0].astype(int).tolist(), st.images[:, 0, 1].astype(int).tolist()


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("sliceloc_sign", [1, -1])
@pytest.mark.parametrize("tilt", [(0.0, (0, 0, 1)), (25.0, (1, 2, 0)), (-30.0, (0, 1, 1))])
def test_apex_to_base_order_from_geometry(tmp_path, flip, sliceloc_sign, tilt):
    files = make_series(tmp_path, n_slices=9, flip=flip, sliceloc_sign=sliceloc_sign, tilt=tilt,
                        shuffle_instances=True, seed=3)
    rng = np.random.default_rng(1)
    for src in (tmp_path, [str(f) for f in rng.permutation(files)], [str(f) for f in files[::-1]]):
        (st,) = load_stacks(src)
        ranks, phases = truth(st)
        assert ranks == list(range(9)) and phases == [0] * 9
        assert st.orientation_known and st.slice_ids == list(range(9))
        np.testing.assert_allclose(np.diff(st.positions), 10.0, atol=1e-3)
        assert st.spacing == pytest.approx((1.5, 1.5, 10.0), abs=1e-3)
        assert st.sources[0] in map(str, files) and st.subject == "P1"


def test_cine_phases_ed_es(tmp_path):
    make_series(tmp_path, n_slices=6, n_phases=8, shuffle_instances=True)
    ed, es = load_stacks(tmp_path)
    assert (ed.phase, ed.frame, es.phase, es.frame) == ("ED", 0, "ES", 4)
    assert truth(ed) == (list(range(6)), [0] * 6) and truth(es) == (list(range(6)), [4] * 6)
    assert "estimated" in es.meta["es_source"] and es.meta["phase_source"] == "TriggerTime"
    allp = load_stacks(tmp_path, phases="all")
    assert [s.phase for s in allp] == ["ED", "1", "2", "3", "ES", "5", "6", "7"]
    assert [truth(s)[1][0] for s in allp] == list(range(8))
    ed, es = load_stacks(tmp_path, es=3)
    assert es.frame == 3 and truth(es)[1] == [3] * 6 and es.meta["es_source"] == "given by the caller"
    (only,) = load_stacks(tmp_path, phases=(5,))
    assert only.phase == "5" and truth(only)[1] == [5] * 6


def test_estimate_es_reference():
    # pool radius shrinks to its minimum at t=7 of 20 and grows back; noise on top
    rng = np.random.default_rng(0)
    T, S = 20, 9
    cine = np.full((T, S, 48, 48), 80.0) + rng.normal(0, 10, (T, S, 48, 48))
    yy, xx = np.mgrid[:48, :48]
    for t in range(T):
        r = 12 - 6 * np.exp(-((t - 7) / 3.0) ** 2)
        cine[t, :, (yy - 24) ** 2 + (xx - 22) ** 2 <= r * r] += 600
    assert estimate_es(cine)[0] == 7


def test_trigger_time_missing_falls_back_with_warning(tmp_path):
    files = make_series(tmp_path, n_slices=4, n_phases=3)
    for f in files:  # drop TriggerTime: phases must come from InstanceNumber (written in time order)
        ds = pydicom.dcmread(f)
        del ds.TriggerTime
        ds.save_as(f)
    with pytest.warns(UserWarning, match="TriggerTime missing"):
        stacks = load_stacks(tmp_path, phases="all")
    assert [truth(s)[1][0] for s in stacks] == [0, 1, 2]
    assert stacks[0].meta["phase_source"] == "InstanceNumber"


def test_rescale_slope_intercept(tmp_path):
    make_series(tmp_path, n_slices=3, slope=2.0, intercept=-50)
    (st,) = load_stacks(tmp_path)
    np.testing.assert_allclose(st.images[:, 0, 0], 2.0 * np.arange(3) - 50)
    assert st.images[0, 5, 5] == 2 * 100 - 50


def test_mixed_series_and_subjects_split(tmp_path):
    make_series(tmp_path / "a", n_slices=5, series="1.9.1", seed=1)
    make_series(tmp_path / "a", n_slices=7, series="1.9.2", seed=2, flip=True)  # same folder
    make_series(tmp_path / "b", n_slices=6, patient="P2", series="1.9.3", seed=3)
    # a localizer-like orientation inside the first series: split off and reported single-slice
    write_mr(tmp_path / "a" / "loc", series="1.9.1", iop=[1, 0, 0, 0, 1, 0], ipp=[0, 0, 0],
             trigger=0.0, pixels=image(0, 0, 1))
    res = scan(tmp_path)
    got = sorted((s.subject, s.meta["series_uid"], s.n_slices) for s in res.stacks)
    assert got == [("P1", "1.9.1", 5), ("P1", "1.9.2", 7), ("P2", "1.9.3", 6)]
    assert all(truth(s)[0] == list(range(s.n_slices)) for s in res.stacks)
    assert [(Path(p).name, "single-slice" in r) for p, r in res.skipped] == [("loc", True)]


def test_bad_inputs_are_reported_and_the_rest_loads(tmp_path):
    files = make_series(tmp_path / "good", n_slices=6)
    bad = tmp_path / "good" / "bad"
    bad.mkdir()
    # structured report (no pixel data)
    sr = pydicom.dcmread(glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data",
                                                "test_files", "test-SR.dcm"))[0])
    sr.save_as(bad / "report")
    # truncated image, random bytes, text file
    data = Path(files[0]).read_bytes()
    (bad / "truncated").write_bytes(data[: len(data) // 2])
    (bad / "noise.dat").write_bytes(np.random.default_rng(0).bytes(3000))
    # missing geometry
    write_mr(bad / "nogeo", iop=[1, 0, 0, 0, 1, 0], ipp=[0, 0, 0], trigger=0.0,
             pixels=image(0, 0, 1), drop=("ImagePositionPatient",), series="1.7")
    # compressed without a decoder: JPEG baseline with a broken codestream
    write_mr(bad / "jpeg", iop=[1, 0, 0, 0, 1, 0], ipp=[0, 0, 0], trigger=0.0, pixels=image(0, 0, 1),
             ts=JPEGBaseline8Bit, series="1.8",
             pixel_bytes=pydicom.encaps.encapsulate([b"\xff\xd8\xff\xdb" + b"\0" * 60]))
    # duplicated position: an exact copy, and a second image at the same place and time
    shutil.copy(files[2], bad / "copy_of_2")
    res = scan(tmp_path)
    (st,) = res.stacks
    assert truth(st)[0] == list(range(6))
    reasons = {Path(p).name: r for p, r in res.skipped}
    assert set(reasons) == {"report", "truncated", "noise.dat", "nogeo", "jpeg", "copy_of_2"} or \
        set(reasons) == {"report", "truncated", "noise.dat", "nogeo", "jpeg", Path(files[2]).name}
    assert "not an image" in reasons["report"] and "SR" in reasons["report"]
    assert "truncated" in reasons["truncated"] or "corrupt" in reasons["truncated"]
    assert "not a DICOM file" in reasons["noise.dat"]
    assert "missing geometry tag(s) ImagePositionPatient" in reasons["nogeo"]
    assert "pip install" in reasons["jpeg"] and "JPEG" in reasons["jpeg"]
    dup = [r for n, r in reasons.items() if n in ("copy_of_2", Path(files[2]).name)][0]
    assert "duplicate" in dup and "kept" in dup
    # load_stacks warns once per skipped file, naming it
    with pytest.warns(UserWarning) as rec:
        load_stacks(tmp_path)
    msgs = " ".join(str(w.message) for w in rec)
    assert all(n in msgs for n in ("report", "truncated", "noise.dat", "nogeo", "jpeg"))


def test_duplicate_position_different_image_is_deduplicated(tmp_path):
    files = make_series(tmp_path, n_slices=4)
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 99
    ds.save_as(tmp_path / "zz_repeat")
    res = scan(tmp_path)
    assert truth(res.stacks[0])[0] == [0, 1, 2, 3]
    ((p, r),) = res.skipped
    assert "duplicate" in r and "same position" in r


def test_single_slice_and_empty_and_missing(tmp_path):
    make_series(tmp_path / "one", n_slices=1)
    res = scan(tmp_path / "one")
    assert not res.stacks and "single-slice series" in res.skipped[0][1]
    with pytest.raises(StackReadError, match="no stack found.*single-slice"), pytest.warns(UserWarning):
        load_stacks(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackReadError, match="empty folder"), pytest.warns(UserWarning):
        load_stacks(tmp_path / "empty")
    assert "empty folder" in scan(tmp_path / "empty").skipped[0][1]
    with pytest.raises(StackReadError, match="no such file"):
        scan(tmp_path / "nope")


def test_sideways_stack_orientation_unknown(tmp_path):
    # slice normal perpendicular to the apex direction: cannot tell the apex end
    a = -APEX_DIRECTION
    v = np.cross(a, [0, 0, 1.0])
    v /= np.linalg.norm(v)
    row = a
    col = np.cross(v, row)
    for k in range(3):
        write_mr(tmp_path / f"f{k}", iop=[*row, *col], ipp=10 * k * v, trigger=0.0,
                 pixels=image(k, 0, 1))
    (st,) = load_stacks(tmp_path)
    assert not st.orientation_known and "unknown" in st.meta["orientation"]


PYDICOM_FILES = sorted(p for p in glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data",
                                                         "test_files", "**", "*"), recursive=True)
                       if os.path.isfile(p))


def test_pydicom_bundled_files_load_or_fail_clearly():
    # The files shipped inside the pydicom package (real vendors' headers). Listed from the package
    # folder: pydicom.data.get_testdata_files("*") also tries to download extra files, which hangs
    # offline.
    assert len(PYDICOM_FILES) > 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scan(PYDICOM_FILES, progress=False)
    assert len(res.stacks) + len(res.skipped) >= 1
    reasons = {Path(p).name: r for p, r in res.skipped}
    assert "not an image" in reasons["test-SR.dcm"] and "not an image" in reasons["rtplan.dcm"]
    # JPEG-LS, JPEG 2000 and RLE decode in the default install: these fail only for being one slice
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        assert "single-slice" in reasons[name]
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "multi-frame" in reasons["rtdose.dcm"]
    assert "single-slice" in reasons["MR_small.dcm"]
    for p, r in res.skipped:
        assert isinstance(r, str) and len(r) > 10
    for st in res.stacks:  # whatever loads is a proper stack
        assert st.n_slices >= 2 and np.all(np.isfinite(st.images))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fast_pixel_path_matches_pydicom():
    # includes 12-bit-stored unsigned, signed 16-bit, 8-bit and padded files
    used = 0
    for f in PYDICOM_FILES:
        try:
            ds = pydicom.dcmread(f)
            ref = ds.pixel_array
        except Exception:
            continue
        if ref.ndim != 2:
            continue
        fast = _native_pixels(ds)
        if fast is not None:
            used += 1
            np.testing.assert_array_equal(fast, ref, err_msg=f)
    assert used >= 3


# --- hardening (issue 13): decompression bombs (item 3) and bad geometry (item 8) ---


def edit(path, **values):
    """Rewrite header values of a written file (strings go in raw, e.g. 'nan')."""
    ds = pydicom.dcmread(path)
    for tag, v in values.items():
        if v is None:
            delattr(ds, tag)
        else:
            setattr(ds, tag, v)
    ds.save_as(path)


@pytest.mark.parametrize("bloat", ["pixels", "private element"])
def test_deflated_bomb_is_skipped_without_inflating(tmp_path, monkeypatch, bloat):
    # 8 MB of zeros deflates to a few KB. "pixels": a 2048 x 2048 image, refused from the header
    # elements parsed out of the first inflated MiB; "private element": an 8 MB element in front of
    # a 32 x 32 image, refused while the inflated bytes are counted in 1 MiB chunks. Neither the
    # dataset nor the image is ever held in memory.
    make_series(tmp_path, n_slices=3)
    big = bloat == "pixels"
    bomb = write_mr(tmp_path / "bomb", iop=[1, 0, 0, 0, 1, 0], ipp=[0, 0, 0], trigger=0.0,
                    pixels=np.zeros((2048, 2048) if big else (32, 32), np.uint16),
                    ts=DeflatedExplicitVRLittleEndian, series="1.6")
    if not big:
        ds = pydicom.dcmread(bomb)
        ds.add_new(0x00091010, "OB", bytes(8 << 20))
        ds.save_as(bomb)
    assert os.path.getsize(bomb) < 100_000
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "6")
    tracemalloc.start()
    res = scan(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ((p, r),) = res.skipped
    why = "declared image 2048 x 2048" if big else "deflated DICOM dataset"
    assert p == str(bomb) and why in r and "per-file limit of 6.0 MB" in r
    assert "STACKCLS_MAX_FILE_MB" in r and len(res.stacks) == 1 and peak < 5e6
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "64")  # within the limit: read, and a 1-slice series
    assert "single-slice" in dict(scan(tmp_path).skipped)[str(bomb)]


def test_declared_size_checked_before_decoding(tmp_path, monkeypatch):
    files = make_series(tmp_path, n_slices=4)
    edit(files[0], Rows=30000, Columns=30000)  # 3.6 GB as float32, a few KB of pixel data
    t0 = time.perf_counter()
    res = scan(tmp_path)
    assert time.perf_counter() - t0 < 5 and max_file_bytes() == 512 << 20
    ((p, r),) = res.skipped
    assert p == str(files[0]) and "declared image 30000 x 30000" in r and "per-file limit" in r
    assert truth(res.stacks[0])[0] == [1, 2, 3]
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "0.001")  # 1 KB: even a 32 x 32 slice is too big
    assert {"file size on disk" in r for _, r in scan(tmp_path).skipped} == {True}
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "lots")
    with pytest.raises(ValueError, match="STACKCLS_MAX_FILE_MB='lots'"):
        scan(tmp_path)


def test_per_stack_limit_skips_the_whole_series(tmp_path, monkeypatch):
    small = make_series(tmp_path / "a", n_slices=4, series="1.9.1")  # 4 x 4 KB decoded
    big = make_series(tmp_path / "b", n_slices=8, series="1.9.2")    # 8 x 4 KB
    monkeypatch.setenv("STACKCLS_MAX_STACK_MB", "0.02")               # 20 KB
    res = scan(tmp_path)
    (st,) = res.stacks
    assert st.meta["series_uid"] == "1.9.1" and sorted(st.sources) == sorted(map(str, small))
    assert sorted(p for p, _ in res.skipped) == sorted(map(str, big))
    assert all("per-stack limit" in r and "STACKCLS_MAX_STACK_MB" in r for _, r in res.skipped)


def test_sparse_series_cine_within_the_stack_limit(tmp_path, monkeypatch):
    # 6 positions x 1 phase plus 6 phases at the apex: 12 small files (48 KB decoded), but the
    # (phases, positions, H, W) cine for the ES estimate would be 6 x 6 images (144 KB)
    files = make_series(tmp_path, n_slices=6) + make_series(tmp_path, n_slices=1, n_phases=6, seed=1)
    monkeypatch.setenv("STACKCLS_MAX_STACK_MB", "0.05")  # 51.2 KB
    res = scan(tmp_path)
    assert not res.stacks and sorted(p for p, _ in res.skipped) == sorted(map(str, files))
    assert sum("6 phases x 6 positions" in r and "144.0 KB" in r for _, r in res.skipped) == 11


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("value", ["nan", "inf", "-1e300"])
def test_bad_position_skips_the_slice_and_keeps_the_order(tmp_path, value):
    files = make_series(tmp_path, n_slices=6)
    edit(files[1], ImagePositionPatient=[value, "0", "0"])
    res = scan(tmp_path)
    ((p, r),) = res.skipped
    assert p == str(files[1]) and "bad ImagePositionPatient" in r
    (st,) = res.stacks
    assert truth(st)[0] == [0, 2, 3, 4, 5] and np.all(np.isfinite(st.positions))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS", "ignore:.*different phase counts")
@pytest.mark.parametrize("tag, value, reason", [
    ("PixelSpacing", ["nan", "1.5"], "bad PixelSpacing"),
    ("PixelSpacing", ["0", "1.5"], "bad PixelSpacing"),
    ("PixelSpacing", ["1.5", "-1.5"], "bad PixelSpacing"),
    ("RescaleSlope", "nan", "bad RescaleSlope"),
    ("RescaleSlope", "1e30", "bad RescaleSlope"),
    ("RescaleSlope", "0", "bad RescaleSlope"),
    ("RescaleIntercept", "inf", "bad RescaleIntercept"),
    ("RescaleIntercept", "-1e12", "bad RescaleIntercept"),
    ("TriggerTime", "nan", "bad TriggerTime"),
    ("ImageOrientationPatient", ["nan", "0", "0", "0", "1", "0"], "degenerate ImageOrientation"),
])
def test_bad_header_values_skip_the_file(tmp_path, tag, value, reason):
    files = make_series(tmp_path, n_slices=4, n_phases=3)
    edit(files[4], **{tag: value})
    res = scan(tmp_path, phases="all")
    ((p, r),) = [(p, r) for p, r in res.skipped if reason in r]
    assert p == str(files[4])
    for st in res.stacks:
        assert np.all(np.isfinite(st.images)) and st.spacing[0] == 1.5 and np.all(np.isfinite(st.positions))
        assert str(files[4]) not in st.sources


def test_series_without_uid_are_not_merged(tmp_path):
    # same patient, study, geometry and image size: only the folder / SeriesDescription differ
    a = make_series(tmp_path / "a", n_slices=5, seed=1, drop=("SeriesInstanceUID",))
    b = make_series(tmp_path / "b", n_slices=5, seed=2, drop=("SeriesInstanceUID",))
    c = make_series(tmp_path / "b", n_slices=5, seed=3, drop=("SeriesInstanceUID",))
    for f in c:
        edit(f, SeriesDescription="cine sax repeat")
    with pytest.warns(UserWarning, match="grouped by folder"):
        res = scan(tmp_path)
    assert not res.skipped and len(res.stacks) == 3
    assert sorted(sorted(st.sources) for st in res.stacks) == sorted(sorted(map(str, x)) for x in (a, b, c))
    assert all(truth(st)[0] == list(range(5)) for st in res.stacks)
