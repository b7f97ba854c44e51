"""Run by tests/test_parallel.py in fresh processes (XLA_FLAGS must be set before JAX starts).

    python tests/parallel_worker.py devices OUT.json            4 CPU devices: passes and a
                                                                 tiny study, 1 device vs 4
    python tests/parallel_worker.py distributed PORT ID OUT.npz  one of two processes joined by
                                                                 jax.distributed: a sharded training
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = ["backbone=mobilenet", "weights=none", "depth=1", "protocol.image_size=32", "progress=false",
        "protocol.synthetic_subjects.train=5", "protocol.synthetic_subjects.test=2",
        "protocol.epochs=2", "protocol.views=1", "protocol.learning_rates.depth0=[0.01]",
        "protocol.learning_rates.depth1=[0.001]", "protocol.stack.epochs=5"]


def tiny_trainer(n=48):
    """A depth-0 trainer of mobilenet at 32 px on learnable toy data, and 3 jobs (3 folds)."""
    from test_engine import toy_data

    from stackcls.models import backbones
    from stackcls.train.engine import Pool, Trainer
    from stackcls.models.apply import extract
    from stackcls.models.classifier import build_classifier
    from stackcls.preprocess.arrays import patient_folds
    from stackcls.train.sweep import fold_jobs

    x, y, subj = toy_data(n)
    model = build_classifier(backbones.create("mobilenet", weights=None, input_size=32), 32, seed=0)
    pool = Pool("features", extract(model, x, "features", views=2, seed=0), extract(model, x, "features"), y)
    return Trainer(model, pool), fold_jobs("t", [1e-1], patient_folds(subj, k=3, seed=0), y, 6, 0), x


def devices(out: str) -> None:
    # One core for XLA's thread pool. Simulated CPU devices run a collective's participants as
    # tasks of that shared pool; on a 2-core machine the pool is smaller than the 4 participants,
    # and a participant queued behind the ones blocked in the rendezvous never arrives (seen in CI:
    # "only 3 of them arrived", an abort after 600 s). With a pool of one, each device's program
    # runs its collectives on its own launcher thread.
    import os
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax

    from stackcls import parallel
    from stackcls.study.config import compose
    from stackcls.study.run import run

    assert len(jax.devices()) == 4, jax.devices()
    rec = {}
    for spec in ("1", "auto"):
        parallel.activate(spec)
        tr, jobs, x = tiny_trainer()
        from stackcls.models.apply import extract
        res = tr.run(jobs, 3, keep_state=True)
        rec[spec] = dict(
            features=np.asarray(extract(tr.model, x[:40], "features", views=1, seed=3)).tolist(),
            curves=[r.val_probs.tolist() for r in res],
            params=[np.concatenate([np.ravel(a) for a in jax.tree.leaves(r.trainable)]).tolist()
                    for r in res],
            study=run(compose(TINY + [f"run_dir={Path(out).parent / ('run' + spec)}",
                                      f"devices={spec}"])))
    Path(out).write_text(json.dumps(rec))


def distributed(port: str, pid: str, out: str) -> None:
    """port "none": one process on one device, the reference."""
    from stackcls import parallel

    if port != "none":
        assert parallel.initialize(f"localhost:{port}", 2, int(pid))
    import jax

    mesh = parallel.activate("auto" if port != "none" else 1)
    if port != "none":
        assert jax.process_count() == 2 and mesh.devices.size == 4
    tr, jobs, _ = tiny_trainer()
    res = tr.run(jobs, 3, keep_state=True)         # 3 jobs padded to 4, one per device of 2 processes
    # one job alone (not vmapped): the same computation replicated on every device of both processes
    one = tr.run(jobs[:1], 2, vmapped=False, keep_state=True)[0]
    flat = lambda r: np.concatenate([np.ravel(parallel.fetch(a)) for a in jax.tree.leaves(r.trainable)])
    np.savez(out, jobs=np.stack([flat(r) for r in res]), loss=np.stack([r.train_loss for r in res]),
             one=flat(one), writer=parallel.is_writer())


if __name__ == "__main__":
    {"devices": devices, "distributed": distributed}[sys.argv[1]](*sys.argv[2:])
