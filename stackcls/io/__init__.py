"""Files -> Stacks ordered apex to base: DICOM series, NIfTI files, the ACDC layout, labels CSV.

    stacks = load_stacks("study/")                       # DICOM folder, searched recursively
    stacks = load_stacks("../shared/data/acdc", labels="../shared/data/acdc/labels.csv")  # + _gt masks
    stacks = load_stacks("cohort/dicom", labels="cohort/labels.csv", masks="cohort/masks")
    res = scan(path)            # ScanResult(stacks, skipped=[(path, reason), ...], ignored=[...])

`stackcls inspect` is `stackcls.io.inspect`; any input of `predict_stack` -> one stack is
`stackcls.io.inputs`. Anatomy masks (`Stack.masks`): ACDC-style `_gt` files beside NIfTI images,
or a masks folder (`stackcls.io.masks`).

Bad files never stop a scan: each is reported with its reason (`scan` returns them, `load_stacks`
warns). `StackReadError` (a ValueError) is raised for a missing path, an empty folder or a source
without any stack (`load_stacks`), and for a bad labels CSV or masks folder.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

from stackcls.io import dicom as dcm
from stackcls.io import nifti as nii
from stackcls.io.errors import ScanResult, StackReadError, os_reason, printable
from stackcls.io.labels import (COLUMNS, LabelRow, attach_labels, es_frames, load_labels, rows_of,
                                save_labels)
from stackcls.io.masks import attach_masks, mask_file, write_mask
from stackcls.stack import Stack

__all__ = ["load_stacks", "scan", "load_labels", "save_labels", "attach_labels", "attach_masks",
           "mask_file", "write_mask", "ScanResult", "StackReadError", "LabelRow", "COLUMNS"]

# Files a study folder often holds next to images; not reported as failures.
_NOT_IMAGES = {".csv", ".md", ".txt", ".json", ".cfg", ".yaml", ".yml", ".png", ".jpg", ".jpeg",
               ".py", ".pdf", ".html", ".xml", ".log", ".zip", ".npz", ".npy", ".h5"}


def _unreadable(path) -> str | None:
    """Why a file cannot be opened (permission denied, symlink loop, not a regular file...), or
    None. Said as such, before a reader would call the file corrupt; a FIFO or device (say, a link
    to /dev/zero) is never opened at all."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file (a FIFO, socket or device)"
        with open(path, "rb"):
            pass
    except OSError as e:
        return os_reason(e)
    return None


def _split_folder(folder: Path):
    """Walk a folder: ACDC patient folders, NIfTI files, candidate DICOM files, ignored files, and
    skipped ones (files that cannot be opened, folders that cannot be listed, symlink loops).
    Symlinked folders are followed; each real folder is read once."""
    acdc, nifti, dicom, ignored, skipped = [], [], [], [], []

    def unlisted(e: OSError):       # os.walk would pass over a folder it cannot list in silence
        skipped.append((str(e.filename or folder), f"folder not read: {os_reason(e)}"))

    seen = {}                       # real path -> the path it was read under
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            first = seen[real]
            if os.path.commonpath([os.path.abspath(first), os.path.abspath(dirpath)]) == \
                    os.path.abspath(first):
                skipped.append((dirpath, f"symlink loop (leads back to {first}); not followed"))
            else:
                ignored.append((dirpath, f"same folder as {first} (symlink); read once"))
            continue
        seen[real] = dirpath
        for d in sorted(d for d in dirnames if d.startswith(".")):
            ignored.append((os.path.join(dirpath, d), "hidden folder (not searched)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "Info.cfg" in filenames and any(nii.is_nifti(f) for f in filenames):
            acdc.append(Path(dirpath))
            # an ACDC patient folder holds no further images
            ignored += [(os.path.join(dirpath, d), "folder inside an ACDC patient folder (not "
                                                  "searched)") for d in dirnames]
            dirnames[:] = []
            continue
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = os.path.join(dirpath, f)
            if os.path.splitext(f)[1].lower() in _NOT_IMAGES and not nii.is_nifti(f):
                ignored.append((p, f"not an image ({Path(f).suffix} file)"))
            elif nii.is_mask_of_image(p):
                ignored.append((p, "segmentation mask (_gt) of the image beside it"))
            elif (why := _unreadable(p)) is not None:
                skipped.append((p, why))
            elif nii.is_nifti(f):
                nifti.append(p)
            else:
                dicom.append(p)
    return acdc, nifti, dicom, ignored, skipped


def scan(source, phases=("ED", "ES"), labels=None, es=None, masks=None,
         progress: bool = True) -> ScanResult:
    """Read every stack under `source` and report every file that could not be used.

    source: a DICOM folder (recursive; several subjects and series allowed) or a list of DICOM files
        in any order; a NIfTI file (3-D: one stack, 4-D: a cine); a folder in the ACDC layout
        (`patientXXX/patientXXX_frameYY.nii.gz` + `Info.cfg`); or a folder mixing these.
    phases: ("ED", "ES") by default; names, temporal indices, or "all" for every cine phase (then
        the DICOM stacks' images are views of one buffer per scan: a stack kept alone keeps it
        all, so copy its images to keep only them).
    labels: optional labels CSV path (or rows) attached to the stacks it names; for DICOM/4-D NIfTI
        the ES frame it names is the one loaded.
    es: the ES temporal index (int), overriding the estimate (see geometry.estimate_es).
    masks: optional masks folder (`stackcls.io.masks`) attached to the stacks it names. Without it,
        NIfTI images still get the masks of a `<stem>_gt` file beside them.
    """
    rows = None
    if labels is not None:
        rows = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
        if es is None:
            rows = rows_of(rows)
            es = es_frames(rows) or None
    stacks, skipped, ignored, warns = [], [], [], []

    def nifti_file(p):
        try:
            e = es.get(nii.nifti_stem(p)) if isinstance(es, dict) else es
            stacks.extend(nii.read_nifti(p, phases=phases, es=e, skipped=skipped))
        except StackReadError as err:
            skipped.append((err.path, err.reason))

    if isinstance(source, (list, tuple)):
        files = [str(f) for f in source]
        bad = {f: why for f in files if (why := _unreadable(f)) is not None}
        skipped += bad.items()
        missing = list(bad)
        files = [f for f in files if f not in bad]
        for f in (f for f in files if nii.is_nifti(f)):
            if nii.is_mask_of_image(f):
                ignored.append((f, "segmentation mask (_gt) of the image beside it"))
            else:
                nifti_file(f)
        st, sk, warns = dcm.scan_dicom([f for f in files if not nii.is_nifti(f)], phases, es,
                                       progress)
        stacks += st
        skipped += sk
        if not files and not missing:
            raise StackReadError("<file list>", "empty list of files")
    else:
        source = Path(source)
        if not source.exists():
            raise StackReadError(source, _unreadable(source) if source.is_symlink()
                                 else "no such file or folder")
        if source.is_file():
            if (why := _unreadable(source)) is not None:
                skipped.append((str(source), why))
            elif nii.is_nifti(source):
                nifti_file(source)
            else:
                st, sk, warns = dcm.scan_dicom([source], phases, es, progress)
                stacks += st
                skipped += sk
        else:
            acdc, niftis, dicoms, ignored, unread = _split_folder(source)
            skipped += unread
            if not (acdc or niftis or dicoms or ignored or unread):
                skipped.append((str(source), "empty folder: no files found (searched recursively)"))
            for folder in acdc:
                st, sk, ig = nii.read_acdc_patient(folder, phases)
                stacks += st
                skipped += sk
                ignored += ig
            for f in niftis:
                nifti_file(f)
            if dicoms:
                st, sk, warns = dcm.scan_dicom(dicoms, phases, es, progress)
                stacks += st
                skipped += sk
    for w in warns:
        warnings.warn(printable(w), stacklevel=3)
    stacks.sort(key=lambda s: (s.subject, str(s.meta.get("series_uid", s.meta.get("file", ""))),
                               s.frame if s.frame is not None else -1))
    if rows is not None and stacks:
        attach_labels(stacks, rows if labels is not None and not isinstance(labels, (str, os.PathLike))
                      else labels)
    if masks is not None and stacks:
        attach_masks(stacks, masks)
    return ScanResult(stacks, skipped, ignored)


def load_stacks(source, phases=("ED", "ES"), labels=None, es=None, masks=None) -> list[Stack]:
    """Like `scan`, but returns only the stacks: each skipped file is reported with
    `warnings.warn` (file and reason), and a source without any stack raises StackReadError."""
    res = scan(source, phases=phases, labels=labels, es=es, masks=masks)
    for path, reason in res.skipped:
        warnings.warn(printable(f"skipped {path}: {reason}"), stacklevel=2)
    if not res.stacks:
        detail = "; ".join(f"{p}: {r}" for p, r in res.skipped[:5])
        more = f" (and {len(res.skipped) - 5} more)" if len(res.skipped) > 5 else ""
        raise StackReadError(source if not isinstance(source, (list, tuple)) else "<file list>",
                             f"no stack found{': ' + detail + more if detail else ''}")
    return res.stacks

