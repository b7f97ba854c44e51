"""DICOM scan throughput against dcm2niix (pip `dcm2niix`) on the same folder, in one run.

    python benchmarks/io.py [FOLDER] [--subjects 20] [--enhanced] [--reps 3]

Without FOLDER, the built-in phantom cohort of --subjects subjects (one file per image, or with
--enhanced one multi-frame file per subject) is written to a temp folder. Times, best of --reps
after one warm-up run (file cache warm for both):
- stackcls: `stackcls.io.scan(folder, phases="all")` (every phase of every stack in memory);
- dcm2niix: `dcm2niix -o TMP -z n FOLDER` (NIfTI written to a temp folder, which it needs anyway).
Prints files/s for both and the ratio (> 1: stackcls is faster). Absolute numbers on shared CPUs
are noise; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _best(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


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
        from stackcls.io import scan

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
        t_ours, t_theirs = _best(ours, a.reps), _best(theirs, a.reps)
    print(f"{folder if a.folder else 'phantom cohort'}: {n_files} files, {len(res.stacks)} stacks, "
          f"{len(res.skipped)} skipped")
    print(f"stackcls scan: {t_ours:.3f} s ({n_files / t_ours:,.0f} files/s)")
    print(f"dcm2niix     : {t_theirs:.3f} s ({n_files / t_theirs:,.0f} files/s)")
    print(f"ratio (dcm2niix time / stackcls time): {t_theirs / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
