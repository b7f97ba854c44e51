"""NIfTI reading: 3-D / 4-D files, affine geometry, the ACDC layout, and the real ACDC stacks."""

import csv
import gzip
import time
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from stackcls.io import StackReadError, load_stacks, scan
from stackcls.io.geometry import APEX_DIRECTION


def volume(n_slices=6, n_phases=None, h=24, w=20):
    """(h, w, S[, T]) with truth in voxel [0, 0, k(, t)] = k (file slice index) and [0, 1] = t."""
    shape = (h, w, n_slices) + (() if n_phases is None else (n_phases,))
    v = np.full(shape, 50.0, np.float32)
    yy, xx = np.mgrid[:h, :w]
    for t in range(n_phases or 1):
        r = 5 + 2.5 * np.cos(2 * np.pi * t / (n_phases or 1))
        disk = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r * r
        for k in range(n_slices):
            sl = (slice(None), slice(None), k) + (() if n_phases is None else (t,))
            img = v[sl]
            img[disk] = 900
            img[0, 0], img[0, 1] = k, t
    return v


def save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_3d_identity_affine_keeps_file_order(tmp_path):
    p = save(tmp_path / "subj.nii.gz", volume(5))
    (st,) = load_stacks(p)
    assert st.subject == "subj" and st.images.shape == (5, 24, 20)
    assert st.images[:, 0, 0].tolist() == [0, 1, 2, 3, 4] and st.slice_ids == [0, 1, 2, 3, 4]
    assert st.sources == ["0", "1", "2", "3", "4"]
    assert not st.orientation_known and "identity" in st.meta["orientation"]


def oblique_affine(step_mm=8.0, pixel_mm=1.25, towards_apex=False):
    """An RAS affine whose slice axis runs along the LV long axis (base -> apex if towards_apex)."""
    u_lps = -APEX_DIRECTION  # apex -> base
    step = (-u_lps if towards_apex else u_lps) * step_mm
    a = np.cross(u_lps, [0, 0, 1.0])
    a /= np.linalg.norm(a)
    b = np.cross(u_lps, a)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = (lps_to_ras @ (pixel_mm * a), lps_to_ras @ (pixel_mm * b),
                                          lps_to_ras @ step)
    aff[:3, 3] = [10, -20, 30]
    return aff


@pytest.mark.parametrize("kind, reason", [
    ("acdc", "disagree with pixdim"),          # the ACDC release: flipped identity, unit scale
    ("aligned", "axis-aligned"),               # right scale, but no obliquity at all
    ("singular", "singular"),
    ("nan", "NaN"),
    ("no_codes", "no qform or sform"),
])
def test_placeholder_affines_give_unknown_orientation(tmp_path, kind, reason):
    zooms = (1.5625, 1.5625, 10.0)
    aff = oblique_affine(step_mm=10.0, pixel_mm=1.5625, towards_apex=True)  # a real one, then spoiled
    if kind == "acdc":
        aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    elif kind == "aligned":
        aff = np.diag([-1.5625, -1.5625, 10.0, 1.0])
    elif kind == "singular":
        aff[:3, 2] = aff[:3, 0] * 10.0 / 1.5625
    elif kind == "nan":
        aff[0, 3] = np.nan
    img = nib.Nifti1Image(volume(6), aff)
    img.header.set_zooms(zooms)
    if kind == "no_codes":
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    (st,) = load_stacks(tmp_path / "s.nii.gz")
    # the file order is kept (even where the spoiled affine would have reversed it), and says why
    assert st.images[:, 0, 0].astype(int).tolist() == [0, 1, 2, 3, 4, 5]
    assert not st.orientation_known
    assert st.meta["orientation"].startswith("orientation unknown") and reason in st.meta["orientation"]
    assert st.spacing == pytest.approx(zooms)                       # pixdim, not the affine
    np.testing.assert_allclose(st.positions, np.arange(6) * 10.0)


@pytest.mark.parametrize("towards_apex", [False, True])
def test_real_affine_orders_apex_to_base(tmp_path, towards_apex):
    # slice axis along the LV long axis; file order base->apex when towards_apex
    (st,) = load_stacks(save(tmp_path / "s.nii", volume(6), oblique_affine(towards_apex=towards_apex)))
    expect = [5, 4, 3, 2, 1, 0] if towards_apex else [0, 1, 2, 3, 4, 5]
    assert st.images[:, 0, 0].astype(int).tolist() == expect and st.slice_ids == expect
    assert st.orientation_known
    np.testing.assert_allclose(np.diff(st.positions), 8.0, atol=1e-4)
    assert st.spacing == pytest.approx((1.25, 1.25, 8.0), abs=1e-4)


def test_4d_cine(tmp_path):
    p = save(tmp_path / "cine.nii.gz", volume(5, n_phases=10))
    ed, es = load_stacks(p)
    assert (ed.phase, ed.frame, es.phase, es.frame) == ("ED", 0, "ES", 5)
    assert es.images[:, 0, 1].tolist() == [5] * 5
    assert len(load_stacks(p, phases="all")) == 10
    assert load_stacks(p, es=2)[1].frame == 2


@pytest.mark.parametrize("shape", [(24, 20), (2, 3, 4, 5, 6), (24, 20, 1)])
def test_wrong_dimensionality(tmp_path, shape):
    p = save(tmp_path / "bad.nii.gz", np.zeros(shape, np.float32))
    res = scan(p)
    assert not res.stacks and res.skipped[0][0] == str(p)
    assert "expected 3-D" in res.skipped[0][1] or "single slice" in res.skipped[0][1]
    with pytest.raises(StackReadError, match="bad.nii.gz"), pytest.warns(UserWarning, match="skipped"):
        load_stacks(p)


def test_corrupt_nifti(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"\x1f\x8b not really gzip")
    (path, reason), = scan(p).skipped
    assert path == str(p) and "unreadable NIfTI" in reason


def test_acdc_layout_small(tmp_path):
    d = tmp_path / "patient007"
    d.mkdir()
    (d / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: NOR\nNbSlices: 4\n")
    save(d / "patient007_frame01.nii.gz", volume(4))
    save(d / "patient007_frame03.nii.gz", volume(4) + 1)
    save(d / "patient007_frame02.nii.gz", volume(4) + 2)
    save(d / "patient007_frame01_gt.nii.gz", np.zeros((24, 20, 4), np.uint8))
    save(d / "patient007_4d.nii.gz", volume(4, n_phases=3))
    res = scan(tmp_path)
    ed, es = res.stacks
    assert (ed.subject, ed.phase, ed.frame, es.phase, es.frame) == ("patient007", "ED", 1, "ES", 3)
    # slice 0 is basal in ACDC: reversed so images run apex -> base; ids keep the file index
    assert ed.slice_ids == [3, 2, 1, 0] and ed.images[:, 0, 0].tolist() == [3, 2, 1, 0]
    assert es.images[0, 0, 0] == 3 + 1
    assert ed.meta["orientation"].startswith("acdc convention: slice 0 basal") and not ed.orientation_known
    assert not res.skipped and {w for _, w in res.ignored} == {
        "segmentation mask (_gt)", "4-D cine (frames are read from the _frameYY files)"}
    allp = load_stacks(d, phases="all")
    assert [(s.phase, s.frame) for s in allp] == [("ED", 1), ("2", 2), ("ES", 3)]
    # Info.cfg naming a frame that is not there
    (d / "patient007_frame03.nii.gz").unlink()
    res = scan(d)
    assert [s.phase for s in res.stacks] == ["ED"] and "frame 3" in res.skipped[0][1]


def test_acdc_real_all_stacks_with_labels(acdc_root):
    stacks = load_stacks(acdc_root, labels=acdc_root / "labels.csv")
    assert len(stacks) == 160 and len({s.subject for s in stacks}) == 80
    with open(acdc_root / "labels.csv", newline="") as f:
        rows = {(r["subject"], r["phase"], int(r["slice"])): (int(r["frame"]), r["label"])
                for r in csv.DictReader(f)}
    n = 0
    for st in stacks:
        # the release's sform is a placeholder (unit scale, pixdim says ~1.5 x 1.5 x 10 mm): the
        # orientation is unknown, the ACDC convention gives the starting order, spacing is pixdim
        assert st.labels is not None and not st.orientation_known
        assert "acdc convention" in st.meta["orientation"] and "pixdim" in st.meta["orientation"]
        assert st.slice_ids == list(range(st.n_slices))[::-1]
        assert st.spacing[2] >= 5.0 and st.spacing[0] == st.spacing[1] < 2.5
        np.testing.assert_allclose(np.diff(st.positions), st.spacing[2])
        for sid, lab in zip(st.slice_ids, st.labels):
            assert rows[(st.subject, st.phase, sid)] == (st.frame, lab)
            n += 1
    assert n == len(rows) == 1516
    # images: the file's slices in reverse order, intensities as released (int16 or float32)
    st = stacks[0]
    raw = nib.load(st.meta["file"]).get_fdata()
    np.testing.assert_allclose(st.images, np.moveaxis(raw, 2, 0)[::-1], atol=1e-6)
    assert st.images.dtype == np.float32 and st.images.max() > 1.0


# --- hardening (issue 13, item 3): decompression bombs ---


def lying_header(path, shape=(30000, 30000, 100), vox_offset=352, data=b"\0" * 4000):
    """A .nii.gz whose header declares `shape` (int16) but holds only `data`."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = vox_offset
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + data)
    return path


def test_declared_nifti_size_checked_before_decoding(tmp_path):
    bomb = lying_header(tmp_path / "bomb.nii.gz")
    save(tmp_path / "ok.nii.gz", volume(5))
    t0 = time.perf_counter()
    tracemalloc.start()
    res = scan(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 5 and peak < 50e6 and len(res.stacks) == 1
    ((p, r),) = res.skipped
    assert p == str(bomb) and "declared NIfTI shape (30000, 30000, 100)" in r
    assert "per-file limit of 512.0 MB" in r and "STACKCLS_MAX_FILE_MB" in r


def test_nifti_header_extension_offset_checked(tmp_path):
    # extensions are read up to vox_offset before any shape could be checked
    bomb = lying_header(tmp_path / "ext.nii.gz", shape=(8, 8, 4), vox_offset=4e12)
    ((p, r),) = scan(tmp_path).skipped
    assert p == str(bomb) and "vox_offset" in r and "per-file limit" in r


def test_nifti_limit_is_configurable(tmp_path, monkeypatch):
    p = save(tmp_path / "subj.nii.gz", volume(6))  # 24 x 20 x 6 float32 = 11.5 KB decoded
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "0.005")  # 5 KB: more than the file, less decoded
    assert p.stat().st_size < 5000
    ((q, r),) = scan(p).skipped
    assert q == str(p) and "declared NIfTI shape (24, 20, 6)" in r and "11.2 KB, over the per-file limit of 5.1 KB" in r
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "0.02")
    assert len(scan(p).stacks) == 1
