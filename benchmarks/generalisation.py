"""Files you cannot trust: the shipped model on the ACDC release files against a degraded copy of
the same stacks, as public conversions write them (issue 27, item 2).

    python benchmarks/generalisation.py [--data ../shared/data/acdc] [--every K] [--json out.json]
                                        [--model RUN_OR_FILE]   (default: the shipped model)
                                        [--synthetic N]   (+ N held-out phantom subjects)

The degraded copy (written to a temporary folder, never beside the data): intensities rescaled to
8 bits, the in-plane axes transposed, `nib.Nifti1Image(array, np.eye(4))` (identity affine,
pixdim 1 x 1 x 1); Info.cfg and labels.csv kept. It is predicted twice: with the spacing estimated
from the images (the default) and with the fixed field of view of physical.pixel_spacing.

Every stack is shown in a random direction (one coin per stack, the same for every row) with
orientation="unknown", so the direction is found from the images, as in
study.evaluation.orientation_withheld; metrics are taken in the true order. Rows: exact IN range,
F1 OAP / OBS and direction accuracy, per mode, beside "every slice IN"; then the spacing
estimate's error against pixdim. --every K keeps every K-th patient (a subset, said in the output).
--synthetic N adds N subjects of the built-in phantom (seed 2027, which no shipped model trained
on), whose stacks run 1-3 slices past the base and the apex, with their own "every slice IN" row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stackcls import load_model, load_stacks, predict_stack  # noqa: E402
from stackcls.stack import CLASS_INDEX  # noqa: E402
from stackcls.study.metrics import exact_range_rate, f1_per_class  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "acdc"
MODES = ("slice_ordered", "stack")


def degrade(src: Path, dst: Path, patients: list[str]) -> None:
    """8-bit, transposed, identity-affine copies of the ED/ES frames of `patients` (no masks)."""
    import nibabel as nib
    for name in patients:
        (dst / name).mkdir(parents=True)
        shutil.copy(src / name / "Info.cfg", dst / name / "Info.cfg")
        for f in sorted((src / name).glob(f"{name}_frame??.nii.gz")):
            x = np.asarray(nib.load(str(f)).dataobj, np.float64)
            x = np.swapaxes(x, 0, 1)                              # transposed in-plane
            x = np.round((x - x.min()) / max(x.max() - x.min(), 1e-9) * 255).astype(np.uint8)
            nib.save(nib.Nifti1Image(x, np.eye(4)), str(dst / name / f.name))
    rows = (src / "labels.csv").read_text().splitlines()
    keep = [rows[0]] + [r for r in rows[1:] if r.split(",")[0] in patients]
    (dst / "labels.csv").write_text("\n".join(keep) + "\n")


def cached_preprocess(model):
    """model.preprocess memoised on (images, spacing): both modes of a stack share one
    preprocessing, the slow part on a CPU; the info of each call is kept with it."""
    inner, memo = model.preprocess, {}

    def preprocess(images, spacing=None):
        a = np.ascontiguousarray(images, np.float32)
        key = (hashlib.sha1(a.tobytes()).hexdigest(), a.shape, None if spacing is None
               else tuple(float(v) for v in spacing), model.estimate_spacing)
        if key not in memo:
            memo[key] = (inner(a, spacing=spacing), model.last_preprocess)
        x, model.last_preprocess = memo[key]
        return x
    return preprocess


def run(stacks, model, estimate: bool, seed: int = 0) -> dict:
    """Predictions of every stack in both modes: per mode the labels in true order, direction
    right or not; plus the spacing each stack was read at (info of the preprocessing)."""
    model.estimate_spacing = estimate
    rng = np.random.default_rng(seed)
    flips = rng.random(len(stacks)) < 0.5
    out = {m: dict(labels=[], right=[]) for m in MODES}
    infos = []
    for i, (st, flip) in enumerate(zip(stacks, flips)):
        if i % 20 == 0:
            print(f"  {'estimate' if estimate else 'fixed'}: stack {i}/{len(stacks)}", file=sys.stderr,
                  flush=True)
        shown = st.reversed() if flip else st
        for mode in MODES:
            p = predict_stack(shown, model, mode=mode, orientation="unknown")
            lab = list(p.labels)
            out[mode]["labels"].append(lab[::-1] if flip else lab)
            out[mode]["right"].append(p.orientation == ("reversed" if flip else "as_given"))
        infos.append(model.last_preprocess)
    out["infos"] = infos
    return out


def scores(stacks, labels) -> dict:
    y = np.concatenate([[CLASS_INDEX[v] for v in st.labels] for st in stacks])
    yp = np.concatenate([[CLASS_INDEX[v] for v in lab] for lab in labels])
    idx = np.concatenate([np.full(len(st.labels), i) for i, st in enumerate(stacks)])
    f1 = f1_per_class(y, yp)
    return dict(exact=exact_range_rate(y, yp, idx), f1_oap=float(f1[0]), f1_obs=float(f1[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--every", type=int, default=1, help="keep every K-th patient (a subset)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--synthetic", type=int, default=0, help="held-out phantom subjects to add")
    ap.add_argument("--model", default=None, help="a run folder or model file (default: the shipped model)")
    a = ap.parse_args(argv)
    if not (a.data / "labels.csv").is_file():
        raise SystemExit(f"{a.data}: no labels.csv (expected the ACDC folder of ../shared)")
    patients = sorted(p.name for p in a.data.iterdir() if (p / "Info.cfg").is_file())[::a.every]
    model = load_model(a.model)
    model.preprocess = cached_preprocess(model)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stackcls-degraded-") as tmp:
        deg_dir = Path(tmp)
        degrade(a.data, deg_dir, patients)
        keep = set(patients)
        release = [st for st in load_stacks(a.data, labels=a.data / "labels.csv")
                   if st.subject in keep]
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # one "spacing unknown" warning per file
            degraded = load_stacks(deg_dir, labels=deg_dir / "labels.csv")
        release.sort(key=lambda s: s.key)
        degraded.sort(key=lambda s: s.key)
        assert [s.key for s in release] == [s.key for s in degraded]
        assert all(d.meta["spacing_source"].startswith("unknown") for d in degraded)
        res = {"release files": run(release, model, True),
               "degraded, spacing estimated": run(degraded, model, True),
               "degraded, fixed field of view": run(degraded, model, False)}
    n = len(release)
    everything_in = scores(release, [["IN"] * len(st.labels) for st in release])
    table = []
    for name, r in res.items():
        for mode in MODES:
            row = dict(data=name, mode=mode, **scores(release, r[mode]["labels"]),
                       direction=float(np.mean(r[mode]["right"])))
            table.append(row)
    table.append(dict(data="ACDC", mode="every slice IN", **everything_in, direction=None))
    if a.synthetic:
        from stackcls.phantom import cohort
        root = cohort(a.synthetic, seed=2027)
        syn = load_stacks(root / "dicom", labels=root / "labels.csv")
        r = run(syn, model, True)
        name = f"synthetic, past both ends ({len(syn)} stacks, held out)"
        for mode in MODES:
            table.append(dict(data=name, mode=mode, **scores(syn, r[mode]["labels"]),
                              direction=float(np.mean(r[mode]["right"]))))
        table.append(dict(data=name, mode="every slice IN",
                          **scores(syn, [["IN"] * len(st.labels) for st in syn]), direction=None))
    true = np.array([st.spacing[0] for st in release])
    est = np.array([i["spacing"][0] for i in res["degraded, spacing estimated"]["infos"]])
    fixed = np.array([i["spacing"][0] for i in res["degraded, fixed field of view"]["infos"]])
    err = {k: np.abs(v / true - 1) for k, v in (("estimated", est), ("fixed field of view", fixed))}
    subset = "" if a.every == 1 else f" (subset: every {a.every}th patient)"
    print(f"\n{n} stacks of {len(patients)} patients{subset}; {time.time() - t0:.0f} s\n")
    print("| data | mode | exact IN range | F1 OAP | F1 OBS | direction |\n|---|---|---|---|---|---|")
    for r in table:
        d = "-" if r["direction"] is None else f"{r['direction']:.3f}"
        print(f"| {r['data']} | {r['mode']} | {r['exact']:.3f} | {r['f1_oap']:.3f} | "
              f"{r['f1_obs']:.3f} | {d} |")
    print("\n| spacing on the degraded copy | median error | 90th percentile | max |\n|---|---|---|---|")
    for k, e in err.items():
        print(f"| {k} | {np.median(e):.3f} | {np.percentile(e, 90):.3f} | {e.max():.3f} |")
    if a.json:
        a.json.write_text(json.dumps(dict(
            stacks=n, patients=patients, rows=table,
            spacing_error={k: dict(median=float(np.median(e)), p90=float(np.percentile(e, 90)),
                                   max=float(e.max())) for k, e in err.items()},
            spacing=[dict(stack=s.key, pixdim=float(t), estimated=float(e1), fixed=float(f1))
                     for s, t, e1, f1 in zip(release, true, est, fixed)]), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
