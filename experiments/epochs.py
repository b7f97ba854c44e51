"""What every evaluated epoch count of a finished method=anatomy run would have given on its test
stacks: `python -m experiments.epochs RUN_DIR [OVERRIDE...]` (the run's own overrides).

A run selects its epoch count on the mean validation exact-range rate of its fold nets, each net
alone on its own held-out fold; the test stacks are then predicted by the K nets averaged. The two
need not agree, and 16 patients per fold make the validation rate noisy. For each epoch count this
prints what the selection saw (validation exact range and loss, means over the folds) beside the
test outcome of that epoch's ensemble (ordered decoding of the slice probabilities, the
slice_ordered row) and the "every slice IN" row. It is the selection-rule ablation of
docs/results.md. It reads the saved fold nets and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from stackcls.models.anatomy import AnatomyModel, Ensemble
from stackcls.decode.ordered import decode_many
from stackcls.predict.load import load_model
from stackcls.study.anatomy import NAME, _fold_dir, _restore_net, stack_outputs
from stackcls.study.config import compose
from stackcls.study.data import load_data
from stackcls.study.config import identity


class RunConfigMismatch(ValueError):
    pass


def _within(old, new) -> bool:
    """Every setting the run recorded is the same now; settings added to the code since, at
    their defaults, are not in older records and do not count."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _within(v, new[k]) for k, v in old.items())
    return old == new


def epoch_rows(run_dir: Path, overrides) -> list[dict]:
    study = compose(overrides)
    old = json.loads((run_dir / "run.json").read_text())["identity"]
    if not _within(old, identity(study)):  # the run's own overrides: the same split and nets
        raise RunConfigMismatch(f"{run_dir} was run with {old}")
    cfg = study.protocol.anatomy
    _, test = load_data(study)
    if not test:
        raise SystemExit(f"{run_dir}: the run has no test stacks (data.test_size=0)")
    model = load_model(run_dir)
    folds = [json.loads((_fold_dir(run_dir, f) / "done.json").read_text())
             for f in range(study.protocol.folds)]
    ys = [np.asarray(st.label_indices()) for st in test]
    epochs = sorted(int(p.name[5:]) for p in _fold_dir(run_dir, 0).glob("epoch*"))
    rows = []
    for j, e in enumerate(epochs):
        nets = [_restore_net(_fold_dir(run_dir, f) / f"epoch{e}", study.backbone, cfg)
                for f in range(study.protocol.folds)]
        m = AnatomyModel(Ensemble(nets), model.config)
        outs = stack_outputs(test, cfg, m.run, m.lv_map)
        pred = decode_many([np.log(np.clip(o["probs"], 1e-6, 1.0)) for o in outs])
        f1 = f1_score(np.concatenate(ys), np.concatenate(pred), labels=[0, 2], average=None,
                      zero_division=0)
        rows.append(dict(epochs=e, val_exact=float(np.mean([d["val"][j] for d in folds])),
                         val_loss=float(np.mean([d["loss"][j] for d in folds])),
                         test_exact=float(np.mean([np.array_equal(p, y) for p, y in zip(pred, ys)])),
                         f1_oap=float(f1[0]), f1_obs=float(f1[1])))
    rows.append(dict(epochs="every slice IN", test_exact=float(np.mean([np.all(y == 1) for y in ys])),
                     f1_oap=0.0, f1_obs=0.0))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.epochs", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if not (a.run_dir / NAME / "cv").is_dir():
        print(f"error: {a.run_dir} holds no method=anatomy cross-validation", file=sys.stderr)
        return 2
    try:
        rows = epoch_rows(a.run_dir, [*a.overrides, f"run_dir={a.run_dir}"])
    except RunConfigMismatch as e:
        print(f"error: pass the run's own overrides: {e}", file=sys.stderr)
        return 2
    print("| epochs | validation exact | validation loss | test exact (slice_ordered) | F1 OAP | F1 OBS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        v = (f"{r['val_exact']:.3f} | {r['val_loss']:.4f}" if "val_exact" in r else "- | -")
        print(f"| {r['epochs']} | {v} | {r['test_exact']:.3f} | {r['f1_oap']:.3f} | {r['f1_obs']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
