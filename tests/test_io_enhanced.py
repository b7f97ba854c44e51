"""Enhanced multi-frame DICOM, gzipped DICOM, image kinds and echoes, compressed transfer syntaxes.

References are independent of the reader: a classic series (test_io_dicom.make_series, whose pixels
carry their apex-to-base rank and temporal index) re-encoded here with pydicom as one enhanced file
and as gzipped copies; and dcm2niix's conversions of the vendor series in
../shared/data/dicom-vendors (Ref/), compared up to dcm2niix's axis order and flips.
"""

import gzip
import itertools
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import _shared
from stackcls.io import scan
from stackcls.io import dicom as dcm
from stackcls.io import dicom_slices
from stackcls.io.dicom_enhanced import image_kind
from test_io_dicom import make_series, truth

VENDORS = "data/dicom-vendors"


def _item(**kw):
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def to_enhanced(files, out, seed=0):
    """Re-encode classic single-frame MR files as one Enhanced MR Image Storage file, frames in a
    shuffled order: orientation and pixel measures shared, position, timing, rescale and image type
    per frame (as Siemens XA writes them)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    dss = [pydicom.dcmread(f) for f in files]
    dss = [dss[i] for i in np.random.default_rng(seed).permutation(len(dss))]
    d0 = dss[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, meta.MediaStorageSOPInstanceUID
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality"):
        setattr(ds, k, getattr(d0, k))
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = d0.Rows, d0.Columns, len(dss)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=d0.PixelSpacing,
                                              SliceThickness=d0.SliceThickness)]),
        PlaneOrientationSequence=Sequence([_item(
            ImageOrientationPatient=d0.ImageOrientationPatient)]))])
    frames = []
    for d in dss:
        kind = list(d.get("ImageType", ["ORIGINAL", "PRIMARY", "M", "NONE"]))
        f = _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=d.ImagePositionPatient)]),
                  PixelValueTransformationSequence=Sequence([_item(
                      RescaleSlope=d.get("RescaleSlope", "1"),
                      RescaleIntercept=d.get("RescaleIntercept", "0"), RescaleType="US")]),
                  MRImageFrameTypeSequence=Sequence([_item(
                      FrameType=kind,
                      ComplexImageComponent="PHASE" if kind[2] == "P" else "MAGNITUDE")]))
        if "TriggerTime" in d:
            f.CardiacSynchronizationSequence = Sequence([_item(
                NominalCardiacTriggerDelayTime=float(d.TriggerTime))])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(d.PixelData for d in dss)
    ds.save_as(out, enforce_file_format=True)
    return out


def same_stacks(a, b):
    assert [s.key for s in a] == [s.key for s in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-9)
        assert x.spacing == pytest.approx(y.spacing)
        assert (x.slice_ids, x.frame, x.orientation_known) == (y.slice_ids, y.frame, y.orientation_known)
        assert x.meta == y.meta


@pytest.mark.parametrize("flip", [False, True])
def test_enhanced_equals_classic(tmp_path, flip):
    files = make_series(tmp_path / "classic", n_slices=6, n_phases=5, flip=flip, slope=2, intercept=-7)
    enhanced = to_enhanced(files, tmp_path / "enh" / "cine.dcm")
    classic = scan(tmp_path / "classic", phases="all", progress=False)
    multi = scan(enhanced, phases="all", progress=False)
    assert not classic.skipped and not multi.skipped
    assert len(classic.stacks) == 5
    same_stacks(classic.stacks, multi.stacks)
    ranks, times = truth(multi.stacks[3])  # stored truth x slope 2 - 7
    assert ranks == [2 * k - 7 for k in range(6)] and times == [2 * 3 - 7] * 6
    assert multi.stacks[0].sources[0].startswith(str(enhanced) + " [frame ")
    assert [s.phase for s in multi.stacks][:3] == ["ED", "1", "ES"]  # smallest pool at T // 2


def test_gzipped_equals_plain(tmp_path):
    files = make_series(tmp_path / "plain", n_slices=5, n_phases=3)
    (tmp_path / "gz").mkdir()
    for f in files:
        with open(f, "rb") as src, gzip.open(tmp_path / "gz" / (f.name + ".dcm.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    enhanced = to_enhanced(files, tmp_path / "enh.dcm")
    with open(enhanced, "rb") as src, gzip.open(tmp_path / "enh.dcm.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = scan(tmp_path / "plain", progress=False)
    gz = scan(tmp_path / "gz", progress=False)
    enh_gz = scan(tmp_path / "enh.dcm.gz", progress=False)
    assert not gz.skipped and not enh_gz.skipped
    same_stacks(plain.stacks, gz.stacks)
    same_stacks(plain.stacks, enh_gz.stacks)


def test_gzip_bomb_and_corrupt_gzip_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKCLS_MAX_FILE_MB", "1")
    bomb = tmp_path / "bomb.dcm.gz"
    with gzip.open(bomb, "wb") as f:  # 64 MB of zeros in ~64 KB
        for _ in range(64):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 200_000
    bad = tmp_path / "bad.dcm.gz"
    bad.write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000))[:2000])
    res = scan(tmp_path, progress=False)
    reasons = dict(res.skipped)
    assert "gzipped file (inflated so far)" in reasons[str(bomb)]
    assert "over the per-file limit" in reasons[str(bomb)]
    assert "gzip" in reasons[str(bad)]


def test_magnitude_and_phase_never_merge(tmp_path):
    # equal trigger times at every position: merged, half would be "duplicates" (or fake phases)
    mag = make_series(tmp_path / "s", n_slices=5, n_phases=3, seed=1)
    phase = make_series(tmp_path / "s", n_slices=5, n_phases=3, seed=2)
    for f in phase:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        ds.PixelData = (np.full((ds.Rows, ds.Columns), 4000, "<u2")).tobytes()
        ds.save_as(f)
    res = scan(tmp_path / "s", phases="all", progress=False)
    assert len(res.stacks) == 3 and all(s.meta["image_type"] == "MAGNITUDE" for s in res.stacks)
    assert all(s.images.max() < 4000 for s in res.stacks)
    aside = {p for p, r in res.skipped if r.startswith("set aside") and "phase images" in r}
    assert aside == {str(f) for f in phase} and len(res.skipped) == len(phase)
    assert [truth(s)[1] for s in res.stacks] == [[t] * 5 for t in range(3)]
    st, sk, _ = dcm.scan_dicom(mag + phase, phases="all", kinds=None, progress=False)
    assert sorted(s.meta["image_type"] for s in st) == ["MAGNITUDE"] * 3 + ["PHASE"] * 3 and not sk


def test_echoes_never_merge(tmp_path):
    files = make_series(tmp_path / "e1", n_slices=4, n_phases=2, seed=3) + \
        make_series(tmp_path / "e2", n_slices=4, n_phases=2, seed=4)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.EchoNumbers = 1 + (i >= 8)
        ds.save_as(f)
    res = scan(tmp_path, phases="all", progress=False)
    assert not res.skipped
    assert sorted((s.phase, s.meta["echo"]) for s in res.stacks) == \
        [("ED", "echo 1"), ("ED", "echo 2"), ("ES", "echo 1"), ("ES", "echo 2")]


@pytest.mark.parametrize("types,kind", [
    (["ORIGINAL", "PRIMARY", "M", "ND"], "MAGNITUDE"), (["ORIGINAL", "PRIMARY", "P", "ND"], "PHASE"),
    (["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], "MAGNITUDE"),
    (["ORIGINAL", "PRIMARY", "P_SE", "P", "SE"], "PHASE"), (["DERIVED", "PRIMARY", "R_IR"], "REAL"),
    (["ORIGINAL", "PRIMARY", "T1", "FIELD_MAP"], "FIELD_MAP"), (["ORIGINAL", "PRIMARY"], "MAGNITUDE")])
def test_image_kind(types, kind):
    assert image_kind(_item(ImageType=types)) == kind


# --- the vendor series (dcm2niix's test corpora) against dcm2niix's own conversions ---


def _match(ours, ref):
    """The axis permutation and flips of dcm2niix's volume (x, y, z) that give our (S, H, W)
    stack exactly, or None. Returns (perm, scale, offset): ref values map to ours as a * ref + b
    (dcm2niix's Philips scaling differs from RescaleSlope; everything else must be a=1, b=0)."""
    for perm in itertools.permutations(range(3)):
        r = np.transpose(ref, perm)
        if r.shape != ours.shape:
            continue
        for flips in itertools.product([False, True], repeat=3):
            rr = r[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
            a, b = np.polyfit(rr.ravel().astype(np.float64), ours.ravel().astype(np.float64), 1)
            if np.allclose(a * rr + b, ours, rtol=1e-5, atol=1e-3 * max(1.0, np.abs(ours).max())):
                return perm, a, b
    return None


def _ref(rel):
    import nibabel as nib
    img = nib.load(str(_shared(f"{VENDORS}/{rel}")))
    return np.asarray(img.get_fdata(), np.float64), img.header.get_zooms()


def _check(stack, ref_rel, t=None, exact=True):
    ref, zooms = _ref(ref_rel)
    if t is not None:
        ref, zooms = ref[..., t], zooms[:3]
    m = _match(stack.images, ref)
    assert m is not None, f"{stack.key} does not match {ref_rel} up to axis order and flips"
    perm, a, b = m
    if exact:
        assert a == pytest.approx(1, abs=1e-6) and b == pytest.approx(0, abs=1e-3)
    ours = (stack.spacing[2], stack.spacing[0], stack.spacing[1])  # (S, H, W)
    assert ours == pytest.approx([zooms[p] for p in perm], abs=1e-3)


def _vendor_scan(folder, **kw):
    root = _shared(f"{VENDORS}/{folder}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcm.scan_dicom(sorted(str(p) for p in root.iterdir()), phases="all", progress=False, **kw)


def test_xa30_enhanced_anatomy_and_two_echoes():
    st, sk, _ = _vendor_scan("xa30/In/5_anat-T1w_acq-tfl")
    assert not sk and len(st) == 1 and st[0].n_slices == 96
    _check(st[0], "xa30/Ref/5_anat-T1w_acq-tfl.nii")
    st, sk, _ = _vendor_scan("xa30/In/8_gre_field_mapping")
    assert not sk and [s.meta["echo"] for s in st] == ["TE 10 ms", "TE 12.46 ms"]
    _check(st[0], "xa30/Ref/8_gre_field_mapping_e1.nii")
    _check(st[1], "xa30/Ref/8_gre_field_mapping_e2.nii")


def test_xa30_phase_map_is_set_aside_or_its_own_stack():
    st, sk, _ = _vendor_scan("xa30/In/9_gre_field_mapping")
    assert not st and len(sk) == 1 and "set aside: 33 of 33 frames are phase images" in sk[0][1]
    st, sk, _ = _vendor_scan("xa30/In/9_gre_field_mapping", kinds=None)
    assert len(st) == 1 and st[0].meta["image_type"] == "PHASE"
    _check(st[0], "xa30/Ref/9_gre_field_mapping_e2_ph.nii")


def test_xa10_volume_split_over_four_files():
    st, sk, warns = _vendor_scan("enh/In/Siemens/XA10")
    assert not sk and [s.frame for s in st] == [0, 1, 2, 3]
    assert all(s.meta["phase_source"] == "TemporalPositionIndex" for s in st)
    for t, s in enumerate(st):
        _check(s, "enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii", t=t)


def test_philips_enhanced_magnitude_and_field_map():
    st, sk, _ = _vendor_scan("enh/In/Philips")
    assert len(st) == 1 and st[0].n_slices == 32 and "32 of 64 frames are field_map" in sk[0][1]
    _check(st[0], "enh/Ref/Philips_WIP_B0_NS_801_e1.nii", exact=False)  # dcm2niix: Philips scaling
    st, sk, _ = _vendor_scan("enh/In/Philips", kinds=None)
    fmap = next(s for s in st if s.meta["image_type"] == "FIELD_MAP")
    _check(fmap, "enh/Ref/Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", exact=False)


def _demosaic(img, n, tile=64):
    per_row = img.shape[1] // tile
    return np.stack([img[(z // per_row) * tile:(z // per_row + 1) * tile,
                         (z % per_row) * tile:(z % per_row + 1) * tile] for z in range(n)])


@pytest.mark.parametrize("i", range(1, 10))
def test_nine_transfer_syntaxes_decode_to_the_same_pixels(i):
    # explicit/implicit LE, big endian, RLE, JPEG Lossless x2, JPEG-LS x2, JPEG 2000: the decoders
    # of the default install (pyproject) must handle all of them
    ts = _shared(f"{VENDORS}/ts/In")
    (s,) = dicom_slices.read_images(ts / f"{i}.dcm")
    (plain,) = dicom_slices.read_images(ts / "1.dcm")
    np.testing.assert_array_equal(s.image, plain.image)
    ref, _ = _ref(f"ts/Ref/{i}.nii")
    assert _match(_demosaic(s.image, ref.shape[2]), ref)[1:] == pytest.approx((1, 0), abs=1e-6)


@pytest.mark.parametrize("name,ref", [("12bitUnsigned.dcm", "2"), ("12bitUnsigned_0x0F0F.dcm", "3"),
                                      ("12bitSigned_0x0F0F.dcm", "4")])
def test_12bit_stored_pixels(name, ref):
    (s,) = dicom_slices.read_images(_shared(f"{VENDORS}/12bit/In/{name}"))
    r, _ = _ref(f"12bit/Ref/{ref}.nii")
    assert _match(_demosaic(s.image, r.shape[2]), r)[1:] == pytest.approx((1, 0), abs=1e-6)


# --- the built-in cohort as enhanced DICOM (`stackcls synth --enhanced`) ---


def test_synth_enhanced_gives_the_classic_cohorts_stacks(tmp_path, monkeypatch, capsys):
    from stackcls import phantom
    from stackcls.cli import main
    from stackcls.io import load_stacks
    import stackcls.phantom.render as R
    orig = R.render_subject
    monkeypatch.setattr(phantom, "render_subject", lambda s, i, m=1.0: orig(s, i, 0.25))
    monkeypatch.setenv("STACKCLS_WORKERS", "1")
    assert main(["synth", "--subjects", "3", "--out", str(tmp_path / "enh"), "--seed", "5",
                 "--enhanced"]) == 0
    assert main(["synth", "--subjects", "3", "--out", str(tmp_path / "classic"), "--seed", "5"]) == 0
    assert "3 DICOM files" in capsys.readouterr().out.split("\n")[0]
    files = sorted((tmp_path / "enh" / "dicom").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 3 and all(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID ==
                                   EnhancedMRImageStorage for f in files)
    enh = load_stacks(tmp_path / "enh" / "dicom", labels=tmp_path / "enh" / "labels.csv")
    classic = load_stacks(tmp_path / "classic" / "dicom", labels=tmp_path / "classic" / "labels.csv")
    assert len(enh) == 6 and all(s.labels for s in enh)
    for a, b in zip(enh, classic):
        b.meta["series_description"] = a.meta["series_description"]  # the one header that differs
    same_stacks(enh, classic)
    assert [s.labels for s in enh] == [s.labels for s in classic]
    assert main(["inspect", str(tmp_path / "enh" / "dicom")]) == 0
