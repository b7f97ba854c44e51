"""Other patients' files, release and degraded, measured honestly: each stack through the fold
network that did not train on it (issue 27, item 4).

    python benchmarks/generalisation_oof.py [--model RUN_OR_FILE ...] [--data ../shared/data/acdc]
                                            [--beyond] [--max-subjects N]

benchmarks/generalisation.py predicts with the whole ensemble, which trained on every ACDC
patient, so its rows lean optimistic. A shipped-model file holds its K fold networks in fold
order, and the folds are `patient_folds(subjects, K, seed)` of the training stacks (the
default_model command: every ACDC patient, seed 0), so each stack can go through the one network
that held it out, as in the cross-validation. The release rows must then reproduce the model's
own cross-validated slice_ordered exact range (printed beside them: the check that the folds are
the right ones). The degraded copy is generalisation.degrade's (8-bit, transposed, identity
affine, pixdim 1; spacing estimated). Mode slice_ordered (the stack head trained on every
stack's out-of-fold outputs: no held-out version of it exists in the file), orientation given.
A second table splits the same predictions by ACDC pathology group. For the shipped model that
is not leave-one-group-out (every fold network saw the other patients of each group); for a run
trained with `protocol.fold_by=group` it is (each group through the network that never saw it).
--beyond adds a third copy: every release stack extended by 1-3 slices past the apex and the base
(preprocess/beyond.py, seed 2027; each stack still through the network that never saw its
patient), against its own labels. --max-subjects N: the model was trained with
data.max_subjects=N (seed 0), so only those patients are predicted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from generalisation import DATA, degrade, scores  # noqa: E402

from stackcls import load_model, load_stacks, predict_stack  # noqa: E402
from stackcls.models.anatomy import AnatomyModel, Ensemble  # noqa: E402
from stackcls.preprocess.arrays import fold_units, patient_folds  # noqa: E402
from stackcls.preprocess.beyond import extended  # noqa: E402
from stackcls.study.data import some_subjects  # noqa: E402


def fold_models(model) -> list:
    """The K single-network models of an ensemble, in fold order (no stack head)."""
    cfg = dict(model.config, folds=1)
    return [AnatomyModel(Ensemble([net]), cfg) for net in model.ensemble.nets]


def out_of_fold(stacks, folds: list, units, model_seed: int = 0) -> list:
    """units: what the model's CV folds kept together, per stack (fold_units)."""
    k = len(folds)
    splits = patient_folds(units, k=k, seed=model_seed)
    labels = [None] * len(stacks)
    for f, (_, va) in enumerate(splits):
        for i in va:
            p = predict_stack(stacks[i], folds[f], mode="slice_ordered", orientation="apex_to_base")
            labels[i] = list(p.labels)
        print(f"    fold {f + 1}/{k}", file=sys.stderr, flush=True)
    return labels


def by_group(stacks, labels) -> dict:
    """Exact IN range per ACDC pathology group (Info.cfg's Group, in the stack's meta)."""
    out = {}
    for g in sorted({str(st.meta.get("group")) for st in stacks}):
        keep = [i for i, st in enumerate(stacks) if str(st.meta.get("group")) == g]
        out[g] = scores([stacks[i] for i in keep], [labels[i] for i in keep])["exact"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="run folder or model file (repeatable; default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--beyond", action="store_true", help="add the stacks extended past both ends")
    ap.add_argument("--max-subjects", type=int, default=None,
                    help="the model's data.max_subjects (its patients only)")
    a = ap.parse_args(argv)
    t0 = time.time()
    patients = sorted(p.name for p in a.data.iterdir() if (p / "Info.cfg").is_file())
    rows = []
    with tempfile.TemporaryDirectory(prefix="stackcls-degraded-") as tmp:
        degrade(a.data, Path(tmp), patients)
        release = sorted(load_stacks(a.data, labels=a.data / "labels.csv"), key=lambda s: s.key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            degraded = sorted(load_stacks(Path(tmp), labels=Path(tmp) / "labels.csv"),
                              key=lambda s: s.key)
        assert [s.key for s in release] == [s.key for s in degraded]
        if a.max_subjects:
            release, degraded = (some_subjects(s, a.max_subjects, 0) for s in (release, degraded))
        # (name, stacks, the stacks whose labels are the truth)
        sets = [("release files", release, release), ("degraded, spacing estimated", degraded, release)]
        if a.beyond:
            ext = [e for _, e in extended(release, 1.0, seed=2027)]
            if len(ext) != len(release):
                raise SystemExit("--beyond needs masks and spacing on every stack of --data")
            sets.append(("past both ends (1-3 slices made from the end slices)", ext, ext))
        for path in a.model or [None]:
            model = load_model(path)
            folds = fold_models(model)
            cv = getattr(model, "card", {}).get("metrics", {}).get("slice_ordered", {})
            name = "shipped" if path is None else str(path)
            # a run with protocol.fold_by=group was cross-validated leave-one-group-out
            units = fold_units(release, model.config.get("fold_by", "subject"))
            for data, stacks, truth in sets:
                print(f"  {name}: {data}", file=sys.stderr, flush=True)
                labels = out_of_fold(stacks, folds, units)
                rows.append(dict(model=name, data=data, **scores(truth, labels),
                                 card_cv=cv.get("exact_range_rate"), groups=by_group(truth, labels)))
    trivial = scores(release, [["IN"] * len(st.labels) for st in release])
    print(f"\n{len(release)} stacks of {len(patients)} patients, out of fold; {time.time() - t0:.0f} s\n")
    print("| model | data | exact IN range | F1 OAP | F1 OBS |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['data']} | {r['exact']:.3f} | {r['f1_oap']:.3f} | {r['f1_obs']:.3f} |")
    print(f"| - | every slice IN | {trivial['exact']:.3f} | 0 | 0 |")
    if a.beyond:
        print("| - | every slice IN, past both ends | 0.000 | 0 | 0 |")
    groups = sorted({str(st.meta.get("group")) for st in release})
    every = by_group(release, [["IN"] * len(st.labels) for st in release])
    print("\nExact IN range by ACDC pathology group (the same out-of-fold predictions; stacks per group: "
          + ", ".join(f"{g} {sum(str(st.meta.get('group')) == g for st in release)}" for g in groups) + ")\n")
    print("| model | data | " + " | ".join(groups) + " |\n|---|---|" + "---|" * len(groups))
    for r in rows:
        print(f"| {r['model']} | {r['data']} | " + " | ".join(f"{r['groups'][g]:.3f}" for g in groups) + " |")
    print("| - | every slice IN | " + " | ".join(f"{every[g]:.3f}" for g in groups) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
