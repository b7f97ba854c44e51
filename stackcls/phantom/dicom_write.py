"""Write one synthetic subject as a real DICOM cine series: classic MR Image Storage (one file per
slice and phase) or Enhanced MR Image Storage (one multi-frame file, as Siemens XA scanners export),
explicit VR little endian.

Everything a reader must not rely on is varied between subjects: file names are random, the
InstanceNumber order is sometimes shuffled or runs base->apex, SliceLocation uses either sign
convention, images may be mirrored (slice normal towards the apex) and RescaleSlope is not always 1.
UIDs are derived from (seed, subject index) so a cohort is byte-for-byte reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from stackcls.phantom.render import SubjectData


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["stackcls-phantom", *map(str, parts)])


def _ds(v: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.4g}"


def _subject_header(ds, d, seed: int, description: str) -> None:
    """The patient, study and series attributes both layouts (classic and enhanced) share."""
    ds.Modality = "MR"
    ds.Manufacturer = "stackcls phantom"
    ds.PatientID = d.subject
    ds.PatientName = f"Phantom^{d.subject}"
    ds.PatientPosition = "HFS"
    ds.StudyDate = "20260101"
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SeriesNumber = 1 + int(seed % 1000)


def write_subject(d: SubjectData, out_dir: Path, seed: int) -> list[tuple[int, int, Path]]:
    """Write all frames of subject `d` under out_dir/<subject>/; returns (phase, slice, path) for
    every file (slice = apex-to-base rank)."""
    out = Path(out_dir) / d.subject
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(d.dicom["name_seed"])
    P, S, H, W = d.pixels.shape
    study, series, frame_ref = (_uid(seed, d.subject, k) for k in ("study", "series", "for"))
    r, c = d.iop[:3], d.iop[3:]
    normal = np.cross(r, c)
    # InstanceNumber: slice-major, apex->base or base->apex, or shuffled.
    order = [(p, s) for s in (range(S - 1, -1, -1) if d.dicom["reversed_instances"] else range(S))
             for p in range(P)]
    inst = {ps: i + 1 for i, ps in enumerate(order)}
    if d.dicom["shuffled_instances"]:
        perm = rng.permutation(len(order)) + 1
        inst = {ps: int(perm[i]) for i, ps in enumerate(order)}
    ext = ".dcm" if rng.random() < 0.5 else ""
    rr = float(np.diff(d.trigger_times).mean() * P)
    written = []
    for (p, s), number in inst.items():
        sop = _uid(seed, d.subject, p, s)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / (f"{rng.integers(16 ** 10):010x}" + ext)
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame_ref
        _subject_header(ds, d, seed, "SA cine bSSFP (synthetic)")
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = number
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SK\\SS"
        ds.MRAcquisitionType = "2D"
        ds.MagneticFieldStrength = "1.5"
        ds.RepetitionTime = "3.0"
        ds.EchoTime = "1.5"
        ds.FlipAngle = "55"
        ds.TriggerTime = _ds(float(d.trigger_times[p]))
        ds.NominalInterval = _ds(round(rr))
        ds.CardiacNumberOfImages = P
        ds.HeartRate = int(round(60000 / rr))
        ds.ImagePositionPatient = [_ds(v) for v in d.ipp[s]]
        ds.ImageOrientationPatient = [_ds(v) for v in d.iop]
        ds.PixelSpacing = [_ds(v) for v in d.pixel_spacing]
        ds.SliceThickness = _ds(d.thickness)
        ds.SpacingBetweenSlices = _ds(d.spacing)
        ds.SliceLocation = _ds(d.dicom["sliceloc_sign"] * float(d.ipp[s] @ normal))
        ds.Rows, ds.Columns = H, W
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = _ds(d.slope)
        ds.RescaleIntercept = _ds(d.intercept)
        ds.PixelData = np.ascontiguousarray(d.pixels[p, s]).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        written.append((p, s, path))
    return written



def _item(**values) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def write_subject_enhanced(d: SubjectData, out_dir: Path, seed: int) -> list[tuple[int, int, Path]]:
    """Write all frames of subject `d` as one Enhanced MR file under out_dir/<subject>/; returns
    (phase, slice, path) for every frame. The same header values as `write_subject`, moved into the
    functional groups: orientation, pixel measures and rescale shared; position, trigger delay and
    temporal position per frame. Frames are stored in the shuffled or reversed order of the classic
    InstanceNumbers, so a reader cannot rely on frame order either."""
    out = Path(out_dir) / d.subject
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(d.dicom["name_seed"])
    P, S, H, W = d.pixels.shape
    study, series, frame_ref = (_uid(seed, d.subject, k) for k in ("study", "series", "for"))
    order = [(p, s) for s in (range(S - 1, -1, -1) if d.dicom["reversed_instances"] else range(S))
             for p in range(P)]
    if d.dicom["shuffled_instances"]:
        order = [order[i] for i in rng.permutation(len(order))]
    rr = float(np.diff(d.trigger_times).mean() * P)
    sop = _uid(seed, d.subject, "enhanced")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = out / (f"{rng.integers(16 ** 10):010x}" + (".dcm" if rng.random() < 0.5 else ""))
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedMRImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
    _subject_header(ds, d, seed, "SA cine bSSFP (synthetic, enhanced)")
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20260101120000"
    ds.InstanceNumber = 1
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = "1.5"
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = H, W
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=[_ds(v) for v in d.pixel_spacing], SliceThickness=_ds(d.thickness),
            SpacingBetweenSlices=_ds(d.spacing))]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[_ds(v) for v in d.iop])]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleSlope=_ds(d.slope), RescaleIntercept=_ds(d.intercept), RescaleType="US")]),
        MRImageFrameTypeSequence=Sequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="UNKNOWN")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(
            RepetitionTime=3.0, FlipAngle=55.0)]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=1.5)]),
    )])
    ds.PerFrameFunctionalGroupsSequence = Sequence([_item(
        FrameContentSequence=Sequence([_item(
            TemporalPositionIndex=p + 1, InStackPositionNumber=s + 1, StackID="1",
            DimensionIndexValues=[s + 1, p + 1])]),
        PlanePositionSequence=Sequence([_item(ImagePositionPatient=[_ds(v) for v in d.ipp[s]])]),
        CardiacSynchronizationSequence=Sequence([_item(
            NominalCardiacTriggerDelayTime=float(_ds(float(d.trigger_times[p]))),
            RRIntervalTimeNominal=float(round(rr)))]),
    ) for p, s in order])
    ds.PixelData = np.ascontiguousarray(np.stack([d.pixels[p, s] for p, s in order])
                                        ).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return [(p, s, path) for p, s in order]
