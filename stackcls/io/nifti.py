"""NIfTI stacks: a 3-D file is one stack, a 4-D file is a cine; plus the ACDC folder layout.

Array layout: nibabel's (i, j, k[, t]) = (rows, cols, slices[, time]) -> images (S, rows, cols).
Orientation: checked, not trusted. An affine that can describe a short-axis acquisition (oblique,
non-singular, voxel sizes equal to pixdim) gives the apex end (RAS, flipped to LPS). Anything else
(missing, identity, axis-aligned, singular, NaN, a scale that disagrees with pixdim) is a
placeholder: the file order is kept, `orientation_known=False` with the reason in
`meta["orientation"]`, and the direction is decided from the images at prediction time. A dataset's
documented convention may give the starting order (ACDC: slice 0 is basal, so slices are reversed).
Spacing comes from pixdim, except for the placeholder that `nib.Nifti1Image(array, np.eye(4))`
writes: an identity or unit-diagonal affine with in-plane pixdim 1 x 1. Public conversions write it
whatever the true pixel size (cardiac cines are ~1.2-2 mm), so it means "unknown": the in-plane part
of `Stack.spacing` is NaN (the tuple keeps its (row, col, slice) layout, NaN marks what is unknown,
as for DICOM), `meta["spacing_source"]` says why, and a warning names the file. The anatomy model
then estimates the spacing from the images (`stackcls.preprocess.spacing`). The ACDC release
(unit-scale affine, pixdim 1.5 x 1.5 x 10) keeps its pixdim.

Masks: an image's `<stem>_gt.nii.gz` (or `.nii`) beside it (ACDC's naming) is read as its
`Stack.masks`, in the image's slice order; a bad one is reported in `skipped` and the image loads
without masks.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from stackcls.io.errors import StackReadError, printable
from stackcls.io.geometry import apex_to_base, estimate_es, resolve_phases
from stackcls.io.limits import check_file, decoded_bytes
from stackcls.stack import Stack, mask_problem

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ACDC_FRAME = re.compile(r"^(?P<subject>.+)_frame(?P<frame>\d+)\.nii(\.gz)?$")
ACDC_ORIENTATION = "acdc convention: slice 0 basal"
SPACING_PIXDIM = "pixdim"
SPACING_UNKNOWN = "unknown: identity affine with pixdim 1"


def is_nifti(path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def mask_beside(path) -> Path | None:
    """The mask file `<stem>_gt.nii.gz` (or `.nii`) beside an image file, if there is one."""
    path = Path(path)
    for suf in (".nii.gz", ".nii"):
        gt = path.with_name(nifti_stem(path) + "_gt" + suf)
        if gt.is_file():
            return gt
    return None


def is_mask_of_image(path) -> bool:
    """A `<stem>_gt` NIfTI whose image `<stem>.nii[.gz]` lies beside it: a mask, not an image."""
    if not is_nifti(path):
        return False
    stem = nifti_stem(path)
    return (stem.endswith("_gt")
            and any(Path(path).with_name(stem[:-3] + suf).is_file() for suf in NIFTI_SUFFIXES))


def read_mask(path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A mask NIfTI as (rows, cols, slices) uint8, values checked (integers in 0..3, see
    stack.MASK_CLASSES) and, when `shape` is given, its shape; StackReadError naming the file."""
    _, data = _load(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StackReadError(path, f"mask of shape {data.shape}: expected 3-D (rows, cols, slices)")
    if (problem := mask_problem(data, data.shape if shape is None else shape)) is not None:
        raise StackReadError(path, problem)
    return data.astype(np.uint8)


def _masks_beside(image: Path, shape, order, skipped: list) -> np.ndarray | None:
    """(S, rows, cols) masks in `order` from the image's `_gt` file, None when there is none or it
    is bad (then reported in `skipped`: the image is still usable)."""
    gt = mask_beside(image)
    if gt is None:
        return None
    try:
        return np.moveaxis(read_mask(gt, shape), 2, 0)[order]
    except StackReadError as e:
        skipped.append((e.path, f"mask not used, {image.name} loaded without masks: {e.reason}"))
        return None


def _check_offset(path) -> None:
    """vox_offset from the raw header, before nibabel reads the header extensions up to it (a
    gzipped header can declare gigabytes of extensions in a few hundred KB)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(176)
    except (OSError, EOFError, zlib.error):
        return  # nibabel reports the unreadable file
    if len(raw) < 176:
        return
    for end in "<>":
        size = struct.unpack(end + "i", raw[:4])[0]
        if size in (348, 540):
            off = (struct.unpack(end + "f", raw[108:112])[0] if size == 348
                   else struct.unpack(end + "q", raw[168:176])[0])
            check_file(path, off if math.isfinite(off) else math.inf, "NIfTI header with vox_offset "
                       f"{off:g} (header extensions read up to it)")
            return


def _load(path):
    # imported on the first NIfTI read: nibabel takes ~0.6 s, and DICOM-only users never need it
    import nibabel as nib

    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise StackReadError(path, f"cannot read file ({e.strerror or type(e).__name__})") from None
    check_file(path, size, "file size on disk")
    _check_offset(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.header.get_data_shape())
        itemsize = img.get_data_dtype().itemsize
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise StackReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    check_file(path, decoded_bytes(math.prod(shape), itemsize),  # before anything is decompressed
               f"declared NIfTI shape {shape} at {itemsize} byte(s) per voxel")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except Exception as e:  # noqa: BLE001
        raise StackReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    return img, data


def _zooms(img):
    """Voxel spacing (row, col, slice) in mm from pixdim, or None when it is not usable. pixdim is
    read apart from the affine: an affine can be meaningless while the spacing is right (ACDC)."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(zooms) == 3 and all(np.isfinite(z) and z > 0 for z in zooms):
        return zooms
    return None


def affine_problem(aff: np.ndarray, codes: tuple[int, int], zooms) -> str | None:
    """Why this affine cannot be the geometry of a short-axis acquisition, or None if it can.

    Conversions often write placeholders: no qform/sform, the identity, a flipped identity with unit
    scale while pixdim says 1.5 x 1.5 x 10 mm (the ACDC release). A real short-axis plane is
    double-oblique, so an affine whose axes are the scanner axes is doubtful even when its scale is
    right; such a stack is oriented from its images instead.
    """
    if codes == (0, 0):
        return "no qform or sform (codes 0)"
    if not np.all(np.isfinite(aff)):
        return "affine holds NaN or infinite values"
    if np.allclose(aff, np.eye(4)):
        return "the affine is the identity"
    m = aff[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(m)) < 1e-6 * float(np.prod(norms)):
        return "singular affine (its axes are not independent)"
    if zooms is not None and not np.allclose(norms, zooms, rtol=0.01, atol=1e-3):
        return ("affine voxel sizes (" + ", ".join(f"{v:g}" for v in norms) + ") mm disagree with "
                "pixdim (" + ", ".join(f"{v:g}" for v in zooms) + ") mm")
    unit = m / norms
    if np.all(np.max(np.abs(unit), axis=0) > 1 - 1e-6):
        return "axis-aligned affine (a short-axis plane is oblique): a placeholder, not patient geometry"
    return None


def unit_placeholder(aff: np.ndarray, zooms) -> bool:
    """An identity or unit-diagonal affine (axis-aligned, every axis 1 mm) with in-plane pixdim
    1 x 1: what a conversion writes when it knows no geometry, not a 1 mm acquisition."""
    if zooms is None or not np.allclose(zooms[:2], 1.0, atol=1e-4):
        return False
    m = np.asarray(aff, np.float64)[:3, :3]
    return bool(np.all(np.isfinite(m)) and np.allclose(np.abs(m), np.eye(3), atol=1e-6))


def _spacing(img, path):
    """(spacing, source): pixdim, or NaN in-plane for the unit placeholder (warned, naming the
    file). The slice spacing keeps pixdim: only the in-plane scale feeds the models."""
    zooms = _zooms(img)
    if not unit_placeholder(np.asarray(img.affine, np.float64), zooms):
        return zooms, SPACING_PIXDIM
    # printable: a warning carries the name to every handler (xdist cannot send a lone surrogate)
    warnings.warn(printable(f"{path}: identity affine with pixdim 1 x 1: pixel spacing unknown "
                            "(not 1 mm); the anatomy model estimates it from the images"), stacklevel=3)
    return (math.nan, math.nan, zooms[2]), SPACING_UNKNOWN


def _geometry(img, n_slices: int):
    """(order, positions, known, note, spacing). order is None when the affine is not trusted
    (`affine_problem`); positions then come from pixdim along the file's slice order."""
    hdr = img.header
    codes = (int(hdr.get("sform_code", 0) or 0), int(hdr.get("qform_code", 0) or 0))
    aff = np.asarray(img.affine, dtype=np.float64)
    zooms = _zooms(img)
    problem = affine_problem(aff, codes, zooms)
    if problem is not None:
        pos = None if zooms is None else np.arange(n_slices) * zooms[2]
        return None, pos, False, f"orientation unknown: {problem}", zooms
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    col_k = ras_to_lps @ aff[:3, 2]  # one slice step in LPS mm
    step = float(np.linalg.norm(col_k))
    normal = col_k / step
    origin = ras_to_lps @ aff[:3, 3]
    along = float(origin @ normal) + np.arange(n_slices) * step  # slice centres along the normal
    order, pos, known, note = apex_to_base(normal, along)
    return order, pos, known, "affine (RAS -> LPS): " + note, zooms


def read_nifti(path, phases=("ED", "ES"), es=None, subject: str | None = None,
               skipped: list | None = None) -> list[Stack]:
    """Read one NIfTI file. 3-D: one stack (phase 'ED' unless `phases` names one index), with the
    masks of a `_gt` file beside it. 4-D: a cine, frame 0 = ED, ES estimated (see
    geometry.estimate_es) unless `es` is given. A bad `_gt` file is appended to `skipped`."""
    path = Path(path)
    img, data = _load(path)
    subject = subject or nifti_stem(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise StackReadError(path, f"NIfTI of shape {data.shape}: expected 3-D (rows, cols, slices) "
                                   "or 4-D (rows, cols, slices, time)")
    if data.shape[2] < 2:
        raise StackReadError(path, f"NIfTI of shape {data.shape} has a single slice: not a stack")
    if not np.all(np.isfinite(data)):
        raise StackReadError(path, "NIfTI holds NaN or infinite values")
    cine = data[None] if data.ndim == 3 else np.moveaxis(data, 3, 0)  # (T, rows, cols, S)
    cine = np.moveaxis(cine, 3, 1)  # (T, S, rows, cols)
    T, S = cine.shape[:2]
    order, pos, known, note, _ = _geometry(img, S)
    zooms, spacing_how = _spacing(img, path)
    if order is None:
        order = np.arange(S)
    if T == 1:
        es_t, es_how = -1, "single 3-D volume: one phase"
    elif es is not None:
        es_t, es_how = int(es), "given by the caller"
        if not 0 <= es_t < T:
            raise StackReadError(path, f"ES frame {es_t} is outside the {T} frames of the cine")
    else:
        es_t, es_how = estimate_es(cine[:, order])
    sel = [(0, "ED")] if T == 1 else resolve_phases(phases, T, es_t)
    # a single mask cannot say which frame of a cine it draws
    masks = _masks_beside(path, data.shape, order, [] if skipped is None else skipped) \
        if T == 1 else None
    stacks = []
    for t, name in sel:
        stacks.append(Stack(
            images=cine[t, order], sources=[str(int(i)) for i in order], subject=subject,
            phase=name, slice_ids=[int(i) for i in order], frame=t if T > 1 else None,
            positions=pos, spacing=zooms, orientation_known=known, masks=masks,
            meta=dict(format="nifti", file=str(path), orientation=note, n_phases=T,
                      es_frame=es_t if es_t >= 0 else None, es_source=es_how,
                      spacing_source=spacing_how),
        ))
    return stacks


def read_info_cfg(path) -> dict:
    """ACDC Info.cfg ("ED: 1", "ES: 12", ...) -> dict of strings."""
    out = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise StackReadError(path, f"line {i}: expected 'key: value', got {line!r}")
        k, v = line.split(":", 1)
        out[k.strip()] = v.strip()
    return out


def is_acdc_patient_dir(folder: Path) -> bool:
    return (folder / "Info.cfg").is_file()


def read_acdc_patient(folder: Path, phases=("ED", "ES")):
    """One ACDC patient folder -> (stacks, skipped, ignored).

    Frames come from `<subject>_frameYY.nii.gz` (YY = frame number, 1-based as in Info.cfg);
    `<subject>_frameYY_gt.nii.gz` is the frame's masks (listed as ignored, as an image); `_4d`
    cines are ignored. The dataset has no geometry and slice 0 is basal, so the slices are reversed
    to run apex -> base; slice_ids keep the file's slice index.
    """
    folder = Path(folder)
    stacks, skipped, ignored = [], [], []
    try:
        info = read_info_cfg(folder / "Info.cfg")
        ed, es = int(info["ED"]), int(info["ES"])
    except (KeyError, ValueError) as e:
        reason = e.reason if isinstance(e, StackReadError) else f"needs integer ED and ES entries ({e})"
        skipped.append((str(folder / "Info.cfg"), reason))
        return stacks, skipped, ignored
    frames = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if f.name == "Info.cfg":
            continue
        stem = nifti_stem(f)
        if not is_nifti(f):
            ignored.append((str(f), "not a NIfTI file"))
        elif stem.endswith("_gt"):
            ignored.append((str(f), "segmentation mask (_gt)"))
        elif stem.endswith("_4d"):
            ignored.append((str(f), "4-D cine (frames are read from the _frameYY files)"))
        elif (m := ACDC_FRAME.match(f.name)) is None:
            skipped.append((str(f), "NIfTI name does not follow <subject>_frameYY.nii.gz"))
        else:
            frames[int(m.group("frame"))] = (m.group("subject"), f)
    if isinstance(phases, str) and phases == "all":
        want = sorted(frames)
    else:
        want = []
        for p in ((phases,) if isinstance(phases, (str, int)) else phases):
            t = ed if p == "ED" else es if p == "ES" else int(p)
            if t not in want:
                want.append(t)
    for t in want:
        if t not in frames:
            skipped.append((str(folder), f"frame {t} named by Info.cfg/phases has no "
                                         f"<subject>_frame{t:02d}.nii.gz file"))
            continue
        subject, f = frames[t]
        try:
            img, data = _load(f)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise StackReadError(f, f"ACDC frame of shape {data.shape}: expected 3-D "
                                        "(rows, cols, slices)")
            if data.shape[2] < 2:
                raise StackReadError(f, f"NIfTI of shape {data.shape} has a single slice")
            order, pos, known, note, _ = _geometry(img, data.shape[2])
            zooms, spacing_how = _spacing(img, f)
            if order is None:  # the dataset's convention (slice 0 basal) is the prior
                order, note = np.arange(data.shape[2])[::-1], f"{ACDC_ORIENTATION} ({note})"
            name = "ED" if t == ed else "ES" if t == es else str(t)
            stacks.append(Stack(
                images=np.moveaxis(data, 2, 0)[order], sources=[str(int(i)) for i in order],
                subject=subject, phase=name, slice_ids=[int(i) for i in order], frame=t,
                positions=pos, spacing=zooms, orientation_known=known,
                masks=_masks_beside(f, data.shape, order, skipped),
                meta=dict(format="nifti", layout="acdc", file=str(f), orientation=note,
                          es_frame=es, es_source="Info.cfg", group=info.get("Group"),
                          spacing_source=spacing_how),
            ))
        except StackReadError as e:
            skipped.append((e.path, e.reason))
    return stacks, skipped, ignored
