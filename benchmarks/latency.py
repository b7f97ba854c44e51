"""Latency of one study from the shell, with and without the persistent compilation cache.

    .venv/bin/python benchmarks/latency.py [--runs 3] [--sweep-runs 1]

Cases (each a fresh process, as a user would run it; wall time and the child's peak RSS, median
of the runs), every one measured twice in this run: with the cache (STACKCLS_CACHE pointing at a
temporary folder) and with STACKCLS_NO_COMPILE_CACHE=1, printed side by side with the ratio:
  help        `stackcls --help`
  cli_cold    `stackcls predict STUDY --json ...` with an empty cache folder (every run a new one)
  cli_warm    the same after one run has filled the cache
  sweep       in-process predict_stack over stack lengths 6..24 (the sweep of one process)
STUDY is one 13-slice DICOM stack of the synthetic cohort (`stackcls.phantom.cohort(2, seed=0)`)
and the model is the shipped default. The machine's load is printed: on shared cores compare
ratios within one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
SWEEP = """
import sys, time, numpy as np
from stackcls.io import scan
from stackcls.predict.stack import as_model, predict_stack
st = scan(sys.argv[1]).stacks[0]
m = as_model(None)
t = time.perf_counter()
for S in range(6, 25):   # slices resampled from the one stack: only the length matters here
    idx = np.linspace(0, len(st.images) - 1, S).round().astype(int)
    predict_stack(st.images[idx], m, orientation="apex_to_base")
print(f"sweep_only {time.perf_counter() - t:.2f}", file=sys.stderr)
"""


def one_study(root: Path) -> Path:
    """A folder holding the DICOM files of one 13-slice stack."""
    from stackcls.io import scan
    from stackcls.phantom import cohort
    st = next(s for s in scan(cohort(2, seed=0) / "dicom").stacks if len(s.images) == 13)
    out = root / "study"
    out.mkdir()
    for f in st.files:
        shutil.copy(f, out)
    return out


def timed(cmd, env) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of one child process, which must succeed."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024          # ru_maxrss is in KiB on Linux


def env_for(cache: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STACKCLS_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    if cache is None:
        env["STACKCLS_NO_COMPILE_CACHE"] = "1"
    else:
        env["STACKCLS_CACHE"] = str(cache)
    return env


def measure(root: Path, study: Path, runs: int, sweep_runs: int) -> dict:
    stackcls = [PY, "-m", "stackcls.cli"]
    predict = stackcls + ["predict", str(study), "--json", str(root / "out.json")]
    res: dict = {}

    def add(case, variant, sample):
        res.setdefault((case, variant), []).append(sample)

    warm = root / "warm"
    timed(predict, env_for(warm))                   # fills the warm cache (not counted)
    if sweep_runs:
        timed([PY, "-c", SWEEP, str(study)], env_for(warm))
    for r in range(runs):
        for variant, cache in (("cache", True), ("no cache", False)):
            add("help", variant, timed(stackcls + ["--help"], env_for(warm if cache else None)))
            cold = root / f"cold{r}"
            add("cli_cold", variant, timed(predict, env_for(cold if cache else None)))
            add("cli_warm", variant, timed(predict, env_for(warm if cache else None)))
            if r < sweep_runs:
                add("sweep", variant, timed([PY, "-c", SWEEP, str(study)],
                                            env_for(warm if cache else None)))
            print(f"  run {r + 1}/{runs} {variant} done", file=sys.stderr, flush=True)
    return res


def report(res: dict, runs: int, sweep_runs: int) -> str:
    load = os.getloadavg()
    lines = [f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
             f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; median of {runs} runs "
             f"(sweep: {sweep_runs}); peak RSS of the process",
             "",
             "| case | cache: wall s | no cache: wall s | speed-up | cache: peak RSS MiB | "
             "no cache: peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for case in ("help", "cli_cold", "cli_warm", "sweep"):
        c, n = res[(case, "cache")], res[(case, "no cache")]
        cw, nw = statistics.median(s[0] for s in c), statistics.median(s[0] for s in n)
        cr, nr = statistics.median(s[1] for s in c), statistics.median(s[1] for s in n)
        lines.append(f"| {case} | {cw:.2f} | {nw:.2f} | {nw / cw:.2f}x | {cr:.0f} | {nr:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sweep-runs", type=int, default=1, help="the sweep takes minutes uncached")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stackcls-latency-") as tmp:
        root = Path(tmp)
        study = one_study(root)
        res = measure(root, study, a.runs, min(a.sweep_runs, a.runs))
    print(report(res, a.runs, min(a.sweep_runs, a.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
