"""Tables from results.json: a run's results.md and terminal summary, and the paper's tables over
many runs (Table 1: training time per run and depth; Table 2: test metrics per run, depth and mode).
Reads only the JSON, so any finished run directory can be reported again."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# result rows per depth; the last is the stack mode with the orientation hidden from the model
MODE_ROWS = ("slice", "slice_ordered", "stack", "stack_orientation_withheld")
ROW_KEYS = ("f1.OAP", "f1.IN", "f1.OBS", "auc_weighted", "auc_micro", "accuracy", "soft_accuracy",
            "exact_range_rate", "boundary_mae")
TABLE1_COLUMNS = ("backbone", "depth", "data", "protocol", "device", "cv_minutes", "final_minutes",
                  "total_minutes")
TABLE2_COLUMNS = ("backbone", "depth", "mode", "data", "weights", "lr", "epochs", *ROW_KEYS)


def _get(m: dict, key: str):
    for k in key.split("."):
        m = m[k] if m is not None else None
    return m


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rows(row: dict) -> dict:
    """A depth's metrics per mode: its test rows, or the cross-validated ones of a run without a
    test set (method=anatomy with data.test_size=0)."""
    return row["test"] if "test" in row else row["cv"]


def metric_rows(results: dict) -> list[dict]:
    """One row per (depth, mode): the Table-2 layout plus the stack-level measures; last, the
    trivial answer "every slice IN" on the same test stacks, which every row must beat."""
    out = []
    for depth, row in results["depths"].items():
        for mode in MODE_ROWS:
            m = _rows(row).get(mode)
            if m is None:
                continue
            out.append(dict(backbone=results["backbone"], depth=depth, mode=mode,
                            weights=results["weights"], data=results["data"],
                            lr=row["selected"]["learning_rate"], epochs=row["selected"]["epochs"],
                            **{k: _get(m, k) for k in ROW_KEYS},
                            minutes=(row["timing"]["cv_seconds"] + row["timing"]["final_seconds"]) / 60))
    trivial = (results.get("trivial") or {}).get("all_in")
    if trivial is not None:
        out.append(dict(backbone=results["backbone"], depth="-", mode="every slice IN",
                        weights="-", data=results["data"], lr=float("nan"), epochs="-",
                        **{k: _get(trivial, k) for k in ROW_KEYS}, minutes=0.0))
    return out


def results_markdown(results: dict) -> str:
    lines = [f"# {results['backbone']} on {results['data']} ({results['protocol']} protocol, "
             f"seed {results['seed']}, weights {results['weights']})", "",
             "## Cross-validated metrics (no test set)" if results.get("evaluation") == "cv"
             else "## Test metrics (Table 2 style)", "",
             "| depth | mode | lr | epochs | F1 OAP | F1 IN | F1 OBS | AUC (weighted) | AUC (micro) "
             "| accuracy | soft acc. | exact range | boundary MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in metric_rows(results):
        lr = "-" if r["lr"] != r["lr"] else f"{r['lr']:g}"
        lines.append(f"| {r['depth']} | {r['mode']} | {lr} | {r['epochs']} | "
                     + " | ".join(fmt(r[k]) for k in ROW_KEYS) + " |")
    for depth, row in results["depths"].items():
        w = _rows(row).get("stack_orientation_withheld")
        if w is not None:
            lines.append(f"\nDepth {depth}, orientation withheld (each test stack shown in a random "
                         f"direction as 'unknown'): direction found for {w['direction_accuracy']:.3f} "
                         f"of the stacks.")
    lines += ["", "## Training time (Table 1 style)", "",
              f"device: {results.get('device', '?')}", "",
              "| depth | CV minutes | final minutes |", "|---|---|---|"]
    for depth, row in results["depths"].items():
        t = row["timing"]
        lines.append(f"| {depth} | {t['cv_seconds'] / 60:.2f} | {t['final_seconds'] / 60:.2f} |")
    lines += ["", f"total: {results['timing']['total_seconds'] / 60:.2f} min", ""]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    head = f"{'depth':>7} {'mode':>26} {'F1 OAP':>7} {'F1 IN':>6} {'F1 OBS':>7} {'AUCw':>6} " \
           f"{'acc':>6} {'soft':>6} {'exact':>6} {'bMAE':>6}"
    out = ["", f"== {results['backbone']} / {results['data']} / {results['protocol']} "
           f"(weights: {results['weights']}) ==", head]
    for r in metric_rows(results):
        out.append(f"{r['depth']:>7} {r['mode']:>26} {fmt(r['f1.OAP']):>7} {fmt(r['f1.IN']):>6} "
                   f"{fmt(r['f1.OBS']):>7} {fmt(r['auc_weighted']):>6} {fmt(r['accuracy']):>6} "
                   f"{fmt(r['soft_accuracy']):>6} {fmt(r['exact_range_rate']):>6} "
                   f"{fmt(r['boundary_mae']):>6}")
    out.append(f"total {results['timing']['total_seconds'] / 60:.2f} min")
    return "\n".join(out)


# ----------------------------------------------------------------------------- over many runs

def find_runs(paths) -> list[Path]:
    """Run directories: each path holds results.json, or is a folder of runs (searched below)."""
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
    """(Table 1 rows, Table 2 rows) of the given run directories."""
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


def markdown(rows: list[dict], cols) -> str:
    def cell(v):
        return fmt(v) if isinstance(v, float) else str(v)

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


def write_tables(runs: list[Path], out: Path) -> str:
    """Tables 1 and 2 of `runs` as table{1,2}.md and .csv in `out`; returns them as markdown."""
    t1, t2 = tables(runs)
    md1, md2 = markdown(t1, TABLE1_COLUMNS), markdown(t2, TABLE2_COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.md").write_text(md1 + "\n")
    (out / "table2.md").write_text(md2 + "\n")
    write_csv(t1, out / "table1.csv")
    write_csv(t2, out / "table2.csv")
    return "## Table 1: training time\n\n" + md1 + "\n\n## Table 2: test metrics\n\n" + md2
