"""Prediction over an archive of any size: `stackcls predict ROOT --model RUN --out results.jsonl`.

    summary = predict_archive(root, model, "results.jsonl", shard=(0, 4), workers=2)

The tree is walked lazily into read units (`units`): an ACDC patient folder, a NIfTI file, or the
candidate DICOM files of one folder (a DICOM series is read from the folder that holds its files;
a series split over several folders is read as several partial series). No list of the tree is
ever held: a unit is read when a reader is free for it, and at most 2 per reader are in flight.

    walk (main) -> read + preprocess (readers: threads of this process, or spawned processes)
                -> [method=anatomy models: their networks, per stack, in this process]
                -> buckets by stack length S
                -> one device call per K stacks of one S (predict._compiled, batched; K = 1 on CPU)
                -> predict.finish per stack -> one JSON line per stack (flushed)

Readers (`default_workers`): on up to 2 cores, `READ_THREADS` threads of this process (numpy
and XLA release the GIL, so reading overlaps the device; reader processes measured several times
slower there, docs/scaling.md); on more cores, spawned processes. BLAS gets one thread (`_one_blas_thread`). Readers hand over each stack's
preprocessed slices in one grey channel (`preprocess.grey_model_input`), copied into RGB inside
the compiled call. A method=anatomy model (the shipped default among them) preprocesses with its
networks (resampling to its physical scale, localising the heart, segmenting every slice), so
readers hand over the slices as read and this process runs the networks stack by stack; what
reaches the buckets is then each slice's evidence and probabilities. Device calls are
asynchronous: a call's stacks are written while the next runs.
Units are taken in walk order, so the output is the same file whatever the timing.

Output: one JSON line per stack (`unit`, `stack` and the `Prediction` fields, or `error`), and
after the last stack of a unit a line {"unit": ..., "done": n_stacks, "skipped": [...]}. Resume: a
unit with its "done" line is not read again; a unit without one is read again and only its stacks
without a line are predicted (a line cut by a kill is removed first). `shard=(I, N)`: the units
whose relative path hashes (crc32) to I mod N, so N array jobs cover every stack exactly once
whatever order they walk in. The summary CSV (one row per stack) is rewritten from the JSONL at
the end of every run, so it covers the resumed stacks too.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

from stackcls.io.errors import printable, printable_tree
from stackcls.predict.units import (_load_done, in_shard, parse_shard, peak_rss_mb, read_unit, units,
                                    write_summary)
from stackcls.progress import bar as tqdm


# ----------------------------------------------------------------------------- the lazy walk


# ----------------------------------------------------------------------------- reading (workers)


# ----------------------------------------------------------------------------- the output file


# ----------------------------------------------------------------------------- the driver

@dataclasses.dataclass
class Timing:
    read_s: float = 0.0          # summed over readers
    preprocess_s: float = 0.0    # summed over readers
    device_s: float = 0.0        # main thread: dispatching device calls and waiting for results
    finish_s: float = 0.0        # main thread: decoding to Predictions and writing lines
    wait_s: float = 0.0          # main thread: waiting for a reader's unit


# Reader threads when reading in this process (workers=0): with the main thread's device calls
# that is one busy thread per core of a 2-core machine, and reading still keeps up when the device
# waits. Numpy and XLA release the GIL; only the DICOM header parsing holds it.
READ_THREADS = 2


def _one_blas_thread():
    """The pipeline runs stacks in parallel, so BLAS (the resize's matmul) gets one thread: with
    OpenBLAS's default threads, which spin while they wait, preprocessing took 4x the CPU time."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1, user_api="blas")


def default_workers() -> int:
    """Reader processes by core count: none up to 2 cores (reader threads in this process; 1 or
    2 reader processes measured 3-6x slower on 2 cores, docs/scaling.md), else one per spare
    core, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cpus <= 2 else min(cpus - 1, 8)


def default_batch_slices() -> int:
    """Slices per device call: XLA:CPU runs a 224 px MobileNet ~1.7x slower per slice in one call
    of 60 slices than in five of 12 (activations out of cache; measured), so on CPU a stack is its
    own call; accelerators want large batches."""
    import jax
    return 16 if jax.default_backend() == "cpu" else 256


def predict_archive(root, model, out, *, mode: str | None = None, shard=(0, 1), workers: int | None = None,
                    batch_slices: int | None = None, summary=None, progress: bool = True) -> dict:
    """Predict every stack under `root` into the JSONL file `out` (see the module docstring).

    model: a run directory, a loaded `TrainedModel` (preprocessing is read from its
    `input_size` and `config["keep"]`) or `AnatomyModel`, or None: the shipped default.
    workers: reader processes; 0: `READ_THREADS` reader threads in this process; None:
    `default_workers()`.
    batch_slices: slices per device call (K = max(1, batch_slices // S) stacks of length S;
    default `default_batch_slices()`).
    summary: the CSV path (default: `out` with .csv). Returns counts and timings."""
    from stackcls.predict.stack import (MODES, _compiled, _preprocess, as_model, finish, resolve_mode,
                                        spacing_used)

    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    root, out = Path(root), Path(out)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    m = as_model(model)
    try:
        mode = resolve_mode(m, mode)
    except ValueError as e:
        raise ValueError(f"model {model}: {e}") from None
    # a method=paper model's preprocessing is array work, done by the readers; a method=anatomy
    # model's runs its networks, here, and hands the core per-slice outputs, not images
    networks = not hasattr(m, "model")
    size, keep = (None if networks else int(m.input_size)), float(m.config.get("keep", 0.6))
    run, single = (_compiled(m, mode, batched=True, grey=not networks),
                   _compiled(m, mode, grey=not networks))
    batch_slices = batch_slices or default_batch_slices()
    workers = default_workers() if workers is None else workers
    out.parent.mkdir(parents=True, exist_ok=True)
    units_done, stacks_done = _load_done(out)
    t = Timing()
    counts = dict(stacks=0, resumed=len(stacks_done), units=0, files=0, errors=0, reader_rss_mb=0.0,
                  workers=workers)
    t_start = time.perf_counter()

    f = open(out, "a", encoding="utf-8")
    pending = {}                           # unit rel -> [stacks still to write, done record]
    buckets: dict[int, list] = defaultdict(list)
    dispatched = []                        # the last device call: [(batch, its outputs)], not yet written

    def write(rec):
        f.write(json.dumps(printable_tree(rec)) + "\n")

    def unit_step(rel):
        left = pending[rel]
        left[0] -= 1
        if left[0] == 0:
            write(left[1])
            f.flush()
            del pending[rel]

    def write_dispatched():
        if not dispatched:
            return
        batch, outs = dispatched.pop()
        t0 = time.perf_counter()
        res = [np.asarray(o) for o in outs]
        t1 = time.perf_counter()
        for i, (rel, key, w) in enumerate(batch):
            pred = finish(w, tuple(o[i] for o in res), mode, m)
            write(dict(unit=rel, stack=key, **pred.to_dict()))
            counts["stacks"] += 1
            unit_step(rel)
        f.flush()
        t.device_s += t1 - t0
        t.finish_s += time.perf_counter() - t1

    def flush(S):
        """One device call for the stacks of length S. JAX dispatches it asynchronously: the
        previous call's stacks are decoded and written while this one runs."""
        batch, buckets[S] = buckets[S], []
        K = max(1, batch_slices // S)
        t0 = time.perf_counter()
        if K > 1:
            x = np.stack([w.images for _, _, w in batch] + [batch[-1][2].images] * (K - len(batch)))
            outs = run(x)
        else:
            outs = [o[None] for o in single(batch[0][2].images)]
        t.device_s += time.perf_counter() - t0
        write_dispatched()
        dispatched.append((batch, outs))

    def take(r):
        rel = r["unit"].rel
        t.read_s += r["read_s"]
        t.preprocess_s += r["preprocess_s"]
        counts["units"] += 1
        counts["files"] += r["files"]
        counts["reader_rss_mb"] = max(counts["reader_rss_mb"], r["rss_mb"])
        todo = [(key, w) for key, w in r["stacks"] if key not in stacks_done]
        pending[rel] = [len(todo) + 1, dict(unit=rel, done=len(r["stacks"]) + len(r["errors"]),
                                            skipped=r["skipped"])]
        for key, why in r["errors"]:
            if key not in stacks_done:
                write(dict(unit=rel, stack=key, error=why))
                counts["errors"] += 1
        for key, w in todo:
            if networks:
                t0 = time.perf_counter()
                w.images = _preprocess(m, w.images, w.spacing)
                w.spacing_used = spacing_used(m, w.spacing)
                t.device_s += time.perf_counter() - t0
            S = w.images.shape[0]
            buckets[S].append((rel, key, w))
            if len(buckets[S]) >= max(1, batch_slices // S):
                flush(S)
        unit_step(rel)                        # the unit's own share: written once its stacks are

    todo_units = (u for u in units(root) if in_shard(u, shard) and u.rel not in units_done)
    n_units = sum(1 for u in units(root) if in_shard(u, shard) and u.rel not in units_done)
    bar = tqdm(total=n_units, desc="predict", unit="unit", disable=not progress, file=sys.stderr,
               smoothing=0.1)

    def tick():
        bar.update(1)
        rate = counts["stacks"] / max(time.perf_counter() - t_start, 1e-9)
        bar.set_postfix(stacks=counts["stacks"], stacks_s=f"{rate:.1f}")

    if workers > 0:
        # spawned: this process holds JAX's threads
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_one_blas_thread)
    else:
        pool = cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="stackcls-read")
    ahead = 2 * (workers if workers > 0 else READ_THREADS)
    inflight = deque()       # units are taken in walk order: the same file whatever the timing

    def take_next():
        t0 = time.perf_counter()
        r = inflight.popleft().result()
        t.wait_s += time.perf_counter() - t0
        take(r)
        tick()

    blas = _one_blas_thread()      # this process's readers and finishing (restored at the end)
    try:
        for u in todo_units:
            inflight.append(pool.submit(read_unit, str(root), u, size, keep))
            if len(inflight) >= ahead:
                take_next()
        while inflight:
            take_next()
        for S in list(buckets):
            if buckets[S]:
                flush(S)
        write_dispatched()
    finally:
        for fut in inflight:
            fut.cancel()
        pool.shutdown()
        blas.restore_original_limits()
        f.close()
        bar.close()
    summary = Path(summary) if summary is not None else out.with_suffix(".csv")
    rows = write_summary(out, summary)
    wall = time.perf_counter() - t_start
    return dict(counts, wall_s=wall, main_rss_mb=peak_rss_mb(), stacks_per_s=counts["stacks"] / max(wall, 1e-9),
                files_per_s=counts["files"] / max(wall, 1e-9), summary=str(summary),
                summary_rows=rows, **dataclasses.asdict(t))


def archive_command(root, model, out, mode=None, shard="0/1", workers=None,
                    batch_slices: int | None = None) -> int:
    """`stackcls predict ROOT --model RUN --out results.jsonl [--shard I/N] [--workers W]`."""
    try:
        sh = parse_shard(shard)
        res = predict_archive(root, model, out, mode=mode, shard=sh, batch_slices=batch_slices,
                              workers=workers)
    except ValueError as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return 2
    print(printable(f"{res['stacks']} stacks predicted ({res['resumed']} already in {out}), "
                    f"{res['errors']} not predictable, {res['units']} units, {res['files']} files; "
                    f"{res['stacks_per_s']:.1f} stacks/s; summary {res['summary']}"))
    return 0
