"""Training the stack head (stackcls.models.stack_head): patient-level CV over learning rates and
epochs, all folds x learning rates at once, then one model on every stack. The protocol is in the
stack head's module docstring; `StackHeadConfig` holds every default."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.models.stack_head import (FEATURES_VERSION, SELECT, Stat, StackHead, StackHeadConfig,
                                        StackModel, pad, reverse_within_length)
from stackcls.preprocess.arrays import patient_folds
from stackcls.train.selection import select
from stackcls.train.sequences import sequence_trainer


def class_weights(y: np.ndarray, how) -> jnp.ndarray:
    """Per-class loss weights (3,) from training label counts, mean weight over slices = 1.

    OAP and OBS are rare (ACDC: ~4 % and ~2 % of slices): unweighted, a head that calls every slice
    IN is a strong local optimum. "balanced" = 1/frequency (capped at 20x), "sqrt" its square root."""
    counts = np.bincount(y, minlength=3).astype(np.float64)
    if how in (None, "none"):
        w = np.ones(3)
    else:
        w = np.where(counts > 0, counts.sum() / (3 * np.maximum(counts, 1)), 1.0)
        w = np.minimum(w / w.min(), 20.0)
        if how == "sqrt":
            w = np.sqrt(w)
    w = w / (w[y].mean() if len(y) else 1.0)
    return jnp.asarray(w, jnp.float32)


def train_stack_model(features: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                      subjects: Sequence[str], *, seed: int = 0,
                      protocol: StackHeadConfig | Mapping | None = None,
                      verbose: bool = True) -> StackModel:
    """Train the stack head on stacks ordered apex -> base (CV for lr and epochs, then all data).

    features: per stack (S_i, D) (see `slice_features`); labels: per stack (S_i,) class indices
    0=OAP, 1=IN, 2=OBS; subjects: per stack subject id (folds never split a subject).
    protocol: a StackHeadConfig, or a mapping of overrides of its defaults.
    """
    p = StackHeadConfig.of(protocol)
    if not (len(features) == len(labels) == len(subjects)) or not features:
        raise ValueError(f"train_stack_model: need as many feature arrays, label arrays and subjects "
                         f"(>0), got {len(features)}, {len(labels)}, {len(subjects)}")
    feats = [np.asarray(f, np.float32) for f in features]
    labs = [np.asarray(l, np.int32) for l in labels]
    D = feats[0].shape[1]
    for i, (f, l) in enumerate(zip(feats, labs)):
        if f.ndim != 2 or f.shape[1] != D or l.shape != (len(f),):
            raise ValueError(f"train_stack_model: stack {i} ({subjects[i]}): features {f.shape} and labels "
                             f"{l.shape} do not match (want (S, {D}) and (S,))")
        if l.min() < 0 or l.max() > 2:
            raise ValueError(f"train_stack_model: stack {i} ({subjects[i]}): labels must be 0, 1, 2")
    if p.residual and D < 3:
        raise ValueError("train_stack_model: residual=True needs features ending with 3 log-probabilities")
    t0 = time.perf_counter()
    x, n = pad(feats)
    y, _ = pad(labs, fill=-1)
    allf = np.concatenate(feats)
    cw = class_weights(np.concatenate(labs), p.class_weight)
    head = StackHead(D, int(p.hidden), float(p.dropout), bool(p.residual), rngs=nnx.Rngs(seed))
    head.mean[...] = jnp.asarray(allf.mean(0))
    head.std[...] = jnp.asarray(allf.std(0) + 1e-3)
    graphdef, params, stats = nnx.split(head, nnx.Param, Stat)
    epochs, lrs = int(p.epochs), [float(v) for v in p.learning_rates]

    def trainer(n_epochs):
        return sequence_trainer(graphdef, n_epochs, weight_decay=p.weight_decay,
                                feature_noise=p.feature_noise, reverse_prob=p.reverse_prob,
                                reverse=reverse_within_length)

    train = trainer(epochs)
    key = jax.random.PRNGKey(seed)
    k = min(int(p.folds), len(set(subjects)))
    info = dict(protocol={k_: (list(v) if isinstance(v, tuple) else v)
                          for k_, v in dataclasses.asdict(p).items()},
                n_stacks=len(feats), n_slices=int(n.sum()), features=FEATURES_VERSION, in_features=D)
    if k >= 2:
        folds = patient_folds(list(subjects), k=k, seed=seed)
        B = len(feats)
        w_tr, w_va, lr_r = [], [], []
        for lr in lrs:
            for tr, va in folds:
                a = np.zeros(B, np.float32); a[tr] = 1; w_tr.append(a)
                b = np.zeros(B, np.float32); b[va] = 1; w_va.append(b)
                lr_r.append(lr)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(lr_r))
        R = len(lr_r)
        _, curves = train(params, stats, x, y, n, cw, jnp.asarray(np.stack(w_tr)),
                          jnp.asarray(np.stack(w_va)), jnp.asarray(lr_r, jnp.float32), keys,
                          jnp.full((R,), epochs, jnp.int32))
        # mean over folds: (n_lrs, epochs) per curve
        curves = {c: np.asarray(v).reshape(len(lrs), k, epochs).mean(1) for c, v in curves.items()}
        vl = curves["val_loss"]
        li, sel_epochs = select(-vl if p.select == "loss" else curves[p.select], vl, ties="lower_loss")
        sel_lr = lrs[li]
        info["cv"] = dict(folds=k, learning_rates=lrs, select=p.select,
                          **{f"val_{c}" if c in SELECT else c: v.round(5).tolist() for c, v in curves.items()},
                          best={c: float(v[li, sel_epochs - 1]) for c, v in curves.items()})
    else:
        sel_lr, sel_epochs = lrs[0], epochs
        R = 1
        info["cv"] = None
    info["selected"] = dict(learning_rate=sel_lr, epochs=sel_epochs)
    t1 = time.perf_counter()
    # the final run reuses the compiled CV trainer when that is cheap (same number of runs, steps past
    # sel_epochs idle; only run 0 matters, the others repeat it); with many runs a one-run trainer
    # (one more compile) costs less than repeating the run R times
    if R > 3:
        R, train = 1, trainer(sel_epochs)
    ones = jnp.ones((R, len(feats)), jnp.float32)
    fparams, fc = train(params, stats, x, y, n, cw, ones, ones, jnp.full((R,), sel_lr, jnp.float32),
                        jnp.stack([jax.random.fold_in(key, 2)] * R), jnp.full((R,), sel_epochs, jnp.int32))
    fparams = jax.tree.map(lambda a: a[0], fparams)
    nnx.update(head, fparams)
    info["class_weights"] = np.asarray(cw).round(4).tolist()
    info["final_train_loss"] = float(np.asarray(fc["train_loss"])[0, sel_epochs - 1])
    info["timing"] = dict(cv_seconds=round(t1 - t0, 3), final_seconds=round(time.perf_counter() - t1, 3))
    if verbose:
        print(f"stack head: {len(feats)} stacks, {k}-fold CV -> lr {sel_lr:g}, {sel_epochs} epochs "
              f"(cv {info['timing']['cv_seconds']:.1f}s, final {info['timing']['final_seconds']:.1f}s)")
    config = dict(in_features=D, hidden=int(p.hidden), dropout=float(p.dropout),
                  residual=bool(p.residual), features=FEATURES_VERSION)
    return StackModel(head, config, info)
