"""The built-in synthetic cohort: 3-D cardiac phantoms written as real DICOM cine series.

    root = cohort(100, seed=0)          # cached; root/"dicom"/<subject>/..., root/"labels.csv",
                                        # root/"masks"/<subject>/{ED,ES}.nii.gz (stackcls.io.masks)
    stacks = stackcls.io.load_stacks(root / "dicom", labels=root / "labels.csv",
                                     masks=root / "masks")

Subject i depends only on (seed, i), so cohorts of different sizes share their first subjects.
Modules: anatomy (3-D geometry), render (acquisition, contrast, labels), dicom_write, montage.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from stackcls.cache import cache_dir
from stackcls.io.masks import mask_file, write_mask
from stackcls.phantom.render import SubjectData, render_subject
from stackcls.progress import bar as tqdm

# Bump when the generator's output changes: old caches are then ignored, never reused.
VERSION = "4"                 # 4: masks/
LABEL_COLUMNS = ("subject", "frame", "phase", "slice", "label")

__all__ = ["cohort", "synth_command", "generate", "render_subject", "SubjectData", "VERSION",
           "cache_root"]


def cache_root() -> Path:
    """$STACKCLS_CACHE/phantom, else ~/.cache/stackcls/phantom."""
    return cache_dir("phantom")


def _label_rows(d: SubjectData) -> list[dict]:
    return [dict(subject=d.subject, frame=d.frames[ph], phase=ph, slice=k, label=lab)
            for ph in ("ED", "ES") for k, lab in enumerate(d.labels[ph])]


def _make_subject(args) -> tuple[list[dict], dict]:
    seed, i, out, matrix_scale, enhanced = args
    from stackcls.phantom import dicom_write  # workers import lazily
    d = render_subject(seed, i, matrix_scale)
    write = dicom_write.write_subject_enhanced if enhanced else dicom_write.write_subject
    files = write(d, Path(out) / "dicom", seed)
    for ph, m in d.masks.items():  # slice k = apex-to-base rank k, the DICOM reader's slice id
        write_mask(mask_file(Path(out) / "masks", d.subject, ph), m,
                   (*d.pixel_spacing, d.spacing))
    info = dict(subject=d.subject, group=d.anatomy.group, slices=d.pixels.shape[1],
                phases=d.pixels.shape[0], files=len({p for _, _, p in files}), bytes=int(d.pixels.nbytes))
    return _label_rows(d), info


def generate(out: Path, n_subjects: int, seed: int = 0, matrix_scale: float = 1.0,
             workers: int | None = None, progress: bool = True, enhanced: bool = False) -> dict:
    """Render subjects 0..n-1 into out/dicom and out/masks, and write out/labels.csv and
    out/cohort.json. enhanced: one Enhanced MR multi-frame file per subject instead of one file
    per image.
    Returns the summary dict (also stored in cohort.json)."""
    if n_subjects < 1:
        raise ValueError(f"phantom: n_subjects must be >= 1, got {n_subjects}")
    out = Path(out)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = int(os.environ.get("STACKCLS_WORKERS", min(2, os.cpu_count() or 1)))
    workers = max(1, min(workers, n_subjects // 3 or 1))
    jobs = [(seed, i, str(out), matrix_scale, enhanced) for i in range(n_subjects)]
    t0 = time.perf_counter()
    bar = dict(total=n_subjects, desc="phantom subjects", unit="subj", disable=not progress,
               file=sys.stderr)
    if workers == 1:
        results = [_make_subject(j) for j in tqdm(jobs, **bar)]
    else:
        # spawn: the caller may hold JAX/threads, which fork would copy in a broken state.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            results = list(tqdm(pool.imap(_make_subject, jobs), **bar))
    rows = [r for rs, _ in results for r in rs]
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    infos = [info for _, info in results]
    summary = dict(
        version=VERSION, seed=seed, n_subjects=n_subjects, matrix_scale=matrix_scale,
        stacks=2 * n_subjects, slices=sum(i["slices"] for i in infos) * 2,
        files=sum(i["files"] for i in infos), enhanced=enhanced, pixel_bytes=sum(i["bytes"] for i in infos),
        class_counts=dict(Counter(r["label"] for r in rows)),
        groups=dict(Counter(i["group"] for i in infos)),
        seconds=round(time.perf_counter() - t0, 2), workers=workers)
    (out / "cohort.json").write_text(json.dumps(summary, indent=1))
    return summary


def cohort(n_subjects: int, seed: int = 0, cache_dir: str | Path | None = None, *,
           matrix_scale: float = 1.0) -> Path:
    """The cached cohort of n_subjects for this seed: a folder with dicom/<subject>/...,
    masks/<subject>/{ED,ES}.nii.gz and labels.csv. Generated once (into a temp folder renamed into place, so an interrupted run
    never leaves a partial cache) and reused afterwards."""
    base = Path(cache_dir) if cache_dir is not None else cache_root()
    key = f"n={n_subjects};seed={seed};scale={matrix_scale};v={VERSION}"
    name = f"n{n_subjects}_seed{seed}_" + hashlib.sha256(key.encode()).hexdigest()[:10]
    final = base / name
    if (final / "labels.csv").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=base))
    try:
        generate(tmp, n_subjects, seed, matrix_scale)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "labels.csv").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def synth_command(subjects: int, out, seed: int = 0, enhanced: bool = False) -> int:
    """`stackcls synth`: write the cohort layout (dicom/, masks/, labels.csv, cohort.json) into
    OUT; `--enhanced`: one Enhanced MR multi-frame file per subject."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"stackcls synth: {out} exists and is not an empty folder; choose a new --out",
              file=sys.stderr)
        return 2
    if subjects < 1:
        print(f"stackcls synth: --subjects must be >= 1, got {subjects}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        s = generate(tmp, subjects, seed, enhanced=enhanced)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cc = s["class_counts"]
    print(f"wrote {s['n_subjects']} subjects, {s['stacks']} stacks (ED+ES), {s['slices']} labelled "
          f"slices, {s['files']} DICOM files and their anatomy masks (masks/) to {out}")
    print("labels: " + ", ".join(f"{k} {cc.get(k, 0)}" for k in ("OAP", "IN", "OBS"))
          + f"; groups: {s['groups']}; {s['seconds']} s with {s['workers']} worker(s)")
    return 0
