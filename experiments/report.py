"""Gather runs into the paper's tables: `python -m experiments.report RUN_DIR... [--out DIR]`.

Table 1 (training time): one row per run and depth (CV and final minutes, device).
Table 2 (test metrics): one row per run, depth and mode (slice, slice_ordered, stack).
Printed as markdown; written as table1.md/.csv and table2.md/.csv into --out (default: cwd).
RUN_DIR may also be a folder of runs (every subfolder holding results.json is used).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from experiments.run import ROW_KEYS, _fmt, metric_rows


def find_runs(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(q.parent for q in p.rglob("results.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no results.json in it or below it")
            out += found
        else:
            raise FileNotFoundError(f"{p}: not a run directory (no results.json)")
    return out


def tables(runs: list[Path]) -> tuple[list[dict], list[dict]]:
    t1, t2 = [], []
    for r in runs:
        res = json.loads((r / "results.json").read_text())
        for depth, row in res["depths"].items():
            t = row["timing"]
            t1.append(dict(run=str(r), backbone=res["backbone"], depth=depth, data=res["data"],
                           protocol=res["protocol"], device=res.get("device", "?"),
                           cv_minutes=round(t["cv_seconds"] / 60, 3),
                           final_minutes=round(t["final_seconds"] / 60, 3),
                           total_minutes=round(res["timing"]["total_seconds"] / 60, 3)))
        for row in metric_rows(res):
            t2.append(dict(run=str(r), protocol=res["protocol"], **row))
    return t1, t2


def markdown(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return _fmt(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


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
    t1, t2 = tables(runs)
    c1 = ["backbone", "depth", "data", "protocol", "device", "cv_minutes", "final_minutes", "total_minutes"]
    c2 = ["backbone", "depth", "mode", "data", "weights", "lr", "epochs", *ROW_KEYS]
    md1, md2 = markdown(t1, c1), markdown(t2, c2)
    print("## Table 1: training time\n\n" + md1 + "\n\n## Table 2: test metrics\n\n" + md2)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table1.md").write_text(md1 + "\n")
    (a.out / "table2.md").write_text(md2 + "\n")
    write_csv(t1, a.out / "table1.csv")
    write_csv(t2, a.out / "table2.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
