"""End-to-end prediction throughput (files -> labels) on the built-in cohort: stacks/s, files/s and
where the time goes (reading, preprocessing, device).

    python benchmarks/predict.py [--subjects 20] [--backbone mobilenet] [--size SIZE]
                                 [--path archive|per_stack] [--workers 2] [--batch-slices 64]
                                 [--copies K] [--no-warmup]

per_stack: what `stackcls predict ROOT --model RUN` has done since the start (the tree read whole
by `io.scan`, then `predict_stack` one stack at a time: preprocessing, one device call). It runs
on any checkout, so today's main can be measured with PYTHONPATH pointing at it.
archive: `stackcls predict ROOT --model RUN --out X.jsonl` (stackcls.archive: reader processes
overlapped with device calls, stacks of one length batched).

The model: the backbone at its input size (224 for MobileNet) with random weights (the speed is
that of trained ones) and a random stack head, mode "stack". Every shape is compiled in a warm-up
pass over the same tree first, so the timed pass is the steady state an archive runs in. Reading
and preprocessing of the archive path are summed over its worker processes (they overlap the
device time, so the shares can add up to more than the wall time).

--copies K predicts a tree of K hard-linked copies of the cohort's subject folders (K x 2 x
subjects stacks, no extra disk): with --no-warmup and a small --size, the peak memory of the
main process and of the largest reader process against the tree's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def make_run(tmp: Path, backbone: str, size: int | None) -> Path:
    from flax import nnx

    from stackcls import backbones
    from stackcls.checkpoint import save_model, save_stack_model
    from stackcls.models import build_classifier
    from stackcls.stack_model import StackHead, StackModel

    size = size or backbones.spec(backbone).input_size
    clf = build_classifier(backbones.create(backbone, weights=None, input_size=size), size)
    run = tmp / "run"
    save_model(run / "depth0" / "final", clf, dict(backbone=backbone, input_size=size))
    head = StackModel(StackHead(259, 32, rngs=nnx.Rngs(1)), dict(in_features=259, hidden=32, dropout=0.2))
    save_stack_model(run / "depth0" / "stack", head)
    return run


def per_stack(root: Path, model) -> dict:
    from stackcls.io import scan
    from stackcls.predict import predict_stack

    t0 = time.perf_counter()
    res = scan(root, progress=False)
    t1 = time.perf_counter()
    for st in res.stacks:
        predict_stack(st, model)
    t2 = time.perf_counter()
    prep = 0.0
    for st in res.stacks:                    # preprocessing alone, as predict_stack does it
        t = time.perf_counter()
        model.preprocess(st.images)
        prep += time.perf_counter() - t
    return dict(stacks=len(res.stacks), wall_s=t2 - t0, read_s=t1 - t0, preprocess_s=prep,
                device_s=t2 - t1 - prep)


def archive(root: Path, model, out: Path, workers: int, batch_slices: int) -> dict:
    from stackcls.archive import predict_archive

    r = predict_archive(root, model, out, workers=workers, batch_slices=batch_slices, progress=False)
    return dict(stacks=r["stacks"], wall_s=r["wall_s"], read_s=r["read_s"],
                preprocess_s=r["preprocess_s"], device_s=r["device_s"] + r["finish_s"],
                wait_s=r["wait_s"], rss=dict(main=round(r["main_rss_mb"]), reader=round(r["reader_rss_mb"])))


def linked_tree(src: Path, dst: Path, copies: int) -> Path:
    """`copies` hard-linked copies of every subject folder of `src` under dst/copyNNN/."""
    for k in range(copies):
        for sub in sorted(src.iterdir()):
            d = dst / f"copy{k:03d}" / sub.name
            d.mkdir(parents=True)
            for f in sub.iterdir():
                os.link(f, d / f.name)
    return dst


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--backbone", default="mobilenet")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the backbone's)")
    ap.add_argument("--path", choices=["archive", "per_stack"], default="archive")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-slices", type=int, default=None, help="default: archive.default_batch_slices()")
    ap.add_argument("--copies", type=int, default=1, help="tree of K linked copies of the cohort")
    ap.add_argument("--no-warmup", action="store_true", help="time the first pass (compiles included)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)

    from stackcls.inference import load_model
    from stackcls.phantom import cohort

    root = cohort(a.subjects, seed=0)
    n_files = json.loads((root / "cohort.json").read_text())["files"] * a.copies
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(make_run(tmp, a.backbone, a.size))
        tree = root / "dicom" if a.copies == 1 else linked_tree(root / "dicom", tmp / "tree", a.copies)
        runs = []
        # warm-up over the cohort itself (the copies hold the same stack lengths: every shape is
        # compiled), then the timed pass over the tree
        for rep, where in enumerate(([] if a.no_warmup else [root / "dicom"]) + [tree]):
            if a.path == "per_stack":
                runs.append(per_stack(where, model))
            else:
                runs.append(archive(where, model, tmp / f"out{rep}.jsonl", a.workers, a.batch_slices))
        r = runs[-1]
    wall = r["wall_s"]
    res = dict(path=a.path, backbone=a.backbone, input_size=model.input_size, subjects=a.subjects,
               copies=a.copies,
               stacks=r["stacks"], files=n_files, wall_s=round(wall, 2),
               stacks_per_s=round(r["stacks"] / wall, 2), files_per_s=round(n_files / wall, 1),
               share={k[:-2]: round(r[k] / wall, 3) for k in ("read_s", "preprocess_s", "device_s", "wait_s")
                      if k in r},
               warmup_wall_s=round(runs[0]["wall_s"], 2) if len(runs) > 1 else None,
               # peak resident memory (MB) of this process and of the largest reader process
               peak_rss_mb=r.get("rss", dict(main=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))))
    if a.path == "archive":
        res.update(workers=a.workers, batch_slices=a.batch_slices)
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
