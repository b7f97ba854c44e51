"""Training: the paper's protocol as jitted JAX.

Three settings share one training loop; they differ only in what a training sample is:

    stage "features" (depth 0)  pooled backbone features of a fixed pool of V rotated views per
                                slice, extracted once; only the head trains (backbone frozen, BN in
                                inference mode).
    stage "carry"    (depth 1)  the activations entering the last block (`backbone.trunk` output)
                                for the same pool of views, cached once; `backbone.block_last` and
                                the head train. BatchNorm of the last block stays in inference mode
                                (moving statistics frozen, gamma/beta trained), as the current Keras
                                transfer-learning guide prescribes for fine-tuning; this is also the
                                semantics of every frozen layer here, so depth 0 and 1 agree.
    stage "image"    (CBR)      images; rotated on the fly inside the jitted step; the whole network
                                trains from scratch, BN in training mode (batch statistics, Keras
                                momentum 0.99 for the moving averages).

Optimiser: SGD, Nesterov momentum 0.9 (optax.trace), with Keras' legacy decay applied per step:
lr_t = lr / (1 + decay * t). Every batch holds `batch_size` samples: an epoch is one pass over the
oversampled training list in a fresh random order, and the last partial batch is filled up from the
start of that order (so BatchNorm never sees padding).

A sweep (folds x learning rates) runs as "jobs"; jobs of one group are vmapped together (padded to
the largest fold; a job whose epoch has fewer batches simply skips the extra steps), which is what
makes the head-only sweep of depth 0 one compiled call per epoch. Convolutional settings are vmapped
only on accelerators (XLA:CPU runs vmapped convolutions with per-job kernels as slow grouped
convolutions). Every job's randomness derives from (seed, job name), so grouping does not change
the draws.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from stackcls.progress import bar as tqdm

from stackcls.augment import random_rotation
from stackcls.models import Classifier, gap

STAGES = ("features", "carry", "image")


class SimulatedInterrupt(RuntimeError):
    """Raised by run_setting(fail_after_jobs=n): tests use it to interrupt a run and resume it."""


# ----------------------------------------------------------------------------- model splitting

def trainable_filter(stage: str):
    head = nnx.PathContains("head")
    if stage == "features":
        return nnx.All(nnx.Param, head)
    if stage == "carry":
        return nnx.All(nnx.Param, nnx.Any(head, nnx.PathContains("block_last")))
    if stage == "image":
        return nnx.Param
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def split(model: Classifier, stage: str):
    """(graphdef, trainable, frozen params, batch stats, rest) for a stage."""
    return nnx.split(model, trainable_filter(stage), nnx.Param, nnx.BatchStat, ...)


def _features(m: Classifier, stage: str, inputs, train: bool, key, rotate_deg: float):
    if stage == "features":
        return inputs
    if stage == "carry":
        return gap(m.backbone.last_block(inputs, train=False))
    if train and rotate_deg:
        inputs = random_rotation(key, inputs, rotate_deg)
    return m.features(inputs, train=train)


def job_key(seed: int, name: str) -> jax.Array:
    """A PRNG key from the run seed and a job's name (stable across processes and groupings)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- extraction

def extract(model: Classifier, x: np.ndarray, what: str, views: int = 0, seed: int = 0,
            max_degrees: float = 45.0, chunk: int = 32, desc: str = "extract"):
    """Run the frozen backbone once over `x` (N, H, W, 3) RGB 0..255.

    what: "features" (pooled last-block output, (N, D)) or "carry" (trunk output, a pytree).
    views: 0 = the images as they are; V > 0 = V randomly rotated views per image, stacked on
    axis 1 ((N, V, ...)); view v of image n uses a key derived from (seed, v, n // chunk).
    Returns device arrays.
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=3)
    def run(state, xb, key, rotate):
        m = nnx.merge(graphdef, state, copy=True)
        if rotate:
            xb = random_rotation(key, xb, max_degrees)
        carry = m.trunk(xb)
        return gap(m.backbone.last_block(carry)) if what == "features" else carry

    n = len(x)
    n_views = max(views, 1)
    base = jax.random.PRNGKey(seed)
    outs = []
    with tqdm(total=n * n_views, desc=desc, unit="img", leave=False) as bar:
        for v in range(n_views):
            parts = []
            for s in range(0, n, chunk):
                xb = np.asarray(x[s:s + chunk], np.float32)
                pad = chunk - len(xb)
                if pad:  # keep one compiled shape
                    xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
                key = jax.random.fold_in(jax.random.fold_in(base, v), s // chunk)
                out = run(state, jnp.asarray(xb), key, views > 0)
                parts.append(jax.tree.map(lambda a: a[:chunk - pad] if pad else a, out))
                bar.update(chunk - pad)
            outs.append(jax.tree.map(lambda *a: jnp.concatenate(a), *parts))
    if views == 0:
        return outs[0]
    return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outs)


def predict_outputs(model: Classifier, x, stage: str = "image", chunk: int = 64):
    """Inference on inputs of a stage -> (logits (N, 3), penultimate (N, 256)) as numpy."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xb):
        m = nnx.merge(graphdef, state, copy=True)
        pen = m.head.penultimate(_features(m, stage, xb, False, None, 0.0))
        return m.head.logits(pen), pen

    n = len(jax.tree.leaves(x)[0])
    logits, pens = [], []
    for s in range(0, n, chunk):
        xb = jax.tree.map(lambda a: jnp.asarray(a[s:s + chunk]), x)
        pad = chunk - len(jax.tree.leaves(xb)[0])
        if pad:
            xb = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]), xb)
        lo, pe = run(state, xb)
        logits.append(np.asarray(lo)[:chunk - pad])
        pens.append(np.asarray(pe)[:chunk - pad])
    return np.concatenate(logits), np.concatenate(pens)


# ----------------------------------------------------------------------------- the training loop

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
        self.views = jax.tree.map(jnp.asarray, pool.views)
        self.clean = jax.tree.map(jnp.asarray, pool.clean)
        self.y = jnp.asarray(pool.y, jnp.int32)
        self._compiled = {}

    # -- pure per-job epoch ---------------------------------------------------------------
    def _epoch_fn(self, n_batches: int, has_val: bool):
        graphdef, stage, B, C = self.graphdef, self.stage, self.B, self.C
        decay, tx, rot, per_job_stats = self.decay, self.tx, self.pool.rotate_deg, self.per_job_stats

        def loss_fn(trainable, frozen, stats, rest, inputs, labels, key):
            m = nnx.merge(graphdef, trainable, frozen, stats, rest, copy=True)
            kd, kr = jax.random.split(key)
            logits = m.head(_features(m, stage, inputs, True, kr, rot), kd)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.state(m, nnx.BatchStat)

        def predict(trainable, frozen, stats, rest, inputs):
            m = nnx.merge(graphdef, trainable, frozen, stats, rest, copy=True)
            pen = m.head.penultimate(_features(m, stage, inputs, False, None, 0.0))
            return m.head.logits(pen), pen

        def epoch(state, data, shared, key):
            V = jax.tree.leaves(shared["views"])[0].shape[1]
            seq, vsel, kstep = order_host(data, key, V)
            n = data["n_items"]
            job_batches = (n + B - 1) // B
            frozen, rest = shared["frozen"], shared["rest"]

            def body(carry, xs):
                trainable, opt, stats, step, loss_sum = carry
                b, idx, v = xs
                inputs = jax.tree.map(lambda a: a[idx, v], shared["views"])

                def do_step(args):
                    trainable, opt, stats, step = args
                    st = stats if per_job_stats else shared["stats"]
                    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                        trainable, frozen, st, rest, inputs, shared["y"][idx],
                        jax.random.fold_in(kstep, b))
                    updates, opt = tx.update(grads, opt, trainable)
                    lr = data["lr"] / (1.0 + decay * step.astype(jnp.float32))
                    trainable = jax.tree.map(lambda p, u: p - lr * u, trainable, updates)
                    return (trainable, opt, new_stats if per_job_stats else stats, step + 1), loss

                # Steps past this job's epoch are skipped with a select, so jobs of different lengths batch under vmap.
                ok = b < job_batches
                old = (trainable, opt, stats, step)
                new, loss = do_step(old)
                (trainable, opt, stats, step) = jax.tree.map(
                    lambda a, o: jnp.where(ok, a, o), new, old)
                loss = jnp.where(ok, loss, 0.0)
                return (trainable, opt, stats, step, loss_sum + loss), None

            carry0 = (state["trainable"], state["opt"], state["stats"], state["step"],
                      jnp.zeros((), jnp.float32))
            (tr, opt, stats, step, loss_sum), _ = jax.lax.scan(
                body, carry0, (jnp.arange(n_batches), seq, vsel))
            out = dict(train_loss=loss_sum / job_batches.astype(jnp.float32))
            if has_val:
                st = stats if per_job_stats else shared["stats"]
                vidx = data["val"].reshape(-1, C)
                logits, pen = jax.lax.map(
                    lambda ix: predict(tr, frozen, st, rest,
                                       jax.tree.map(lambda a: a[ix], shared["clean"])), vidx)
                logits = logits.reshape(-1, 3)
                pen = pen.reshape(-1, pen.shape[-1])
                yv = shared["y"][data["val"]]
                w = data["val_mask"].astype(jnp.float32)
                nv = jnp.maximum(w.sum(), 1.0)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, yv)
                out.update(val_loss=(ce * w).sum() / nv,
                           val_acc=((jnp.argmax(logits, -1) == yv) * w).sum() / nv,
                           val_probs=jax.nn.softmax(logits), val_pen=pen.astype(jnp.float16))
            new_state = dict(trainable=tr, opt=opt, stats=stats, step=step)
            return new_state, out

        def step_host(carry, b, idx, v, shared, lr, kstep):
            trainable, opt, stats, step = carry
            inputs = jax.tree.map(lambda a: a[idx, v], shared["views"])
            st = stats if per_job_stats else shared["stats"]
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, shared["frozen"], st, shared["rest"], inputs, shared["y"][idx],
                jax.random.fold_in(kstep, b))
            updates, opt = tx.update(grads, opt, trainable)
            lr_t = lr / (1.0 + decay * step.astype(jnp.float32))
            trainable = jax.tree.map(lambda p, u: p - lr_t * u, trainable, updates)
            return (trainable, opt, new_stats if per_job_stats else stats, step + 1), loss

        def order_host(data, key, V):
            """A fresh order of this job's samples (padding sorted last), wrapped to full batches,
            and a random cached view per sample."""
            kperm, kview, kstep = jax.random.split(key, 3)
            items, n = data["items"], data["n_items"]
            M = items.shape[0]
            r = jax.random.uniform(kperm, (M,)) + (jnp.arange(M) >= n).astype(jnp.float32) * 2.0
            order = items[jnp.argsort(r)]
            seq = order[jnp.arange(n_batches * B) % n].reshape(n_batches, B)
            return seq, jax.random.randint(kview, (n_batches, B), 0, V), kstep

        def predict_host(trainable, stats, shared, ix):
            st = stats if per_job_stats else shared["stats"]
            return predict(trainable, shared["frozen"], st, shared["rest"],
                           jax.tree.map(lambda a: a[ix], shared["clean"]))

        step_j = jax.jit(step_host, donate_argnums=(0,))
        order_j = jax.jit(order_host, static_argnums=2)
        pred_j = jax.jit(predict_host)

        def epoch_host(state, data, shared, key):
            """Same as `epoch`, driven from Python: one jitted call per batch."""
            V = jax.tree.leaves(shared["views"])[0].shape[1]
            seq, vsel, kstep = order_j(data, key, V)
            nb = int(-(-int(data["n_items"]) // B))
            carry = (state["trainable"], state["opt"], state["stats"], state["step"])
            losses = []
            for b in range(nb):
                carry, loss = step_j(carry, jnp.int32(b), seq[b], vsel[b], shared, data["lr"], kstep)
                losses.append(loss)
            tr, opt, stats, step = carry
            out = dict(train_loss=jnp.mean(jnp.stack(losses)))
            if has_val:
                vidx = np.asarray(data["val"]).reshape(-1, C)
                parts = [pred_j(tr, stats, shared, jnp.asarray(ix)) for ix in vidx]
                logits = jnp.concatenate([a for a, _ in parts])
                pen = jnp.concatenate([b_ for _, b_ in parts])
                yv = shared["y"][data["val"]]
                w = jnp.asarray(data["val_mask"]).astype(jnp.float32)
                nv = jnp.maximum(w.sum(), 1.0)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, yv)
                out.update(val_loss=(ce * w).sum() / nv,
                           val_acc=((jnp.argmax(logits, -1) == yv) * w).sum() / nv,
                           val_probs=jax.nn.softmax(logits), val_pen=pen.astype(jnp.float16))
            return dict(trainable=tr, opt=opt, stats=stats, step=step), out

        epoch.host = epoch_host
        return epoch

    def _compile(self, n_batches, has_val, vmapped):
        k = (n_batches, has_val, vmapped)
        if k not in self._compiled:
            f = self._epoch_fn(n_batches, has_val)
            if vmapped:
                self._compiled[k] = jax.jit(jax.vmap(f, in_axes=(0, 0, None, 0)), donate_argnums=(0,))
            elif self.stage != "features" and jax.default_backend() == "cpu":
                # XLA:CPU runs convolutions inside scan/while bodies far slower (~50x measured on
                # VGG16's block 5) than top-level ones: drive the batches from Python there
                self._compiled[k] = f.host
            else:
                self._compiled[k] = jax.jit(f, donate_argnums=(0,))
        return self._compiled[k]

    # -- host driver ---------------------------------------------------------------------
    def run(self, jobs: Sequence[Job], epochs: int, seed: int = 0, init: Sequence[nnx.State] | None = None,
            vmapped: bool = True, desc: str = "train", keep_state: bool = False,
            _shape: tuple | None = None) -> list[JobResult]:
        """Train `jobs` together for `epochs`; `init`: per-job trainable states (default: the
        model's). Returns one JobResult per job (with final states if keep_state)."""
        J = len(jobs)
        if J == 0:
            return []
        init = list(init) if init is not None else [self.init_trainable] * J
        C, B = self.C, self.B
        n_items = np.array([len(j.items) for j in jobs])
        if (n_items == 0).any():
            raise ValueError(f"{desc}: a job has no training samples")
        # one padded shape for all jobs: one compilation, whether vmapped or one after another
        M, K = _shape or (int(n_items.max()), max(len(j.val) for j in jobs))
        if not vmapped and J > 1:
            return [self.run([j], epochs, seed, [t], False, f"{desc} {i + 1}/{J}", keep_state,
                             (M, K))[0] for i, (j, t) in enumerate(zip(jobs, init))]
        vmapped = vmapped and J > 1
        has_val = K > 0
        Kp = int(math.ceil(K / C) * C) if has_val else C
        n_batches = int(math.ceil(M / B))
        data = []
        for j in jobs:
            items = np.zeros(M, np.int32)
            items[:len(j.items)] = j.items
            val = np.zeros(Kp, np.int32)
            val[:len(j.val)] = j.val
            mask = np.zeros(Kp, bool)
            mask[:len(j.val)] = True
            data.append(dict(items=items, n_items=np.int32(len(j.items)), val=val, val_mask=mask,
                             lr=np.float32(j.lr)))
        states = [dict(trainable=t, opt=self.tx.init(t),
                       stats=self.stats if self.per_job_stats else nnx.State({}),
                       step=jnp.zeros((), jnp.int32)) for t in init]
        keys = [job_key(seed, j.name) for j in jobs]
        shared = dict(views=self.views, clean=self.clean, y=self.y, frozen=self.frozen,
                      rest=self.rest, stats=self.stats if not self.per_job_stats else nnx.State({}))
        fn = self._compile(n_batches, has_val, vmapped)

        def stack(xs):
            return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *xs)

        if vmapped:
            state, dat = stack(states), stack(data)
        else:
            # copies: the state is donated, and must not take the model's own arrays with it
            state, dat = jax.tree.map(jnp.copy, states[0]), jax.tree.map(jnp.asarray, data[0])
        hist = {k: [] for k in ("train_loss", "val_loss", "val_acc", "val_probs", "val_pen")}
        with tqdm(range(epochs), desc=desc, unit="epoch", leave=False) as bar:
            for e in bar:
                ek = stack([jax.random.fold_in(k, e) for k in keys]) if vmapped else \
                    jax.random.fold_in(keys[0], e)
                state, out = fn(state, dat, shared, ek)
                out = jax.device_get(out)
                if not vmapped:
                    out = jax.tree.map(lambda a: np.asarray(a)[None], out)
                for k in hist:
                    if k in out:
                        hist[k].append(np.asarray(out[k]))
                post = dict(loss=f"{np.mean(out['train_loss']):.3f}")
                if has_val:
                    post["val_acc"] = f"{np.mean(out['val_acc']):.3f}"
                bar.set_postfix(post)
        results = []
        for i, j in enumerate(jobs):
            k = len(j.val)
            tl = np.array([h[i] for h in hist["train_loss"]], np.float32)
            if has_val:
                r = JobResult(tl, np.array([h[i] for h in hist["val_loss"]], np.float32),
                              np.array([h[i] for h in hist["val_acc"]], np.float32),
                              np.stack([h[i][:k] for h in hist["val_probs"]]).astype(np.float32),
                              np.stack([h[i][:k] for h in hist["val_pen"]]))
            else:
                nan = np.full(epochs, np.nan, np.float32)
                r = JobResult(tl, nan, nan.copy(), None, None)
            if keep_state:
                pick = (lambda t: jax.tree.map(lambda a: a[i], t)) if vmapped else (lambda t: t)
                r.trainable = pick(state["trainable"])
                r.stats = pick(state["stats"]) if self.per_job_stats else None
            results.append(r)
        return results

    def apply(self, model: Classifier, result: JobResult) -> Classifier:
        """A copy of `model` with a job's trained weights (and BN statistics) in place."""
        m = nnx.clone(model)
        nnx.update(m, result.trainable)
        if result.stats is not None:
            nnx.update(m, result.stats)
        return m


# ----------------------------------------------------------------------------- protocol pieces

def fold_jobs(prefix: str, lrs: Sequence[float], folds, y: np.ndarray, oversample_factor: int,
              seed: int) -> list[Job]:
    """Jobs of a CV sweep: every learning rate x every fold (indices into the pool)."""
    from stackcls.preprocess import oversample

    jobs = []
    for lr in lrs:
        for f, (tr, va) in enumerate(folds):
            items = tr[oversample(y[tr], factor=oversample_factor, seed=seed + f)]
            jobs.append(Job(f"{prefix}/lr{lr:g}/fold{f}", float(lr), items.astype(np.int32),
                            np.asarray(va, np.int32)))
    return jobs


def final_job(prefix: str, lr: float, y: np.ndarray, oversample_factor: int, seed: int) -> Job:
    from stackcls.preprocess import oversample

    items = oversample(y, factor=oversample_factor, seed=seed).astype(np.int32)
    return Job(f"{prefix}/final", float(lr), items, np.zeros(0, np.int32))


def select(curves: dict[float, np.ndarray], losses: dict[float, np.ndarray] | None = None,
           ) -> tuple[float, int]:
    """(learning rate, epochs) with the best mean validation accuracy curve.

    curves[lr]: (folds, E) validation accuracy per epoch. Ties (within 1e-9) go to fewer epochs,
    then to the lower mean validation loss, then to the first learning rate listed.
    """
    best = None
    for li, (lr, acc) in enumerate(curves.items()):
        mean = np.asarray(acc, np.float64).mean(axis=0)
        mloss = (np.asarray(losses[lr], np.float64).mean(axis=0) if losses is not None
                 else np.zeros_like(mean))
        for e, a in enumerate(mean):
            cand = (-round(float(a), 9), e, float(mloss[e]), li)
            if best is None or cand < best[0]:
                best = (cand, float(lr), e + 1)
    return best[1], best[2]


# ----------------------------------------------------------------------------- one setting, resumable

def _job_file(out_dir, job: Job):
    from pathlib import Path

    return Path(out_dir) / "cv" / (job.name.replace("/", "_") + ".npz")


def _save_job(path, job: Job, r: JobResult, seconds: float) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, train_loss=r.train_loss, val_loss=r.val_loss, val_acc=r.val_acc,
             val_probs=r.val_probs, val_pen=r.val_pen, val=job.val, lr=job.lr, seconds=seconds)
    os.replace(tmp, path)


def _load_job(path) -> tuple[JobResult, float]:
    z = np.load(path)
    return (JobResult(z["train_loss"], z["val_loss"], z["val_acc"], z["val_probs"], z["val_pen"]),
            float(z["seconds"]))


def run_setting(name: str, model: Classifier, pool: Pool, subjects: np.ndarray, *, lrs, epochs: int,
                folds: int = 5, oversample_factor: int = 6, seed: int = 0, out_dir=None,
                vmapped: bool = True, batch_size: int = 32, decay: float = 1e-6,
                fold_init: Callable[[int], nnx.State] | None = None, final_init=None,
                save_config: dict | None = None, fail_after_jobs: int | None = None) -> dict:
    """Cross-validate (folds x lrs), select (lr, epochs), train the final model; resumable.

    pool/subjects: every training-set slice (subjects (N,) gives the patient of each). Each CV job
    is saved to out_dir/cv as soon as its group finishes; the final model to out_dir/final. A rerun
    with the same arguments loads what is done and trains the rest. fold_init(f) / final_init:
    initial trainable states (depth 1 starts from depth-0 models). fail_after_jobs: raise after that
    many newly trained jobs (tests simulate an interrupted run with it).

    Returns dict(selected=dict(learning_rate, epochs), curves={lr: dict(train_loss, val_loss,
    val_acc) each (folds, E)}, model (final Classifier), oof_probs (N, 3), oof_pen (N, 256),
    folds, timing=dict(cv_seconds, final_seconds), trainer).
    """
    import time
    from pathlib import Path

    from stackcls.checkpoint import is_saved, restore_model, save_model
    from stackcls.preprocess import patient_folds

    out_dir = Path(out_dir)
    y = np.asarray(pool.y)
    fold_idx = patient_folds(subjects, k=folds, seed=seed)
    jobs = fold_jobs(name, lrs, fold_idx, y, oversample_factor, seed)
    fold_of = {j.name: i % folds for i, j in enumerate(jobs)}
    trainer = Trainer(model, pool, batch_size=batch_size, decay=decay)
    shape = (max(len(j.items) for j in jobs), max(len(j.val) for j in jobs))
    done: dict[str, tuple[JobResult, float]] = {}
    for j in jobs:
        f = _job_file(out_dir, j)
        if f.is_file():
            done[j.name] = _load_job(f)
    todo = [j for j in jobs if j.name not in done]
    # groups: one learning rate's folds together when vmapping, else one job at a time
    groups = ([[j for j in todo if j.lr == lr] for lr in lrs] if vmapped else [[j] for j in todo])
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
    curves = {}
    for lr in lrs:
        rs = [done[j.name][0] for j in jobs if j.lr == lr]
        curves[float(lr)] = {k: np.stack([getattr(r, k) for r in rs])
                             for k in ("train_loss", "val_loss", "val_acc")}
    sel_lr, sel_epochs = select({lr: c["val_acc"] for lr, c in curves.items()},
                                {lr: c["val_loss"] for lr, c in curves.items()})
    cv_seconds = float(sum(s for _, s in done.values()))
    # out-of-fold outputs of the selected (lr, epochs): every training slice predicted by the model
    # of the fold that did not see it (inputs for the stack head)
    N = len(y)
    oof_probs = np.full((N, 3), np.nan, np.float32)
    oof_pen = None
    for j in jobs:
        if j.lr != sel_lr:
            continue
        r = done[j.name][0]
        oof_probs[j.val] = r.val_probs[sel_epochs - 1]
        pen = r.val_pen[sel_epochs - 1].astype(np.float32)
        if oof_pen is None:
            oof_pen = np.full((N, pen.shape[-1]), np.nan, np.float32)
        oof_pen[j.val] = pen
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
                jobs=jobs, results={k: v[0] for k, v in done.items()},
                timing=dict(cv_seconds=cv_seconds, final_seconds=float(final_seconds)),
                trainer=trainer)
