"""One setting of the paper's protocol, resumable: patient-level CV over folds x learning rates,
selection of (learning rate, epochs), then the final model on every training slice.

    res = run_setting("depth0", model, pool, subjects, lrs=[...], epochs=50, out_dir=run/"depth0")

Each CV job's record (curves, out-of-fold outputs) is saved to `out_dir/cv/<job>.npz` as soon as
its group finishes, and the final model to `out_dir/final` (checkpoint.save_model); a rerun with
the same arguments loads what is done and trains the rest. The selection rule is
`stackcls.train.selection.select` (shared with the stack head); the training loop is engine.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from flax import nnx

from stackcls.atomic import savez
from stackcls.train.checkpoint import is_saved, restore_model, save_model
from stackcls.train.engine import Job, JobResult, Pool, Trainer
from stackcls.models.classifier import Classifier
from stackcls.preprocess.arrays import oversample, patient_folds
from stackcls.train.selection import select


class SimulatedInterrupt(RuntimeError):
    """Raised by run_setting(fail_after_jobs=n): tests use it to interrupt a run and resume it."""


def fold_jobs(prefix: str, lrs: Sequence[float], folds, y: np.ndarray, oversample_factor: int,
              seed: int) -> list[Job]:
    """Jobs of a CV sweep: every learning rate x every fold (indices into the pool)."""
    jobs = []
    for lr in lrs:
        for f, (tr, va) in enumerate(folds):
            items = tr[oversample(y[tr], factor=oversample_factor, seed=seed + f)]
            jobs.append(Job(f"{prefix}/lr{lr:g}/fold{f}", float(lr), items.astype(np.int32),
                            np.asarray(va, np.int32)))
    return jobs


def final_job(prefix: str, lr: float, y: np.ndarray, oversample_factor: int, seed: int) -> Job:
    """The final model's job: every training slice (oversampled), no validation."""
    items = oversample(y, factor=oversample_factor, seed=seed).astype(np.int32)
    return Job(f"{prefix}/final", float(lr), items, np.zeros(0, np.int32))


# ----------------------------------------------------------------------------- CV job records

def _job_file(out_dir, job: Job) -> Path:
    return Path(out_dir) / "cv" / (job.name.replace("/", "_") + ".npz")


def _save_job(path: Path, job: Job, r: JobResult, seconds: float) -> None:
    savez(path, train_loss=r.train_loss, val_loss=r.val_loss, val_acc=r.val_acc,
          val_probs=r.val_probs, val_pen=r.val_pen, val=job.val, lr=job.lr, seconds=seconds)


def _load_job(path: Path) -> tuple[JobResult, float]:
    z = np.load(path)
    return (JobResult(z["train_loss"], z["val_loss"], z["val_acc"], z["val_probs"], z["val_pen"]),
            float(z["seconds"]))


def _cross_validate(name, trainer: Trainer, jobs: list[Job], folds: int, lrs, epochs: int, seed: int,
                    out_dir, vmapped: bool, fold_init, fail_after_jobs) -> dict[str, tuple[JobResult, float]]:
    """Every CV job's (result, seconds): loaded when its record exists, else trained (one
    learning rate's folds together when vmapping, else one job at a time) and recorded."""
    fold_of = {j.name: i % folds for i, j in enumerate(jobs)}
    shape = (max(len(j.items) for j in jobs), max(len(j.val) for j in jobs))
    done = {j.name: _load_job(_job_file(out_dir, j)) for j in jobs if _job_file(out_dir, j).is_file()}
    todo = [j for j in jobs if j.name not in done]
    groups = [[j for j in todo if j.lr == lr] for lr in lrs] if vmapped else [[j] for j in todo]
    trained = 0
    for g in [g for g in groups if g]:
        t0 = time.perf_counter()
        init = [fold_init(fold_of[j.name]) for j in g] if fold_init is not None else None
        res = trainer.run(g, epochs, seed, init=init, vmapped=vmapped,
                          desc=f"{name} lr={g[0].lr:g} ({len(g)} job{'s' if len(g) > 1 else ''})",
                          _shape=shape)
        dt = (time.perf_counter() - t0) / len(g)
        for j, r in zip(g, res):
            _save_job(_job_file(out_dir, j), j, r, dt)
            done[j.name] = (r, dt)
            trained += 1
            if fail_after_jobs is not None and trained >= fail_after_jobs:
                raise SimulatedInterrupt(f"{name}: stopped after {trained} job(s) (simulated)")
    return done


def _out_of_fold(jobs: list[Job], results: dict[str, JobResult], lr: float, epochs: int, n: int):
    """(probs (n, 3), penultimate (n, D)) of the selected (lr, epochs): every training slice
    predicted by the model of the fold that did not see it (inputs for the stack head)."""
    oof_probs = np.full((n, 3), np.nan, np.float32)
    oof_pen = None
    for j in jobs:
        if j.lr != lr:
            continue
        r = results[j.name]
        oof_probs[j.val] = r.val_probs[epochs - 1]
        pen = r.val_pen[epochs - 1].astype(np.float32)
        if oof_pen is None:
            oof_pen = np.full((n, pen.shape[-1]), np.nan, np.float32)
        oof_pen[j.val] = pen
    return oof_probs, oof_pen


def run_setting(name: str, model: Classifier, pool: Pool, subjects: np.ndarray, *, lrs, epochs: int,
                folds: int = 5, oversample_factor: int = 6, seed: int = 0, out_dir=None,
                vmapped: bool = True, batch_size: int = 32, decay: float = 1e-6,
                fold_init: Callable[[int], nnx.State] | None = None, final_init=None,
                save_config: dict | None = None, fail_after_jobs: int | None = None) -> dict:
    """Cross-validate (folds x lrs), select (lr, epochs), train the final model; resumable.

    pool/subjects: every training-set slice (subjects (N,) gives the patient of each).
    fold_init(f) / final_init: initial trainable states (depth 1 starts from depth-0 models).
    fail_after_jobs: raise SimulatedInterrupt after that many newly trained jobs.

    Returns dict(selected=dict(learning_rate, epochs), curves={lr: dict(train_loss, val_loss,
    val_acc) each (folds, E)}, model (final Classifier), oof_probs (N, 3), oof_pen (N, 256),
    folds, jobs, results (per job name), timing=dict(cv_seconds, final_seconds), trainer).
    """
    out_dir = Path(out_dir)
    y = np.asarray(pool.y)
    fold_idx = patient_folds(subjects, k=folds, seed=seed)
    jobs = fold_jobs(name, lrs, fold_idx, y, oversample_factor, seed)
    trainer = Trainer(model, pool, batch_size=batch_size, decay=decay)
    done = _cross_validate(name, trainer, jobs, folds, lrs, epochs, seed, out_dir, vmapped, fold_init,
                           fail_after_jobs)
    curves = {}
    for lr in lrs:
        rs = [done[j.name][0] for j in jobs if j.lr == lr]
        curves[float(lr)] = {k: np.stack([getattr(r, k) for r in rs])
                             for k in ("train_loss", "val_loss", "val_acc")}
    row, sel_epochs = select([np.asarray(c["val_acc"], np.float64).mean(axis=0) for c in curves.values()],
                             [np.asarray(c["val_loss"], np.float64).mean(axis=0) for c in curves.values()],
                             ties="fewer_epochs")
    sel_lr = list(curves)[row]
    results = {k: v[0] for k, v in done.items()}
    oof_probs, oof_pen = _out_of_fold(jobs, results, sel_lr, sel_epochs, len(y))
    final_dir = out_dir / "final"
    if is_saved(final_dir):
        final_model, cfg = restore_model(final_dir)
        final_seconds = float(cfg.get("train_seconds", 0.0))
    else:
        t0 = time.perf_counter()
        fj = final_job(name, sel_lr, y, oversample_factor, seed)
        r = trainer.run([fj], sel_epochs, seed, init=None if final_init is None else [final_init],
                        desc=f"{name} final (lr={sel_lr:g}, {sel_epochs} epochs)", keep_state=True)[0]
        final_model = trainer.apply(model, r)
        final_seconds = time.perf_counter() - t0
        save_model(final_dir, final_model, {**(save_config or {}), "setting": name,
                                            "learning_rate": sel_lr, "epochs": sel_epochs,
                                            "train_seconds": final_seconds,
                                            "final_train_loss": r.train_loss.tolist()})
    return dict(selected=dict(learning_rate=sel_lr, epochs=sel_epochs), curves=curves,
                model=final_model, oof_probs=oof_probs, oof_pen=oof_pen, folds=fold_idx,
                jobs=jobs, results=results,
                timing=dict(cv_seconds=float(sum(s for _, s in done.values())),
                            final_seconds=float(final_seconds)),
                trainer=trainer)
