"""The training engine: the paper's SGD loop for the classifier, and AdamW for the stack head.

The classifier's three settings share one loop; they differ only in what a training sample is,
the stage (models.py): "features" (depth 0: pooled features of V rotated views per slice, cached;
only the head trains), "carry" (depth 1: trunk outputs of the same views, cached; the last block
and the head train) and "image" (CBR from scratch: images rotated on the fly inside the jitted
step; everything trains, BN in training mode with Keras momentum 0.99). Frozen BatchNorm layers,
the trained last block's included, stay in inference mode (moving statistics frozen, gamma/beta
trained), as the Keras transfer-learning guide prescribes for fine-tuning, so depth 0 and 1 agree.

Optimiser: SGD, Nesterov momentum 0.9 (optax.trace), with Keras' legacy decay applied per step:
lr_t = lr / (1 + decay * t). Every batch holds `batch_size` samples: an epoch is one pass over the
oversampled training list in a fresh random order, and the last partial batch is filled up from the
start of that order (so BatchNorm never sees padding).

Training runs as "jobs" (sweep.py makes them: folds x learning rates); jobs of one group are
vmapped together (padded to the largest fold; a job whose epoch has fewer batches simply skips the
extra steps), which is what makes the head-only sweep of depth 0 one compiled call per epoch.
Convolutional settings are vmapped only on accelerators (XLA:CPU runs vmapped convolutions with
per-job kernels as slow grouped convolutions). Every job's randomness derives from (seed, job
name), so grouping does not change the draws. The step and the validation are written once
(`_EpochFns`); an epoch drives them with `lax.scan` or, for convolutions on CPU, from Python.
`stackcls.train.sequences` is the stack head's loop.

Devices (`stackcls.parallel`): with a mesh of several devices, a vmapped group's job axis is
sharded over it (the group padded with copies of its last job to a multiple of the device count;
each job runs whole on one device, so results do not depend on the count), and the host driver's
batch is sharded instead (one job: its gradient is summed across devices, equal to one device's
to float rounding); a single job in a jitted scan is not sharded (each device runs it whole). The
pool and frozen parameters are replicated on every device.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stackcls import parallel
from stackcls.preprocess.augment import random_rotation
from stackcls.models.classifier import Classifier, trainable_filter
from stackcls.progress import bar as tqdm


def split(model: Classifier, stage: str):
    """(graphdef, trainable, frozen params, batch stats, rest) for a stage."""
    return nnx.split(model, trainable_filter(stage), nnx.Param, nnx.BatchStat, ...)


def job_key(seed: int, name: str) -> jax.Array:
    """A PRNG key from the run seed and a job's name (stable across processes and groupings)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass
class Job:
    """One training run: `items` index the pool (an epoch's samples, oversampled), `val` the clean
    pool (validation, may be empty); `name` seeds it (e.g. "d0/lr0.01/fold2")."""

    name: str
    lr: float
    items: np.ndarray
    val: np.ndarray


@dataclasses.dataclass
class JobResult:
    train_loss: np.ndarray  # (E,)
    val_loss: np.ndarray  # (E,) (NaN without validation)
    val_acc: np.ndarray  # (E,)
    val_probs: np.ndarray | None  # (E, K, 3)
    val_pen: np.ndarray | None  # (E, K, 256) float16
    trainable: nnx.State | None = None
    stats: nnx.State | None = None


@dataclasses.dataclass
class Pool:
    """What training samples are made of. views: pytree with leading (N, V) (V fixed rotated views
    per slice; V = 1 for on-the-fly rotation); clean: the same slices unaugmented, leading (N,);
    y: (N,) labels."""

    stage: str
    views: object
    clean: object
    y: np.ndarray
    rotate_deg: float = 0.0  # on-the-fly rotation (stage "image")


class _EpochFns:
    """The pure pieces of one job's epoch. `state`: dict(trainable, opt, stats, step) of one job;
    `shared`: what every job reads (cached views, clean pool, labels, frozen params); `data`: one
    job's padded items / validation indices and learning rate."""

    def __init__(self, trainer: "Trainer", n_batches: int):
        self.graphdef, self.stage, self.B, self.C = trainer.graphdef, trainer.stage, trainer.B, trainer.C
        self.decay, self.tx, self.rot = trainer.decay, trainer.tx, trainer.pool.rotate_deg
        self.per_job_stats, self.n_batches = trainer.per_job_stats, n_batches

    def _stats(self, stats, shared):
        return stats if self.per_job_stats else shared["stats"]

    def loss(self, trainable, frozen, stats, rest, inputs, labels, key):
        m = nnx.merge(self.graphdef, trainable, frozen, stats, rest, copy=True)
        kd, kr = jax.random.split(key)
        if self.stage == "image" and self.rot:   # cached stages hold views rotated beforehand
            inputs = random_rotation(kr, inputs, self.rot)
        logits = m.head(m.stage_features(inputs, self.stage, train=True), kd)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.state(m, nnx.BatchStat)

    def order(self, data, key, V: int):
        """A fresh order of this job's samples (padding sorted last), wrapped to full batches,
        and a random cached view per sample."""
        kperm, kview, kstep = jax.random.split(key, 3)
        items, n = data["items"], data["n_items"]
        M, nb, B = items.shape[0], self.n_batches, self.B
        r = jax.random.uniform(kperm, (M,)) + (jnp.arange(M) >= n).astype(jnp.float32) * 2.0
        order = items[jnp.argsort(r)]
        seq = order[jnp.arange(nb * B) % n].reshape(nb, B)
        return seq, jax.random.randint(kview, (nb, B), 0, V), kstep

    def step(self, carry, b, idx, v, shared, lr, kstep):
        """One SGD step on batch b (samples idx, views v): carry = (trainable, opt, stats, step)."""
        trainable, opt, stats, step = carry
        inputs = jax.tree.map(lambda a: a[idx, v], shared["views"])
        (loss, new_stats), grads = jax.value_and_grad(self.loss, has_aux=True)(
            trainable, shared["frozen"], self._stats(stats, shared), shared["rest"], inputs,
            shared["y"][idx], jax.random.fold_in(kstep, b))
        updates, opt = self.tx.update(grads, opt, trainable)
        lr_t = lr / (1.0 + self.decay * step.astype(jnp.float32))
        trainable = jax.tree.map(lambda p, u: p - lr_t * u, trainable, updates)
        return (trainable, opt, new_stats if self.per_job_stats else stats, step + 1), loss

    def predict(self, trainable, stats, shared, ix):
        """(logits, penultimate) of the clean samples ix, inference mode."""
        m = nnx.merge(self.graphdef, trainable, shared["frozen"], self._stats(stats, shared),
                      shared["rest"], copy=True)
        pen = m.head.penultimate(m.stage_features(jax.tree.map(lambda a: a[ix], shared["clean"]),
                                                  self.stage))
        return m.head.logits(pen), pen

    @staticmethod
    def metrics(logits, pen, data, shared) -> dict:
        """Validation curves of one epoch from the padded validation outputs (mask: real rows)."""
        yv = shared["y"][data["val"]]
        w = jnp.asarray(data["val_mask"]).astype(jnp.float32)
        nv = jnp.maximum(w.sum(), 1.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yv)
        return dict(val_loss=(ce * w).sum() / nv,
                    val_acc=((jnp.argmax(logits, -1) == yv) * w).sum() / nv,
                    val_probs=jax.nn.softmax(logits), val_pen=pen.astype(jnp.float16))

    # -- the two drivers -------------------------------------------------------------------
    def scanned(self, has_val: bool):
        """epoch(state, data, shared, key) as one traceable function (jit / vmap it)."""

        def epoch(state, data, shared, key):
            V = jax.tree.leaves(shared["views"])[0].shape[1]
            seq, vsel, kstep = self.order(data, key, V)
            job_batches = (data["n_items"] + self.B - 1) // self.B

            def body(carry, xs):
                *old, loss_sum = carry
                b, idx, v = xs
                new, loss = self.step(tuple(old), b, idx, v, shared, data["lr"], kstep)
                # steps past this job's epoch are skipped with a select, so jobs of different
                # lengths batch under vmap
                ok = b < job_batches
                new = jax.tree.map(lambda a, o: jnp.where(ok, a, o), new, tuple(old))
                return (*new, loss_sum + jnp.where(ok, loss, 0.0)), None

            carry0 = (state["trainable"], state["opt"], state["stats"], state["step"],
                      jnp.zeros((), jnp.float32))
            (tr, opt, stats, step, loss_sum), _ = jax.lax.scan(
                body, carry0, (jnp.arange(self.n_batches), seq, vsel))
            out = dict(train_loss=loss_sum / job_batches.astype(jnp.float32))
            if has_val:
                logits, pen = jax.lax.map(lambda ix: self.predict(tr, stats, shared, ix),
                                          data["val"].reshape(-1, self.C))
                out.update(self.metrics(logits.reshape(-1, 3), pen.reshape(-1, pen.shape[-1]),
                                        data, shared))
            return dict(trainable=tr, opt=opt, stats=stats, step=step), out

        return epoch

    def host(self, has_val: bool):
        """The same epoch driven from Python: one jitted call per batch and validation chunk."""
        step_j = jax.jit(self.step, donate_argnums=(0,))
        mesh = parallel.mesh()
        # one job: the batch is what there is to shard
        place = (lambda a: parallel.rows(a)) if mesh is not None and self.B % mesh.devices.size == 0 \
            else (lambda a: a)
        order_j = jax.jit(self.order, static_argnums=2)
        pred_j = jax.jit(self.predict)

        def epoch(state, data, shared, key):
            V = jax.tree.leaves(shared["views"])[0].shape[1]
            seq, vsel, kstep = order_j(data, key, V)
            carry = (state["trainable"], state["opt"], state["stats"], state["step"])
            losses = []
            for b in range(-(-int(data["n_items"]) // self.B)):
                carry, loss = step_j(carry, jnp.int32(b), place(seq[b]), place(vsel[b]), shared,
                                     data["lr"], kstep)
                losses.append(loss)
            tr, opt, stats, step = carry
            out = dict(train_loss=jnp.mean(jnp.stack(losses)))
            if has_val:
                parts = [pred_j(tr, stats, shared, jnp.asarray(ix))
                         for ix in np.asarray(data["val"]).reshape(-1, self.C)]
                out.update(self.metrics(jnp.concatenate([lo for lo, _ in parts]),
                                        jnp.concatenate([pe for _, pe in parts]), data, shared))
            return dict(trainable=tr, opt=opt, stats=stats, step=step), out

        return epoch


class Trainer:
    """Trains jobs of one stage on one pool, vmapped in groups."""

    def __init__(self, model: Classifier, pool: Pool, batch_size: int = 32, momentum: float = 0.9,
                 decay: float = 1e-6, eval_chunk: int = 64):
        self.model = model
        self.pool = pool
        self.stage = pool.stage
        self.B = batch_size
        self.decay = decay
        self.C = eval_chunk
        self.tx = optax.trace(decay=momentum, nesterov=True)
        self.graphdef, tr, self.frozen, stats, self.rest = split(model, self.stage)
        self.init_trainable = tr
        self.per_job_stats = self.stage == "image"
        self.stats = stats
        # every device reads the whole pool and the frozen weights (parallel.replicated: a no-op
        # on one device)
        self.frozen, self.rest, self.stats = parallel.replicated((self.frozen, self.rest, self.stats))
        self.views = parallel.replicated(jax.tree.map(jnp.asarray, pool.views))
        self.clean = parallel.replicated(jax.tree.map(jnp.asarray, pool.clean))
        self.y = parallel.replicated(jnp.asarray(pool.y, jnp.int32))
        self._compiled = {}

    def _epoch(self, n_batches: int, has_val: bool, vmapped: bool):
        k = (n_batches, has_val, vmapped)
        if k not in self._compiled:
            fns = _EpochFns(self, n_batches)
            if vmapped:
                self._compiled[k] = jax.jit(jax.vmap(fns.scanned(has_val), in_axes=(0, 0, None, 0)),
                                            donate_argnums=(0,))
            elif self.stage != "features" and jax.default_backend() == "cpu":
                # XLA:CPU runs convolutions inside scan/while bodies far slower (~50x measured on
                # VGG16's block 5) than top-level ones: drive the batches from Python there
                self._compiled[k] = fns.host(has_val)
            else:
                self._compiled[k] = jax.jit(fns.scanned(has_val), donate_argnums=(0,))
        return self._compiled[k]

    @staticmethod
    def _job_data(job: Job, M: int, Kp: int) -> dict:
        """A job's items and validation indices, zero-padded to the group's shape (M, Kp)."""
        items, val, mask = np.zeros(M, np.int32), np.zeros(Kp, np.int32), np.zeros(Kp, bool)
        items[:len(job.items)], val[:len(job.val)], mask[:len(job.val)] = job.items, job.val, True
        return dict(items=items, n_items=np.int32(len(job.items)), val=val, val_mask=mask,
                    lr=np.float32(job.lr))

    def run(self, jobs: Sequence[Job], epochs: int, seed: int = 0, init: Sequence[nnx.State] | None = None,
            vmapped: bool = True, desc: str = "train", keep_state: bool = False,
            _shape: tuple | None = None) -> list[JobResult]:
        """Train `jobs` together for `epochs`; `init`: per-job trainable states (default: the
        model's). Returns one JobResult per job (with final states if keep_state)."""
        J = len(jobs)
        if J == 0:
            return []
        init = list(init) if init is not None else [self.init_trainable] * J
        n_items = np.array([len(j.items) for j in jobs])
        if (n_items == 0).any():
            raise ValueError(f"{desc}: a job has no training samples")
        # one padded shape for all jobs: one compilation, whether vmapped or one after another
        M, K = _shape or (int(n_items.max()), max(len(j.val) for j in jobs))
        if not vmapped and J > 1:
            return [self.run([j], epochs, seed, [t], False, f"{desc} {i + 1}/{J}", keep_state,
                             (M, K))[0] for i, (j, t) in enumerate(zip(jobs, init))]
        vmapped = vmapped and J > 1
        n_dev = parallel.size()
        if vmapped and J % n_dev:   # copies of the last job fill the last device; their results are dropped
            pad = n_dev - J % n_dev
            jobs, init = list(jobs) + [jobs[-1]] * pad, init + [init[-1]] * pad
        has_val = K > 0
        Kp = int(math.ceil(K / self.C) * self.C) if has_val else self.C
        data = [self._job_data(j, M, Kp) for j in jobs]
        states = [dict(trainable=t, opt=self.tx.init(t),
                       stats=self.stats if self.per_job_stats else nnx.State({}),
                       step=jnp.zeros((), jnp.int32)) for t in init]
        keys = [job_key(seed, j.name) for j in jobs]
        shared = dict(views=self.views, clean=self.clean, y=self.y, frozen=self.frozen,
                      rest=self.rest, stats=self.stats if not self.per_job_stats else nnx.State({}))
        fn = self._epoch(int(math.ceil(M / self.B)), has_val, vmapped)

        def stack(xs):
            return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *xs)

        if vmapped:
            state, dat = parallel.rows(stack(states)), parallel.rows(stack(data))
        else:
            # copies: the state is donated, and must not take the model's own arrays with it
            state, dat = jax.tree.map(jnp.copy, states[0]), jax.tree.map(jnp.asarray, data[0])
        hist = {k: [] for k in ("train_loss", "val_loss", "val_acc", "val_probs", "val_pen")}
        with tqdm(range(epochs), desc=desc, unit="epoch", leave=False) as bar:
            for e in bar:
                ek = parallel.rows(stack([jax.random.fold_in(k, e) for k in keys])) if vmapped \
                    else jax.random.fold_in(keys[0], e)
                state, out = fn(state, dat, shared, ek)
                out = parallel.fetch(out)
                if not vmapped:
                    out = jax.tree.map(lambda a: np.asarray(a)[None], out)
                for k in hist:
                    if k in out:
                        hist[k].append(np.asarray(out[k]))
                post = dict(loss=f"{np.mean(out['train_loss']):.3f}")
                if has_val:
                    post["val_acc"] = f"{np.mean(out['val_acc']):.3f}"
                bar.set_postfix(post)
        # several processes: each holds only its devices' jobs
        final = parallel.fetch(state) if keep_state and jax.process_count() > 1 else state
        return [self._result(hist, i, j, epochs, has_val, final if keep_state else None,
                             vmapped) for i, j in enumerate(jobs[:J])]

    def _result(self, hist: dict, i: int, job: Job, epochs: int, has_val: bool, state, vmapped):
        """Job i's curves from the per-epoch history (and its final state when given)."""
        k = len(job.val)
        tl = np.array([h[i] for h in hist["train_loss"]], np.float32)
        if has_val:
            r = JobResult(tl, np.array([h[i] for h in hist["val_loss"]], np.float32),
                          np.array([h[i] for h in hist["val_acc"]], np.float32),
                          np.stack([h[i][:k] for h in hist["val_probs"]]).astype(np.float32),
                          np.stack([h[i][:k] for h in hist["val_pen"]]))
        else:
            nan = np.full(epochs, np.nan, np.float32)
            r = JobResult(tl, nan, nan.copy(), None, None)
        if state is not None:
            pick = (lambda t: jax.tree.map(lambda a: a[i], t)) if vmapped else (lambda t: t)
            r.trainable = pick(state["trainable"])
            r.stats = pick(state["stats"]) if self.per_job_stats else None
        return r

    def apply(self, model: Classifier, result: JobResult) -> Classifier:
        """A copy of `model` with a job's trained weights (and BN statistics) in place."""
        m = nnx.clone(model)
        nnx.update(m, result.trainable)
        if result.stats is not None:
            nnx.update(m, result.stats)
        return m
