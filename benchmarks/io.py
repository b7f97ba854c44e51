"""DICOM scan throughput against dcm2niix (pip `dcm2niix`) on the same folder, in one run.

    python benchmarks/io.py [FOLDER] [--subjects 20] [--enhanced] [--reps 3]

Without FOLDER, the built-in phantom cohort of --subjects subjects (one file per image, or with
--enhanced one multi-frame file per subject) is written to a temp folder. Times, best of --reps
after one warm-up run (file cache warm for both):
- stackcls: `stackcls.io.scan(folder, phases="all")` (every phase of every stack in memory);
- stackcls as it scans by default, `scan(folder)`: every file read and ES estimated, the ED and ES
  stacks kept (what `stackcls predict` and `load_stacks` do);
- dcm2niix: `dcm2niix -o TMP -z n FOLDER` (NIfTI written to a temp folder, which it needs anyway).
Prints files/s for both and the ratio (> 1: stackcls is faster), for the scan as it runs (worker
processes from 400 files when files are slow to read, stackcls.io.dicom.scan_dicom), read in
one process, and by default. Also the CPU seconds each used (this process and its children: the workers,
dcm2niix), which other jobs on shared cores disturb less than wall time. The three are run in
turn, --reps rounds (after one warm-up round), so a change in the machine's load falls on all
three alike: times are the best of the rounds, ratios the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rounds(fs, reps):
    """[(wall seconds, CPU seconds) of each of fs] per round: fs run in turn, reps rounds after a
    warm-up round."""
    out = []
    for r in range(reps + 1):
        row = []
        for f in fs:
            t, c = time.perf_counter(), _cpu()
            f()
            row.append((time.perf_counter() - t, _cpu() - c))
        if r:
            out.append(row)
    return out


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
    ap.add_argument("--reps", type=int, default=5)
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

        def ours(phases="all"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return scan(folder, phases=phases, progress=False)

        def default():
            return ours(("ED", "ES"))

        def theirs():
            out = Path(tmp) / "nii"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            subprocess.run([exe, "-o", str(out), "-z", "n", str(folder)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        res = ours()
        load = os.getloadavg()[0]
        rounds = _rounds((ours, one_process, default, theirs), a.reps)
        load = max(load, os.getloadavg()[0])
    print(f"{folder if a.folder else 'phantom cohort'}: {n_files} files, {len(res.stacks)} stacks, "
          f"{len(res.skipped)} skipped; {os.cpu_count()} CPUs, load {load:.1f} (1-min average, "
          "the higher of start and end)")
    for k, name in enumerate(("stackcls scan", "  in 1 process", "  ED, ES only", "dcm2niix")):
        t, c = min(r[k][0] for r in rounds), min(r[k][1] for r in rounds)
        print(f"{name:<14}: {t:.3f} s ({n_files / t:,.0f} files/s), {c:.3f} CPU s")

    def ratio(k, i):  # median over rounds of dcm2niix / stackcls (time i=0, CPU i=1)
        return statistics.median(r[3][i] / r[k][i] for r in rounds)
    print(f"ratio (dcm2niix time / stackcls time, median of {a.reps} rounds): {ratio(0, 0):.2f} "
          f"(in 1 process {ratio(1, 0):.2f}; CPU time {ratio(0, 1):.2f}); ED and ES only "
          f"{ratio(2, 0):.2f} (CPU time {ratio(2, 1):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
