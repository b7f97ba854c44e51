"""The synthetic cohort: geometry, labels, DICOM headers, determinism, caching, round trip."""

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from stackcls import phantom
from stackcls.phantom import anatomy as A
from stackcls.phantom.dicom_write import write_subject
from stackcls.phantom.render import render_subject
from stackcls.stack import is_ordered

SCALE = 0.5          # small matrices keep these tests fast
LAI = np.array([1.0, -1.0, -1.0]) / np.sqrt(3)


@pytest.fixture(scope="module")
def subjects():
    return [render_subject(7, i, SCALE) for i in range(4)]


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    return phantom.cohort(3, seed=11, cache_dir=tmp_path_factory.mktemp("cache"), matrix_scale=SCALE)


def _read_series(folder: Path):
    """An independent minimal reader: group by TriggerTime, order by position along the apex
    direction (LPS: the apex points left, anterior, inferior). Returns {frame_index: (S, H, W) float images apex->base}."""
    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    times = sorted({float(d.TriggerTime) for d in dss})
    out = {}
    for f, t in enumerate(times):
        ds = [d for d in dss if float(d.TriggerTime) == t]
        iop = np.array(ds[0].ImageOrientationPatient, float)
        n = np.cross(iop[:3], iop[3:])
        if n @ LAI < 0:
            n = -n                                            # n points towards the apex
        ds.sort(key=lambda d: -float(np.array(d.ImagePositionPatient, float) @ n))
        out[f] = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                           for d in ds]).astype(np.float32)
    return out, dss


def test_labels_follow_anatomy(subjects):
    for d in subjects:
        e3 = d.anatomy.frame[2]
        p = d.anatomy.p
        # Heights of the slice centres above the ED apex along the long axis.
        rows, cols = d.pixels.shape[2:]
        r, c = d.iop[:3], d.iop[3:]
        centre = d.ipp + (cols - 1) / 2 * d.pixel_spacing[1] * r + (rows - 1) / 2 * d.pixel_spacing[0] * c
        assert np.all(np.diff((centre - d.anatomy.apex) @ e3) > 0), "slices must be stored apex -> base"
        h = (centre - d.shift - d.anatomy.apex) @ e3            # where each slice cut the anatomy
        ed, es = d.labels["ED"], d.labels["ES"]
        for labs in (ed, es):
            assert is_ordered(labs) and "IN" in labs
        assert 8 <= len(ed) <= 16 and len(es) == len(ed)
        # Hand geometry: no cavity below the endocardial apex; mid-ventricle always IN at ED;
        # well above the (tilted) base only atria and vessels.
        half = d.thickness / 2 + 4
        assert all(l == "OAP" for l, z in zip(ed, h) if z + half < p["t_apex"])
        assert all(l == "IN" for l, z in zip(ed, h) if 0.35 * p["zb0"] < z < 0.75 * p["zb0"])
        assert all(l == "OBS" for l, z in zip(ed, h) if z - half > p["zb0"] + p["tilt"] + 10)
        # The base descends at end-systole: never fewer OBS slices than at end-diastole.
        assert es.count("OBS") >= ed.count("OBS")
        assert d.frames["ED"] == 0 < d.frames["ES"] < d.pixels.shape[0]
        assert np.all(np.diff(d.trigger_times) > 0)
        # The ES cavity is the smallest of the cine.
        total = d.pool_mm2.sum(axis=1)
        assert np.argmin(total) == d.frames["ES"]


def test_contrast_is_bssfp_like(subjects):
    d = subjects[0]
    img = d.images()[0]
    # Label the mid slice without noise to find where blood and myocardium are.
    k = d.labels["ED"].index("IN") + d.labels["ED"].count("IN") // 2
    rows, cols = img.shape[1:]
    j, i = np.meshgrid(np.arange(cols), np.arange(rows))
    r, c = d.iop[:3], d.iop[3:]
    pts = (d.ipp[k] + j[..., None] * d.pixel_spacing[1] * r + i[..., None] * d.pixel_spacing[0] * c).reshape(-1, 3)
    lab = A.heart_labels(d.anatomy, A.to_heart(d.anatomy, pts), 0.0, A.body_labels(d.anatomy, pts))
    lab = lab.reshape(rows, cols)
    blood, myo, lung = (np.median(img[k][lab == t]) for t in (A.LV_BLOOD, A.LV_MYO, A.LUNG))
    assert blood > 2 * myo > 2 * lung


def test_deterministic_and_subject_independent():
    a, b = render_subject(3, 1, SCALE), render_subject(3, 1, SCALE)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.labels == b.labels
    c = render_subject(4, 1, SCALE)
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)


def test_dicom_headers_and_independent_readback(subjects, tmp_path):
    for d in subjects[:2]:
        files = write_subject(d, tmp_path, seed=7)
        P, S = d.pixels.shape[:2]
        assert len(files) == P * S
        frames, dss = _read_series(tmp_path / d.subject)
        assert len(frames) == P
        truth = d.images()
        for f in range(P):
            np.testing.assert_allclose(frames[f], truth[f], rtol=1e-5, atol=1e-3)
        ds = dss[0]
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert len({x.SOPInstanceUID for x in dss}) == len(dss)
        assert len({x.SeriesInstanceUID for x in dss}) == 1 and ds.PatientID == d.subject
        assert sorted(int(x.InstanceNumber) for x in dss) == list(range(1, len(dss) + 1))
        iop = np.array(ds.ImageOrientationPatient, float)
        assert abs(iop[:3] @ iop[3:]) < 1e-4 and np.allclose(np.linalg.norm(iop.reshape(2, 3), axis=1), 1, atol=1e-4)
        n = np.cross(iop[:3], iop[3:])
        assert abs(n @ LAI) > 0.5                          # short axis: normal near the long axis
        assert float(ds.SpacingBetweenSlices) == pytest.approx(d.spacing)
        locs = {float(x.SliceLocation) for x in dss}
        assert len(locs) == S


def test_header_variations_across_cohort():
    """Across subjects both SliceLocation signs, shuffled/reversed InstanceNumbers, mirrored views
    and rescale slopes != 1 all occur, so readers cannot rely on any of them."""
    subs = [render_subject(0, i, 0.25) for i in range(24)]
    ds = [d.dicom for d in subs]
    assert {d["sliceloc_sign"] for d in ds} == {-1, 1}
    assert any(d["shuffled_instances"] for d in ds) and any(d["reversed_instances"] for d in ds)
    assert any(d["mirrored"] for d in ds)
    # Class balance: every class well represented (100 subjects: OAP 20 %, IN 66 %, OBS 14 %).
    labs = [l for d in subs for ph in ("ED", "ES") for l in d.labels[ph]]
    frac = {c: labs.count(c) / len(labs) for c in ("OAP", "IN", "OBS")}
    assert frac["IN"] > 0.5 and frac["OAP"] > 0.08 and frac["OBS"] > 0.06, frac
    assert {d.anatomy.group for d in subs} == {"NOR", "DCM", "HCM"}


def test_cohort_layout_cache_and_sharing(small_cohort, tmp_path_factory):
    root = small_cohort
    rows = list(csv.DictReader(open(root / "labels.csv")))
    assert list(rows[0]) == ["subject", "frame", "phase", "slice", "label"]
    assert sorted({r["subject"] for r in rows}) == ["syn0000", "syn0001", "syn0002"]
    assert sorted(p.name for p in (root / "dicom").iterdir()) == ["syn0000", "syn0001", "syn0002"]
    for (s, ph), _ in {(r["subject"], r["phase"]): 0 for r in rows}.items():
        labs = [r["label"] for r in rows if r["subject"] == s and r["phase"] == ph]
        assert is_ordered(labs)
    cache = root.parent
    mtime = os.path.getmtime(root / "labels.csv")
    assert phantom.cohort(3, seed=11, cache_dir=cache, matrix_scale=SCALE) == root
    assert os.path.getmtime(root / "labels.csv") == mtime           # reused, not regenerated
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]
    # A smaller cohort with the same seed holds the same subjects, byte for byte.
    small = phantom.cohort(1, seed=11, cache_dir=cache, matrix_scale=SCALE)
    assert small != root
    a = sorted((small / "dicom/syn0000").iterdir())
    b = sorted((root / "dicom/syn0000").iterdir())
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    def boom(out, *a, **k):
        (Path(out) / "dicom" / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom, "generate", boom)
    with pytest.raises(KeyboardInterrupt):
        phantom.cohort(2, seed=0, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_synth_command(tmp_path, capsys, monkeypatch):
    import stackcls.phantom.render as R
    orig = R.render_subject
    monkeypatch.setattr(phantom, "render_subject", lambda s, i, m=1.0: orig(s, i, 0.25))
    from stackcls.cli import main
    out = tmp_path / "cohort"
    assert main(["synth", "--subjects", "2", "--out", str(out), "--seed", "5"]) == 0
    msg = capsys.readouterr().out
    assert "2 subjects" in msg and "OAP" in msg and "IN" in msg
    assert (out / "labels.csv").is_file() and len(list((out / "dicom").iterdir())) == 2
    assert phantom.synth_command(subjects=2, out=out, seed=5) == 2    # refuses to overwrite
    assert "not an empty folder" in capsys.readouterr().err


def test_roundtrip_through_io_reader(small_cohort):
    io = pytest.importorskip("stackcls.io")
    if not hasattr(io, "load_stacks"):
        pytest.skip("stackcls.io.load_stacks has not landed yet")
    root = small_cohort
    stacks = io.load_stacks(root / "dicom", labels=root / "labels.csv")
    assert len(stacks) == 6
    for st in stacks:
        i = int(st.subject[3:])
        d = render_subject(11, i, SCALE)
        f = d.frames[st.phase]
        assert st.frame in (None, f)
        assert st.orientation_known
        np.testing.assert_allclose(st.images, d.images()[f], rtol=1e-5, atol=1e-3)
        assert st.labels == d.labels[st.phase]
        np.testing.assert_allclose(np.diff(st.positions), d.spacing, atol=1e-3)   # apex -> base
        assert st.slice_ids == list(range(st.n_slices))
