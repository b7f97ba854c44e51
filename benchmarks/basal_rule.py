"""The basal rule as evidence for the stack head, on and off (issue 27, item 3).

    python benchmarks/basal_rule.py RUN_DIR [--json out.json]

RUN_DIR: a finished method=anatomy run without a test set (the shipped model's command). Every
stack goes again through the fold net that held it out, at the run's selected epoch. This gives
every column of models.evidence.EVIDENCE (the columns the run saved are checked against it), among
them `border_enclosed`: the share of the LV cavity's border with myocardium beside it. The stack
head is then trained and cross-validated as the run does it (study.evaluation.stack_head: its
settings' selection; study.anatomy.cv_metrics: a K-fold CV over fresh runs) on three sets:
  without the basal rule   EVIDENCE less border_enclosed (what models before version 3.2 read)
  + basal rule             all of EVIDENCE
  no ring evidence         the first, less ring_closure and cavity_inside_ring (the rule's angular form)
Rows: exact IN range in stack mode (mean and per fold) beside slice_ordered and every slice IN,
which the evidence does not touch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stackcls.models.anatomy import outputs  # noqa: E402
from stackcls.models.evidence import EVIDENCE  # noqa: E402
from stackcls.preprocess.arrays import fold_units, patient_folds  # noqa: E402
from stackcls.study import anatomy as sa  # noqa: E402
from stackcls.study.config import compose  # noqa: E402
from stackcls.study.data import load_data  # noqa: E402
from stackcls.study.evaluation import stack_head  # noqa: E402


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(v)          # numbers, true/false, null


def study_of(config: dict):
    """The Study a run was made with, from run.json's config: composed again, every leaf an
    override (the data group by its name first)."""
    out = [f"data={config['data']['name']}"]

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{path}{k}.")
            else:
                out.append(f"{path}{k}={_value(v)}")
    walk({k: v for k, v in config.items() if k not in ("export",)}, "")
    return compose(out)


def out_of_fold(study, stacks, run_dir: Path, epoch: int):
    """Per stack, in `stacks` order: (evidence, probs) through its held-out fold's net, with every
    column of EVIDENCE (the run may have saved fewer)."""
    cfg = study.protocol.anatomy
    splits = patient_folds(fold_units(stacks, study.protocol.fold_by), k=study.protocol.folds,
                           seed=study.seed)
    per = [None] * len(stacks)
    for f, (_, va) in enumerate(splits):
        d = sa._fold_dir(run_dir, f) / f"epoch{epoch}"
        net = sa._restore_net(d, study.backbone, cfg)
        outs = sa.stack_outputs([stacks[i] for i in va], cfg, lambda x: outputs(net, x))
        saved = np.load(d / "val.npz")
        for k, (i, o) in enumerate(zip(va, outs)):
            # the same nets on the same stacks: the evidence the run saved, or this is not that run
            ran = saved[f"evidence{k}"]
            np.testing.assert_allclose(o["evidence"][:, :ran.shape[1]], ran, atol=1e-4)
            per[i] = (o["evidence"], o["probs"])
        print(f"  fold {f + 1}/{len(splits)}: {len(va)} stacks", file=sys.stderr, flush=True)
    return splits, per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    run = json.loads((a.run_dir / "run.json").read_text())
    results = json.loads((a.run_dir / "results.json").read_text())
    if results.get("method") != "anatomy" or results.get("evaluation") != "cv":
        raise SystemExit(f"{a.run_dir}: not a finished method=anatomy run without a test set")
    study = study_of(run["config"])
    epoch = int(results["depths"]["anatomy"]["selected"]["epochs"])
    t0 = time.time()
    stacks, _ = load_data(study)
    splits, per = out_of_fold(study, stacks, a.run_dir, epoch)
    tr = sa._arrays(stacks)
    ev = np.concatenate([p[0] for p in per])
    probs = np.concatenate([p[1] for p in per])
    ix = {n: EVIDENCE.index(n) for n in ("border_enclosed", "ring_closure", "cavity_inside_ring")}
    border = ev[:, ix["border_enclosed"]]
    without = np.delete(ev, ix["border_enclosed"], axis=1)
    variants = {"without the basal rule": without, "+ basal rule (border_enclosed)": ev,
                "no ring evidence": np.delete(without, [ix["ring_closure"], ix["cavity_inside_ring"]], axis=1)}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="stackcls-basal-") as tmp:
        for name, pen in variants.items():
            head = stack_head(Path(tmp) / str(len(rows)), study.protocol.anatomy.stack, study.seed,
                              tr, (pen, probs))
            cv, _, _ = sa.cv_metrics(tr, (pen, probs), head.model, splits, study.seed,
                                    fold_units(stacks, study.protocol.fold_by))
            rows[name] = dict(columns=pen.shape[1], stack=cv["stack"]["exact_range_rate"],
                              stack_folds=cv["stack"]["folds"],
                              slice_ordered=cv["slice_ordered"]["exact_range_rate"],
                              every_slice_in=cv["every_slice_in"]["exact_range_rate"])
            print(f"  {name}: stack {rows[name]['stack']:.3f}", file=sys.stderr, flush=True)
    own = results["depths"]["anatomy"]["cv"]
    print(f"\n{a.run_dir}: {len(stacks)} stacks, epoch {epoch}; {time.time() - t0:.0f} s; the run "
          f"itself reported stack {own['stack']['exact_range_rate']:.3f}, slice_ordered "
          f"{own['slice_ordered']['exact_range_rate']:.3f}\n")
    print("| evidence | columns | stack: exact IN range | per fold | slice_ordered | every slice IN |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['columns']} | {r['stack']:.3f} | "
              f"{', '.join(f'{v:.2f}' for v in r['stack_folds'])} | {r['slice_ordered']:.3f} | "
              f"{r['every_slice_in']:.3f} |")
    b = [float(np.mean(p[0][:, ix["border_enclosed"]])) for p in per]
    print(f"\nborder_enclosed per slice: mean {border.mean():.3f}; by true label: " + ", ".join(
        f"{c} {border[tr['y'] == k].mean():.3f}" for k, c in enumerate(("OAP", "IN", "OBS"))
        if (tr["y"] == k).any()))
    if a.json:
        a.json.write_text(json.dumps(dict(run=str(a.run_dir), epoch=epoch, rows=rows,
                                          stack_mean_border=b), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
