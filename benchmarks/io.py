"""DICOM scan throughput against dcm2niix (pip `dcm2niix`) on the same folder, in one run.

    python benchmarks/io.py [FOLDER] [--subjects 20] [--enhanced] [--reps 3]

Without FOLDER, the built-in phantom cohort of --subjects subjects (one file per image, or with
--enhanced one multi-frame file per subject) is written to a temp folder. Times, best of --reps
after one warm-up run (file cache warm for both):
- stackcls: `stackcls.io.scan(folder, phases="all")` (every phase of every stack in memory);
- dcm2niix: `dcm2niix -o TMP -z n FOLDER` (NIfTI written to a temp folder, which it needs anyway).
Prints files/s for both and the ratio (> 1: stackcls is faster), for the scan as it runs (worker
processes from 400 files, stackcls.io.dicom._pool_size) and read in one process. Also the
CPU seconds each used (this process and its children: the workers, dcm2niix), which other jobs on
shared cores disturb less than wall time. Absolute numbers on shared CPUs are noise; the ratio is
what to compare, best of a few runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _best(f, reps):
    """(best wall seconds, best CPU seconds) over reps runs after a warm-up."""
    f()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), _cpu()
        f()
        ts.append(time.perf_counter() - t)
        cs.append(_cpu() - c)
    return min(ts), min(cs)


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    if not os.access(exe, os.X_OK):
        raise SystemExit("dcm2niix not found: pip install dcm2niix")
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", type=Path, default=None)
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--enhanced", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    exe = _dcm2niix()
    with tempfile.TemporaryDirectory(prefix="stackcls-io-bench-") as tmp:
        folder = a.folder
        if folder is None:
            from stackcls.phantom import generate
            generate(Path(tmp) / "cohort", a.subjects, seed=0, enhanced=a.enhanced, progress=False)
            folder = Path(tmp) / "cohort" / "dicom"
        n_files = sum(len(fs) for _, _, fs in os.walk(folder))
        from stackcls.io import dicom, scan

        def one_process():
            saved, dicom.POOL_MIN_FILES = dicom.POOL_MIN_FILES, float("inf")
            try:
                return ours()
            finally:
                dicom.POOL_MIN_FILES = saved

        def ours():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return scan(folder, phases="all", progress=False)

        def theirs():
            out = Path(tmp) / "nii"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            subprocess.run([exe, "-o", str(out), "-z", "n", str(folder)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        res = ours()
        (t_ours, c_ours), (t_one, c_one) = _best(ours, a.reps), _best(one_process, a.reps)
        t_theirs, c_theirs = _best(theirs, a.reps)
    print(f"{folder if a.folder else 'phantom cohort'}: {n_files} files, {len(res.stacks)} stacks, "
          f"{len(res.skipped)} skipped; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for name, t, c in (("stackcls scan", t_ours, c_ours), ("  in 1 process", t_one, c_one),
                       ("dcm2niix", t_theirs, c_theirs)):
        print(f"{name:<14}: {t:.3f} s ({n_files / t:,.0f} files/s), {c:.3f} CPU s")
    print(f"ratio (dcm2niix time / stackcls time): {t_theirs / t_ours:.2f} "
          f"(in 1 process {t_theirs / t_one:.2f}; CPU time {c_theirs / c_ours:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
