"""DICOM cine short-axis series -> Stacks ordered apex to base.

Files are found by content, not by name (any file under a folder; extensions are not trusted); a
gzipped file (.dcm.gz) is inflated first, within the per-file size limit. A classic file is one
image; an enhanced multi-frame file is one image per frame, each placed by its own functional
groups (dicom_enhanced.py), so both kinds go through the same grouping, ordering and ES logic.
Grouping: (PatientID or StudyInstanceUID, SeriesInstanceUID, image size, image kind and echo, slice
orientation); a file without SeriesInstanceUID is grouped by its folder, SeriesNumber and
SeriesDescription instead. Only magnitude images form stacks by default: phase, real, imaginary and
field-map images are set aside with the reason (they would otherwise pass for cine phases).
Headers are checked before any pixel is decoded (dicom_header.py: size limits, geometry, rescale).
Within a group: slice position = ImagePositionPatient . normal (normal = row x col of
ImageOrientationPatient); phases are ranked by TriggerTime at every position (InstanceNumber only as
a warned fallback); the apex end comes from LPS geometry (see geometry.apex_to_base), never from
InstanceNumber, file names or SliceLocation (whose sign differs between scanners).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from stackcls.io import dicom_enhanced as enh
from stackcls.io.errors import StackReadError
from stackcls.io.limits import StackBudget
from stackcls.io.dicom_pixels import PixelStore
from stackcls.io.dicom_series import stacks_from_slices
from stackcls.io.dicom_slices import _ChargeLog, read_images
from stackcls.progress import bar as tqdm

POOL_MIN_FILES = 400     # a scan of fewer files reads in this process (benchmarks/io.py)
POOL_SAMPLE = 24         # files read here first, timed, to choose between this process and a pool
POOL_SLOW_FILE_S = 0.002  # CPU seconds per file from which workers pay (see _read_in_pool)
MAX_WORKERS = 8


def _read_one(f: str, budget=None, pixels: bool = True, into=None, keep=None):
    """read_images, with a failure as the skipped entry (path, reason)."""
    try:
        return read_images(f, budget, pixels, into, keep)
    except StackReadError as e:
        return e.path, e.reason
    except OSError as e:
        return f, f"cannot read file ({e.strerror or e})"


def _read_header(f: str):
    log = _ChargeLog()
    return _read_one(f, log, pixels=False), log.calls


_shared: np.ndarray | None = None  # the pool's pass-2 output, float32, set before the fork


def _read_pixels(job):
    """Pass 2 in a worker: the file's images decoded into the shared memory at `offset`, as
    `n` images of `shape`; None, or the skipped entry (path, reason)."""
    f, offset, n, shape = job
    res = _read_one(f, into=_shared[offset:offset + n * shape[0] * shape[1]].reshape(n, *shape))
    return res if isinstance(res, tuple) else None


def _pool_size(files: list[str], workers: int | None) -> int:
    """Worker processes to read `files`: 1 (in this process) for fewer than POOL_MIN_FILES files,
    where starting workers costs more than they save; else one per usable core, at most
    MAX_WORKERS (scan_dicom still reads fast files here, see there). Workers are forked (a fresh
    interpreter would spend longer importing numpy and pydicom than most scans take), so only
    from a process without other threads: forking a
    multi-threaded process (JAX, a GUI) can deadlock the child. tqdm's monitor thread only sleeps
    between checks of its bars, and is allowed."""
    if workers is None:
        if len(files) < POOL_MIN_FILES:
            return 1
        try:
            workers = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        except AttributeError:  # not Linux
            workers = min(os.cpu_count() or 1, MAX_WORKERS)
    threads = [t for t in threading.enumerate()
               if t is not threading.main_thread() and t.name != "tqdm_monitor"]
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods() or threads \
            or "jax" in sys.modules:
        return 1
    return min(workers, len(files))


def _read_in_pool(files: list[str], n_workers: int, kinds, budget: StackBudget):
    """(slices, skipped) as the in-process loop gives them, read by n_workers processes in two
    passes: headers of every file (nothing decoded), `budget` charged here in file order, then
    pixels only for the files that have an image in a kept stack (not over the budget, a kept
    kind). Each worker holds one chunk of files at a time; the per-file limits apply in the
    workers as in one process. The rescaled images come back through memory shared with the
    workers of pass 2 (forked after it is allocated), not pickled through a pipe (which copies
    each image twice more)."""
    global _shared
    # imported here, not once per worker: it is most of what a small scan costs a worker (~0.5 s)
    import pydicom  # noqa: F401
    from pydicom import datadict, filereader, uid  # noqa: F401
    skipped, per_file = [], {}
    chunk = max(1, min(64, len(files) // (n_workers * 8)))
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
        for f, (res, charges) in zip(files, pool.map(_read_header, files, chunksize=chunk)):
            if isinstance(res, tuple):
                skipped.append(res)
                continue
            try:
                for charge in charges:
                    budget.charge(*charge)
            except StackReadError as e:
                skipped.append((e.path, e.reason))
                continue
            per_file[f] = res
    need = [f for f, sl in per_file.items()
            if any((s.subject, s.study, s.group, s.shape) not in budget.over
                   and (kinds is None or s.kind in kinds) for s in sl)]
    jobs, offset = [], 0
    for f in need:
        sl = per_file[f]
        jobs.append((f, offset, len(sl), sl[0].shape))
        offset += len(sl) * sl[0].shape[0] * sl[0].shape[1]
    if jobs:
        # anonymous shared memory: the forked workers write into the pages this process reads
        _shared = np.frombuffer(mmap.mmap(-1, max(offset, 1) * 4), np.float32)
        try:
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                for (f, start, n, (h, w)), res in zip(jobs, pool.map(_read_pixels, jobs,
                                                                       chunksize=chunk)):
                    if res is not None:
                        skipped.append(res)
                        del per_file[f]
                        continue
                    block = _shared[start:start + n * h * w].reshape(n, h, w)
                    for k, s in enumerate(per_file[f]):  # rescaled by the worker
                        s.stored, s.slope, s.intercept = block[k], 1.0, 0.0
        finally:
            _shared = None
    return [s for sl in per_file.values() for s in sl], skipped


def _read_here(f: str, budget: StackBudget, slices: list, skipped: list, keep) -> None:
    res = _read_one(f, budget, keep=keep)
    if isinstance(res, tuple):
        skipped.append(res)
    else:
        slices += res


def scan_dicom(files, phases=("ED", "ES"), es=None, progress: bool = True,
               kinds=(enh.MAGNITUDE,), workers: int | None = None):
    """Read DICOM files (any order) into stacks. Returns (stacks, skipped, warnings).
    kinds: the image kinds (enh.image_kind) that form stacks; the others are set aside, one skipped
    entry per file saying how many images and why. None keeps every kind (each in its own stacks).
    workers: processes reading the files (_pool_size; None: automatic, 1: in this process)."""
    files = [str(f) for f in files]
    n_workers = _pool_size(files, workers)
    slices, skipped, budget = [], [], StackBudget()
    # Workers pay only for files slow to read (compressed, or read by pydicom): their two passes
    # cost about twice the CPU of one (measured: 1,480 fast-path files, 0.22 CPU s here, 0.46 in
    # two workers). So an automatic pool first reads a sample here and goes on in workers only
    # when it took POOL_SLOW_FILE_S a file (the first file, which pays for imports, not counted).
    # The budget is charged in file order either way.
    head = files if n_workers == 1 else files[:POOL_SAMPLE] if workers is None else []
    keep = PixelStore()
    with tqdm(total=len(files), desc="reading DICOM", unit="file", leave=False,
              disable=not progress or len(files) < 200) as bar:
        t = None
        for f in head:
            _read_here(f, budget, slices, skipped, keep)
            bar.update()
            t = time.process_time() if t is None else t
        rest = files[len(head):]
        if rest and workers is None and \
                time.process_time() - t < POOL_SLOW_FILE_S * (len(head) - 1):
            for f in rest:
                _read_here(f, budget, slices, skipped, keep)
                bar.update()
        elif rest:
            more, skipped2 = _read_in_pool(rest, n_workers, kinds, budget)
            slices += more
            skipped += skipped2
    if budget.over:  # a series over the per-stack limit is dropped whole, not loaded in part
        for path in dict.fromkeys(s.path for s in slices
                                  if (s.subject, s.study, s.group, s.shape) in budget.over):
            s = next(s for s in slices if s.path == path)
            skipped.append((path, budget.over[s.subject, s.study, s.group, s.shape]))
        slices = [s for s in slices if (s.subject, s.study, s.group, s.shape) not in budget.over]
    if kinds is not None:
        aside, per_file = defaultdict(list), Counter(s.path for s in slices)
        for s in slices:
            if s.kind not in kinds:
                aside[s.path].append(s)
        for path, items in aside.items():
            n = per_file[path]
            what = "image" if n == 1 else f"{len(items)} of {n} frames"
            found = ", ".join(sorted({s.kind.lower() for s in items}))
            skipped.append((path, f"set aside: {what} {'is' if n == 1 else 'are'} {found} "
                                  f"images, and stacks are built from "
                                  f"{' / '.join(k.lower() for k in kinds)} images only"))
        slices = [s for s in slices if s.kind in kinds]
    stacks, skipped2, warns = stacks_from_slices(slices, phases=phases, es=es)
    return stacks, skipped + skipped2, warns
