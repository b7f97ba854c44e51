"""Gather runs into the paper's tables: `python -m experiments.report RUN_DIR... [--out DIR]`.

Table 1 (training time): one row per run and depth (CV and final minutes, device).
Table 2 (test metrics): one row per run, depth and mode (slice, slice_ordered, stack, ...).
Printed as markdown; written as table1.md/.csv and table2.md/.csv into --out (default: cwd).
RUN_DIR may also be a folder of runs (every subfolder holding results.json is used) or a Hydra
sweep folder (`runs/multirun`: the runs its jobs name in their run_dir.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stackcls.study.report import find_runs, write_tables


def sweep_runs(paths) -> list[Path]:
    """A sweep folder stands for the run directories its jobs wrote down (experiments.run)."""
    out = []
    for p in paths:
        named = sorted(Path(p).glob("*/run_dir.txt")) if Path(p).is_dir() else []
        out += [Path(f.read_text().strip()) for f in named] or [p]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    try:
        runs = find_runs(sweep_runs(a.runs))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_tables(runs, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
