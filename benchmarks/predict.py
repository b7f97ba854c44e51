"""End-to-end prediction throughput (files -> labels) on the built-in cohort: stacks/s, files/s,
CPU time per stack and where the time goes (reading, preprocessing, device).

    python benchmarks/predict.py [--subjects 20] [--backbone mobilenet] [--size SIZE]
                                 [--path per_stack archive] [--before CHECKOUT] [--repeats 3]
                                 [--workers W] [--batch-slices 64] [--copies K] [--no-warmup]

per_stack: what `stackcls predict ROOT --model RUN` has done since the start (the tree read whole
by `io.scan`, then `predict_stack` one stack at a time: preprocessing, one device call).
archive: `stackcls predict ROOT --model RUN --out X.jsonl` (stackcls.predict.archive: readers overlapped
with device calls, stacks of one length batched). --before CHECKOUT also times the per_stack path
of another checkout (e.g. `--before /work/main`: today's code), in a subprocess.

The paths are timed alternately, --repeats passes each, so every one sees the same machine load
(the load average is recorded beside every pass); the medians are reported, with the ratio of the
archive's stacks/s to each per-stack path's.

The model: the backbone at its input size (224 for MobileNet) with random weights (the speed is
that of trained ones) and a random stack head, mode "stack". Every shape is compiled in a warm-up
pass per path over the same tree first, so the timed passes are the steady state an archive runs
in. Reading and preprocessing of the archive path are summed over its readers (they overlap the
device time, so the shares can add up to more than the wall time). cpu_ms_per_stack: CPU time of
the process timing the path, all its threads (reader processes not included).

--copies K predicts a tree of K hard-linked copies of the cohort's subject folders (K x 2 x
subjects stacks, no extra disk): with --path archive --workers 2 --no-warmup --repeats 1 and a
small --size, the peak memory of the main process and of the largest reader process against the
tree's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_run(tmp: Path, backbone: str, size: int | None) -> Path:
    from flax import nnx

    from stackcls.models import backbones
    from stackcls.train.checkpoint import save_model, save_stack_model
    from stackcls.models.classifier import build_classifier
    from stackcls.models.stack_head import StackHead, StackModel

    size = size or backbones.spec(backbone).input_size
    clf = build_classifier(backbones.create(backbone, weights=None, input_size=size), size)
    run = tmp / "run"
    save_model(run / "depth0" / "final", clf, dict(backbone=backbone, input_size=size))
    head = StackModel(StackHead(259, 32, rngs=nnx.Rngs(1)), dict(in_features=259, hidden=32, dropout=0.2))
    save_stack_model(run / "depth0" / "stack", head)
    return run


def per_stack(root: Path, model) -> dict:
    from stackcls.io import scan
    from stackcls.predict.stack import predict_stack

    c0, t0 = time.process_time(), time.perf_counter()
    res = scan(root, progress=False)
    t1 = time.perf_counter()
    for st in res.stacks:
        predict_stack(st, model)
    t2, cpu = time.perf_counter(), time.process_time() - c0
    prep = 0.0
    for st in res.stacks:                    # preprocessing alone, as predict_stack does it
        t = time.perf_counter()
        model.preprocess(st.images)
        prep += time.perf_counter() - t
    return dict(stacks=len(res.stacks), wall_s=t2 - t0, cpu_s=cpu, read_s=t1 - t0, preprocess_s=prep,
                device_s=t2 - t1 - prep)


def archive(root: Path, model, out: Path, workers: int | None, batch_slices: int | None) -> dict:
    from stackcls.predict.archive import predict_archive

    c0 = time.process_time()
    r = predict_archive(root, model, out, workers=workers, batch_slices=batch_slices, progress=False)
    return dict(stacks=r["stacks"], wall_s=r["wall_s"], cpu_s=time.process_time() - c0, read_s=r["read_s"],
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


def serve(a) -> None:
    """--serve: time the per-stack path of this process's checkout once per line read on stdin,
    printing one JSON line each (the --before baseline, run alternately with the others)."""
    from stackcls.predict.load import load_model
    from stackcls.phantom import cohort

    root = cohort(a.subjects, seed=0) / "dicom"
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(make_run(Path(tmp), a.backbone, a.size))
        per_stack(root, model)                           # warm-up: every shape compiled
        print(json.dumps(dict(ready=True)), flush=True)
        for _ in iter(sys.stdin.readline, ""):
            print(json.dumps(per_stack(root, model)), flush=True)


def _summary(runs: list, n_files: int) -> dict:
    """The timed passes of one path: median stacks/s, and the shares of the median pass."""
    runs = sorted(runs, key=lambda r: r["wall_s"])
    r = runs[len(runs) // 2]
    wall = r["wall_s"]
    out = dict(stacks=r["stacks"], stacks_per_s=round(r["stacks"] / wall, 2), wall_s=round(wall, 2),
               files_per_s=round(n_files / wall, 1),
               all_stacks_per_s=[round(x["stacks"] / x["wall_s"], 2) for x in runs],
               load=[x["load"] for x in runs],
               # CPU seconds of this process (all its threads; not reader processes) per stack
               cpu_ms_per_stack=round(1000 * r["cpu_s"] / r["stacks"], 1),
               share={k[:-2]: round(r[k] / wall, 3) for k in ("read_s", "preprocess_s", "device_s", "wait_s")
                      if k in r})
    if "rss" in r:
        out["peak_rss_mb"] = r["rss"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--backbone", default="mobilenet")
    ap.add_argument("--size", type=int, default=None, help="input size (default: the backbone's)")
    ap.add_argument("--path", nargs="+", choices=["archive", "per_stack"], default=["per_stack", "archive"])
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout (e.g. today's main) whose per_stack path is timed too, in a "
                         "subprocess, alternately with the others")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per path, alternating")
    ap.add_argument("--workers", type=int, default=None, help="default: archive.default_workers()")
    ap.add_argument("--batch-slices", type=int, default=None, help="default: archive.default_batch_slices()")
    ap.add_argument("--copies", type=int, default=1, help="tree of K linked copies of the cohort")
    ap.add_argument("--no-warmup", action="store_true", help="time the first pass (compiles included)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        return serve(a)

    from stackcls.predict.load import load_model
    from stackcls.phantom import cohort

    root = cohort(a.subjects, seed=0)
    n_files = json.loads((root / "cohort.json").read_text())["files"] * a.copies
    before = None
    if a.before is not None:
        env = dict(os.environ, PYTHONPATH=str(a.before.resolve()))
        before = subprocess.Popen([sys.executable, __file__, "--serve", "--subjects", str(a.subjects),
                                   "--backbone", a.backbone] + (["--size", str(a.size)] if a.size else []),
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=str(a.before))
        if "ready" not in json.loads(before.stdout.readline() or "{}"):
            raise SystemExit(f"--before {a.before}: the baseline process did not start")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(make_run(tmp, a.backbone, a.size))
        tree = root / "dicom" if a.copies == 1 else linked_tree(root / "dicom", tmp / "tree", a.copies)
        n = iter(range(10 ** 6))

        def once(path, where):
            if path == "before":
                before.stdin.write("go\n")
                before.stdin.flush()
                r = json.loads(before.stdout.readline())
            elif path == "per_stack":
                r = per_stack(where, model)
            else:
                r = archive(where, model, tmp / f"out{next(n)}.jsonl", a.workers, a.batch_slices)
            return dict(r, load=round(os.getloadavg()[0], 1))

        paths = (["before"] if before else []) + list(a.path)
        warm = {}
        if not a.no_warmup:   # over the cohort itself (the copies hold the same stack lengths)
            warm = {p: once(p, root / "dicom")["wall_s"] for p in paths if p != "before"}
        runs = {p: [] for p in paths}
        for _ in range(a.repeats):       # alternating, so every path sees the same load
            for p in paths:
                runs[p].append(once(p, tree))
    if before:
        before.stdin.close()
        before.wait()
    res = dict(backbone=a.backbone, input_size=model.input_size, subjects=a.subjects, copies=a.copies,
               files=n_files, repeats=a.repeats, cpus=os.cpu_count(),
               warmup_wall_s={p: round(w, 2) for p, w in warm.items()},
               **{p: _summary(r, n_files) for p, r in runs.items()})
    if "archive" in runs:
        from stackcls.predict.archive import default_batch_slices, default_workers
        res["archive"].update(workers=default_workers() if a.workers is None else a.workers,
                              batch_slices=a.batch_slices or default_batch_slices())
        for base in ("per_stack", "before"):
            if base in runs:
                res[f"ratio_archive_to_{base}"] = round(res["archive"]["stacks_per_s"] / res[base]["stacks_per_s"], 2)
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
