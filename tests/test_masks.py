"""Anatomy masks: Stack.masks, ACDC `_gt` files, the masks folder, the phantom's exported masks."""

import shutil

import numpy as np
import pytest

import stackcls.phantom.render as R
from stackcls.io import StackReadError, attach_masks, load_stacks, mask_file, scan, write_mask
from stackcls.io.inputs import resolve_stack_input
from stackcls.phantom import generate
from stackcls.stack import MASK_CLASSES, Stack
from stackcls.study.config import compose, identity
from stackcls.study.data import load_data
from test_io_nifti import oblique_affine, save, volume

RV, MYO, CAV = (MASK_CLASSES.index(c) for c in ("rv_cavity", "lv_myocardium", "lv_cavity"))


def id_mask(n_slices=4, h=24, w=20, dtype=np.uint8):
    """(h, w, S) whose slice k says k: k + 1 pixels of class 3 in row 0, the rest 0..2 below."""
    m = np.zeros((h, w, n_slices), dtype)
    for k in range(n_slices):
        m[0, : k + 1, k] = 3
        m[5:10, 5:10, k] = k % 3
    return m


def slice_of(masks_2d) -> int:
    """The file slice index an `id_mask` slice encodes."""
    return int(np.sum(masks_2d[0] == 3)) - 1


# ----------------------------------------------------------------------------- Stack


def test_stack_validates_masks_and_reversal_carries_them():
    img = np.zeros((3, 4, 5), np.float32)
    m = np.zeros((3, 4, 5), np.int64)
    m[1, 0, 0], m[2, 1, 1] = 3, 1
    st = Stack(img, ["a", "b", "c"], "s", "ED", masks=m)
    assert st.masks.dtype == np.uint8 and st.masks[1, 0, 0] == 3
    rev = st.reversed()
    assert np.array_equal(rev.masks, st.masks[::-1]) and rev.masks[1, 0, 0] == 3
    assert Stack(img, ["a", "b", "c"], "s", "ED", masks=m.astype(np.float32)).masks.dtype == np.uint8
    for bad, words in [(np.zeros((2, 4, 5)), "shape (2, 4, 5)"), (m + 1, "value(s) 4 outside"),
                       (m - 1, "value(s) -1 outside"), (m + 4, "value(s) 4, 5, 7 outside"), (m * 0.5, "non-integer"),
                       (np.full((3, 4, 5), np.nan), "non-integer"),
                       (np.zeros((3, 4, 5), bool), "dtype bool")]:
        with pytest.raises(ValueError, match="stack s/ED: .*" + words.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)")):
            Stack(img, ["a", "b", "c"], "s", "ED", masks=bad)


# ----------------------------------------------------------------------------- NIfTI / ACDC


def acdc_patient(tmp_path, gt01, gt03=None):
    d = tmp_path / "patient007"
    d.mkdir()
    (d / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: NOR\n")
    save(d / "patient007_frame01.nii.gz", volume(4))
    save(d / "patient007_frame03.nii.gz", volume(4) + 1)
    save(d / "patient007_frame01_gt.nii.gz", gt01)
    if gt03 is not None:
        save(d / "patient007_frame03_gt.nii.gz", gt03)
    return d


def test_acdc_gt_follows_the_slice_order(tmp_path):
    acdc_patient(tmp_path, id_mask())
    res = scan(tmp_path)
    ed, es = res.stacks
    assert not res.skipped and es.masks is None  # no _gt for frame 3: masks are optional
    assert ed.masks.shape == ed.images.shape and ed.masks.dtype == np.uint8
    # reversed (slice 0 basal) like the images: each mask slice is its image's file slice
    assert [slice_of(m) for m in ed.masks] == ed.slice_ids == ed.images[:, 0, 0].tolist() == [3, 2, 1, 0]
    assert sorted(w for _, w in res.ignored) == ["segmentation mask (_gt)"]


@pytest.mark.parametrize("gt, words", [
    (id_mask(n_slices=5), "masks of shape (24, 20, 5) for images of shape (24, 20, 4)"),
    (id_mask(h=20), "masks of shape (20, 20, 4)"),
    (id_mask(dtype=np.float32) + 0.25, "non-integer values"),
    (id_mask() + 1, "mask value(s) 4 outside 0..3"),
    (id_mask(dtype=np.int16) - 1, "mask value(s) -1 outside 0..3"),
    (np.zeros((24, 20, 4, 2), np.uint8), "expected 3-D"),
])
def test_bad_acdc_gt_is_skipped_and_the_image_kept(tmp_path, gt, words):
    d = acdc_patient(tmp_path, id_mask(), gt03=gt)
    res = scan(tmp_path)
    ed, es = res.stacks
    assert ed.masks is not None and es.masks is None and es.images.shape == (4, 24, 20)
    ((path, reason),) = res.skipped
    assert path == str(d / "patient007_frame03_gt.nii.gz")
    assert reason.startswith("mask not used, patient007_frame03.nii.gz loaded without masks: ")
    assert words in reason
    with pytest.warns(UserWarning, match="frame03_gt.nii.gz: mask not used"):
        assert len(load_stacks(tmp_path)) == 2


def test_nifti_file_with_gt_beside_it(tmp_path):
    """Outside the ACDC layout: a real (oblique) affine orders the slices, the mask follows; the
    _gt file is not read as an image, and a 4-D cine takes no mask."""
    save(tmp_path / "a.nii.gz", volume(5), oblique_affine(towards_apex=True))
    save(tmp_path / "a_gt.nii.gz", id_mask(5), oblique_affine(towards_apex=True))
    save(tmp_path / "lone_gt.nii.gz", volume(3))  # no image beside it: an image itself
    res = scan(tmp_path)
    a, lone = res.stacks
    assert a.orientation_known and a.slice_ids == [4, 3, 2, 1, 0]
    assert [slice_of(m) for m in a.masks] == a.slice_ids
    assert lone.subject == "lone_gt" and lone.masks is None
    assert [p.split("/")[-1] for p, _ in res.ignored] == ["a_gt.nii.gz"]
    # listed file by file, the same
    res = scan([str(tmp_path / "a.nii.gz"), str(tmp_path / "a_gt.nii.gz")])
    assert len(res.stacks) == 1 and res.stacks[0].masks is not None and len(res.ignored) == 1
    # predict's input: masks in working order (apex -> base), like the images
    si = resolve_stack_input(tmp_path / "a.nii.gz")
    assert [slice_of(m) for m in si.masks] == si.images[:, 0, 0].tolist() == [4, 3, 2, 1, 0]
    save(tmp_path / "c.nii.gz", volume(4, n_phases=3))
    save(tmp_path / "c_gt.nii.gz", id_mask(4))
    assert all(s.masks is None for s in load_stacks(tmp_path / "c.nii.gz"))


def test_acdc_real_masks_agree_with_labels(acdc_root):
    """All 160 real stacks: a mask per stack, same shape, and (the labels were derived from the
    masks) IN exactly from the first to the last slice with LV cavity, OAP before it. An
    independent check of the slice order of images, masks and labels."""
    stacks = load_stacks(acdc_root, labels=acdc_root / "labels.csv")
    assert len(stacks) == 160
    n_in = 0
    for st in stacks:
        assert st.masks is not None and st.masks.shape == st.images.shape, st.key
        has = np.flatnonzero((st.masks == CAV).any(axis=(1, 2)))
        lo, hi = has[0], has[-1]
        want = ["OAP"] * lo + ["IN"] * (hi - lo + 1) + ["OBS"] * (st.n_slices - hi - 1)
        assert st.labels == want, st.key
        n_in += hi - lo + 1
        # every class present somewhere in the stack, the cavity inside the myocardium's slices
        assert set(np.unique(st.masks)) == {0, RV, MYO, CAV}, st.key
    assert n_in == 1436  # the README's count


# ----------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def rendered():
    return [R.render_subject(0, i) for i in (0, 12, 21)]  # 12 and 21: ES trabeculae (see below)


def test_phantom_masks_agree_with_labels(rendered):
    """IN is where the blood pool (pixels at least half LV blood) covers >= 40 mm^2. The mask's
    cavity also holds papillary muscles and trabeculae (ACDC's convention), so its area is at least
    the pool's; where the two rules disagree it is an apical slice next to the IN range whose
    cavity is mostly trabeculae (syn0012 and syn0021 at ES: 51 and 63 mm^2 of cavity, 27 and 34 of
    blood)."""
    differ = []
    for d in rendered:
        area_mm2 = d.pixel_spacing[0] * d.pixel_spacing[1]
        for ph, f in d.frames.items():
            m = d.masks[ph]
            assert m.shape == d.pixels.shape[1:] and m.dtype == np.uint8 and m.max() <= 3
            cav = (m == CAV).sum(axis=(1, 2)) * area_mm2
            assert np.all(cav >= d.pool_mm2[f] - 1e-6)
            lab = np.array(d.labels[ph])
            assert np.all(cav[lab == "IN"] >= R.MIN_POOL_MM2)
            by_mask = R._labels(cav)
            if by_mask != d.labels[ph]:
                lo = d.labels[ph].index("IN")
                assert [i for i, (a, b) in enumerate(zip(by_mask, d.labels[ph])) if a != b] == [lo - 1]
                differ.append((d.subject, ph))
            # bSSFP contrast: blood bright, myocardium dark, in the rendered images themselves
            img = d.images()[f]
            assert img[m == CAV].mean() > 2 * img[m == MYO].mean()
            assert img[m == RV].mean() > 2 * img[m == MYO].mean()
    assert differ == [("syn0012", "ES"), ("syn0021", "ES")]


def test_phantom_cavity_of_blood_alone_is_the_pool(rendered, monkeypatch):
    """The partial-volume rule is the labels' own: with the cavity as LV blood only, its area is
    the pool area to the pixel and IN is exactly where it reaches 40 mm^2."""
    monkeypatch.setattr(R, "MASK_TISSUES", ((R.A.RV_BLOOD,), (R.A.LV_MYO,), (R.A.LV_BLOOD,)))
    for i in (12, 21):
        d = R.render_subject(0, i)
        for ph, f in d.frames.items():
            cav = (d.masks[ph] == CAV).sum(axis=(1, 2)) * d.pixel_spacing[0] ** 2
            np.testing.assert_allclose(cav, d.pool_mm2[f], rtol=1e-12)
            assert R._labels(cav) == d.labels[ph]
    assert (rendered[2].masks["ES"] == CAV).sum() > (d.masks["ES"] == CAV).sum()  # trabeculae count


# ----------------------------------------------------------------------------- masks folder


@pytest.fixture(scope="module")
def cohort2(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort2")
    generate(out, 2, seed=0, workers=1, progress=False)
    return out


def test_dicom_masks_folder_round_trip(cohort2):
    """The cohort's DICOM (files in random order, sometimes mirrored or base-first) read back with
    its masks folder: every mask equals the rendered one in the reader's apex -> base order."""
    stacks = load_stacks(cohort2 / "dicom", labels=cohort2 / "labels.csv", masks=cohort2 / "masks")
    assert sorted(s.key for s in stacks) == ["syn0000/ED", "syn0000/ES", "syn0001/ED", "syn0001/ES"]
    for st in stacks:
        d = R.render_subject(0, int(st.subject[3:]))
        assert np.array_equal(st.masks, d.masks[st.phase]), st.key
        assert np.allclose(st.images, d.images()[d.frames[st.phase]])
    assert all(s.masks is None for s in load_stacks(cohort2 / "dicom"))


def test_study_data_passes_masks(cohort2, tmp_path):
    s = compose(["data=dicom", f"data.root={cohort2 / 'dicom'}", f"data.labels={cohort2 / 'labels.csv'}",
                 f"data.masks={cohort2 / 'masks'}", "data.test_size=1"])
    tr, te = load_data(s)
    assert len(tr) == len(te) == 2 and all(st.masks is not None for st in tr + te)
    # a run recorded before data.masks existed has the same identity as one without masks
    plain = compose(["data=dicom", "data.root=x", "data.labels=y"])
    assert "masks" not in identity(plain)["data"] and identity(s)["data"]["masks"]


def copy_masks(cohort2, tmp_path):
    dst = tmp_path / "masks"
    shutil.copytree(cohort2 / "masks", dst)
    return dst


def test_masks_folder_errors(cohort2, tmp_path):
    stacks = load_stacks(cohort2 / "dicom")
    es = next(s for s in stacks if s.key == "syn0001/ES")
    n, h, w = es.images.shape

    def load(masks):
        return load_stacks(cohort2 / "dicom", masks=masks)

    folder = copy_masks(cohort2, tmp_path)
    f = mask_file(folder, "syn0001", "ES")
    write_mask(f, np.zeros((n + 1, h, w), np.uint8))
    with pytest.raises(StackReadError, match=f"{f}: mask of {n + 1} slices for syn0001/ES, whose "
                                             f"{n} slices have ids 0..{n - 1}"):
        load(folder)
    write_mask(f, np.zeros((n, h, w + 1), np.uint8))
    with pytest.raises(StackReadError, match=f"{f}: mask slices of {h} x {w + 1} pixels for "
                                             f"syn0001/ES, whose images are {h} x {w}"):
        load(folder)
    save(f, np.full((h, w, n), 7, np.uint8))
    with pytest.raises(StackReadError, match=r"ES.nii.gz: mask value\(s\) 7 outside 0..3"):
        load(folder)
    f.unlink()  # a stack without a file keeps masks=None
    got = {s.key: s.masks for s in load(folder)}
    assert got["syn0001/ES"] is None and got["syn0001/ED"] is not None
    (folder / "syn9999").mkdir()  # a subject not loaded: its masks are not needed
    assert len(load(folder)) == 4
    other = tmp_path / "other"
    (other / "patient1").mkdir(parents=True)
    with pytest.raises(StackReadError, match=f"{other}: no subject folder matches a loaded stack "
                                             r"\(found patient1; loaded syn0000, syn0001\)"):
        load(other)
    with pytest.raises(StackReadError, match="masks folder not found"):
        load(tmp_path / "nowhere")


def test_masks_folder_with_gaps_in_slice_ids(cohort2, tmp_path):
    """A phase missing a slice keeps the ids of the others: slice k of the mask is still id k."""
    (st,) = [s for s in load_stacks(cohort2 / "dicom") if s.key == "syn0000/ED"]
    full = R.render_subject(0, 0).masks["ED"]
    gap = Stack(st.images[[0, 1, 3]], st.sources[:3], st.subject, st.phase, slice_ids=[0, 1, 3])
    attach_masks([gap], cohort2 / "masks")
    assert np.array_equal(gap.masks, full[[0, 1, 3]])
    short = Stack(st.images[:3], st.sources[:3], st.subject, st.phase, slice_ids=[0, 1, 2])
    with pytest.raises(StackReadError, match="mask of .* slices for syn0000/ED, whose 3 slices"):
        attach_masks([short], cohort2 / "masks")
