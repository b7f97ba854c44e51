"""Gather runs into the paper's tables: `python -m experiments.report RUN_DIR... [--out DIR]`.

Table 1 (training time): one row per run and depth (CV and final minutes, device).
Table 2 (test metrics): one row per run, depth and mode (slice, slice_ordered, stack, ...).
Printed as markdown; written as table1.md/.csv and table2.md/.csv into --out (default: cwd).
RUN_DIR may also be a folder of runs (every subfolder holding results.json is used).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stackcls.study.report import find_runs, write_tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args(argv)
    try:
        runs = find_runs(a.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_tables(runs, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
