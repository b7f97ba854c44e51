"""The stack-aware model: a bidirectional GRU over the per-slice features of a whole stack.

API (what `experiments.run` calls; features come from the trained single-slice classifier):

    feats = slice_features(penultimate (S, 256), probs (S, 3))          # (S, 259) per stack
    model = train_stack_model(features: list[(S_i, D)], labels: list[(S_i,) int 0/1/2],
                              subjects: list[str], *, seed=0, protocol=None) -> StackModel
    model.scores(features (S, D)) -> log-probs (S, 3) np.float32       (apex -> base as given)
    model.scores_many(list of (S_i, D)) -> list of (S_i, 3)            (one padded jitted call)
    probs, labels = model.predict_many(list of (S_i, D))                # per stack: (S_i, 3) probs and
                                                                        # ordered labels (S_i,) int
    # slice_ordered rows: stackcls.decode.decode_many([np.log(p) for p in per_stack_probs])
    model.info  # dict: selected lr/epochs, CV curves, timing (JSON-able)
    save_stack_model(path, model); load_stack_model(path) -> StackModel  (orbax + config.json)

Input features (`slice_features`): the classifier's penultimate activations (Dense 256 after ReLU)
concatenated with its log-probabilities (3), i.e. D = 259; standardised with the training mean and
std (stored in the model). Any (S, D) features work; D is recorded in the config.

Architecture: standardise -> Dense(hidden) ReLU -> dropout -> forward GRU and backward GRU
(each direction sees the stack only up to its true length; padding never reaches a valid slice)
-> concat -> dropout -> Dense 3. Order along the stack is imposed afterwards by
`stackcls.decode.ordered_decode`, which also gives the sequence score used to judge orientation.

Training: AdamW, full batch of padded stacks per step (one step = one epoch), masked per-slice
cross-entropy, each stack reversed with probability 1/2 at every step (labels reversed with it) so
that per-slice scores do not depend on the direction and the ordered-decoding score can tell the
directions apart. Protocol as the single-slice classifier: patient-level k-fold CV
(`stackcls.preprocess.patient_folds`) for each learning rate, all folds x learning rates trained
together (vmap); the (learning rate, epoch count) with the best mean validation accuracy of the
ordered decoding (ties: lower validation loss) is chosen, then one model is trained on all stacks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stackcls.decode import _decode_batch

FEATURES_VERSION = "penultimate+logprobs"
PROB_FLOOR = 1e-6          # probabilities are clipped here before the log (slice_features, predict)

DEFAULT_PROTOCOL = dict(
    hidden=64,              # GRU width per direction
    dropout=0.2,
    epochs=200,             # maximum; the CV picks the count
    learning_rates=(1e-2, 3e-3),
    weight_decay=1e-4,
    folds=5,
    reverse_prob=0.5,       # random reversals during training
    feature_noise=0.1,      # Gaussian noise on standardised features while training (regulariser)
    residual=True,          # features end with the classifier's log-probs (slice_features): learn a correction
    class_weight="none",    # loss weight per class: "balanced" (1/frequency), "sqrt" (its root), "none"
    select="accuracy",      # CV criterion: "accuracy" (of the ordered decoding), "exact" (stacks labelled
                            # exactly), "balanced_accuracy", "loss"; ties -> lower validation loss
)
SELECT = ("exact", "balanced_accuracy", "accuracy", "loss")
# For protocol=quick runs on a CPU: the same pipeline at a reduced scale.
QUICK_PROTOCOL = dict(hidden=32, epochs=100, folds=3, learning_rates=(1e-2,))


class Stat(nnx.Variable):
    """Non-trained state saved with the model (feature mean / std)."""


def slice_features(penultimate, probs) -> np.ndarray:
    """Per-slice input of the stack head: penultimate activations and log-probabilities, (S, D+3)."""
    pen = np.asarray(penultimate, np.float32)
    p = np.asarray(probs, np.float32)
    if pen.ndim != 2 or p.shape != (pen.shape[0], 3):
        raise ValueError(f"slice_features: want penultimate (S, D) and probs (S, 3), got {pen.shape} and {p.shape}")
    return np.concatenate([pen, np.log(np.clip(p, PROB_FLOOR, 1.0))], axis=1)


class StackHead(nnx.Module):
    def __init__(self, in_features: int, hidden: int = 64, dropout: float = 0.2, residual: bool = False,
                 *, rngs: nnx.Rngs):
        self.in_features, self.hidden, self.dropout = in_features, hidden, float(dropout)
        self.residual = bool(residual)
        self.mean = Stat(jnp.zeros((in_features,), jnp.float32))
        self.std = Stat(jnp.ones((in_features,), jnp.float32))
        self.proj = nnx.Linear(in_features, hidden, rngs=rngs)
        self.gru_fwd = nnx.GRUCell(hidden, hidden, rngs=rngs)
        self.gru_bwd = nnx.GRUCell(hidden, hidden, rngs=rngs)
        # residual: logits = the classifier's log-probs (last 3 input columns) + a learned correction
        # that starts at zero, so the untrained head is exactly the single-slice classifier
        self.out = nnx.Linear(2 * hidden, 3, rngs=rngs,
                              kernel_init=nnx.initializers.zeros if residual else nnx.initializers.lecun_normal())

    def _drop(self, x, key):
        if key is None or self.dropout <= 0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0.0)

    def _run(self, cell, xs):
        h0 = jnp.zeros((xs.shape[0], self.hidden), xs.dtype)
        _, ys = jax.lax.scan(lambda h, x: cell(h, x), h0, jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1)

    def __call__(self, x, lengths, key=None, noise: float = 0.0):
        """x (B, S, D) padded at the end, lengths (B,) -> logits (B, S, 3) (padding rows: garbage)."""
        S = x.shape[1]
        z = (x - self.mean[...]) / self.std[...]
        if key is not None:
            k_noise, k1, k2 = jax.random.split(key, 3)
            z = z + noise * jax.random.normal(k_noise, z.shape)
        else:
            k1 = k2 = None
        h = self._drop(jax.nn.relu(self.proj(z)), k1)
        fwd = self._run(self.gru_fwd, h)                       # padding sits after every valid step
        rev = reverse_within_length(h, lengths)                # so the backward pass starts at L-1
        bwd = reverse_within_length(self._run(self.gru_bwd, rev), lengths)
        both = self._drop(jnp.concatenate([fwd, bwd], axis=-1), k2)
        out = self.out(both)
        return out + x[..., -3:] if self.residual else out


def reverse_within_length(x, lengths):
    """Reverse each padded sequence x (B, S, ...) over its first lengths[b] steps; padding stays."""
    S = x.shape[1]
    i = jnp.arange(S)[None, :]
    idx = jnp.where(i < lengths[:, None], lengths[:, None] - 1 - i, i)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def pad(seqs: Sequence[np.ndarray], length: int | None = None, fill=0.0):
    """Stack variable-length arrays (S_i, ...) into (B, S_max, ...) plus lengths (B,)."""
    lengths = np.array([len(s) for s in seqs], np.int32)
    S = int(length or lengths.max())
    first = np.asarray(seqs[0])
    out = np.full((len(seqs), S) + first.shape[1:], fill, dtype=first.dtype)
    for b, s in enumerate(seqs):
        out[b, :len(s)] = s
    return out, lengths


def bucket(S: int) -> int:
    """Padded length for S slices (multiples of 16), so stacks of 8-16 slices share one compile."""
    return max(16, -(-S // 16) * 16)


class StackModel:
    """A trained stack head plus its config and training record."""

    def __init__(self, head: StackHead, config: dict, info: dict | None = None):
        self.head, self.config, self.info = head, dict(config), dict(info or {})
        self._graphdef, self._state = nnx.split(head)
        gd = self._graphdef
        self._log_probs = jax.jit(lambda state, x, n: jax.nn.log_softmax(nnx.merge(gd, state)(x, n), -1))

    def log_probs_padded(self, x, lengths):
        """(B, S, D), (B,) -> (B, S, 3) log-probs; traceable, so it composes into a larger jit."""
        return self._log_probs(self._state, x, lengths)

    def scores(self, features) -> np.ndarray:
        """Per-slice log-probabilities (S, 3) of one stack, slices in the order given."""
        f = np.asarray(features, np.float32)
        if f.ndim != 2 or f.shape[1] != self.head.in_features:
            raise ValueError(f"stack head wants features (S, {self.head.in_features}), got {f.shape}")
        x, n = pad([f], bucket(len(f)))
        return np.asarray(self.log_probs_padded(x, n)[0, :len(f)])

    def scores_many(self, features: Sequence[np.ndarray]) -> list[np.ndarray]:
        feats = [np.asarray(f, np.float32) for f in features]
        x, n = pad(feats, bucket(max(len(f) for f in feats)))
        lp = np.asarray(self.log_probs_padded(x, n))
        return [lp[b, :n[b]] for b in range(len(n))]

    def predict_many(self, features: Sequence[np.ndarray]):
        """(probabilities list of (S_i, 3), ordered labels list of (S_i,) int32), apex -> base as given."""
        from stackcls.decode import decode_many
        lps = self.scores_many(features)
        return [np.exp(lp) for lp in lps], decode_many(lps)


def _patient_folds(subjects, k, seed):
    try:
        from stackcls.preprocess import patient_folds
        return patient_folds(list(subjects), k=k, seed=seed)
    except (ImportError, AttributeError):
        # until stackcls.preprocess lands: the same contract, subjects shuffled into k groups
        uniq = np.array(sorted(set(subjects)))
        np.random.default_rng(seed).shuffle(uniq)
        groups = np.array_split(uniq, k)
        subj = np.asarray(subjects)
        return [(np.flatnonzero(~np.isin(subj, g)), np.flatnonzero(np.isin(subj, g))) for g in groups]


def _make_trainer(graphdef, epochs: int, p: dict):
    """A jitted function training len(lrs) runs at once (vmap over runs), returning curves and params."""
    rev_p, noise, wd = float(p["reverse_prob"]), float(p["feature_noise"]), float(p["weight_decay"])

    def one_run(params, stats, x, y, n, cw, w_train, w_val, lr, key, stop):
        opt = optax.adamw(lr, weight_decay=wd)
        valid = jnp.arange(x.shape[1])[None, :] < n[:, None]

        def loss_fn(params, x, y, w, key):
            logits = nnx.merge(graphdef, params, stats)(x, n, key=key, noise=noise)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
            m = valid * w[:, None] * cw[jnp.maximum(y, 0)]
            return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

        def step(carry, inp):
            params, opt_state = carry
            key, t = inp
            k_rev, k_fwd = jax.random.split(key)
            flip = jax.random.bernoulli(k_rev, rev_p, (x.shape[0],))
            xr = jnp.where(flip[:, None, None], reverse_within_length(x, n), x)
            yr = jnp.where(flip[:, None], reverse_within_length(y, n), y)
            loss, g = jax.value_and_grad(loss_fn)(params, xr, yr, w_train, k_fwd)
            upd, opt_state = opt.update(g, opt_state, params)
            # steps after `stop` leave the parameters alone: one compiled trainer serves every
            # epoch count (the CV runs and the final run share it)
            upd = jax.tree.map(lambda u: u * (t < stop), upd)
            params = optax.apply_updates(params, upd)
            # validation (stated direction, no dropout) of the ordered decoding
            logits = nnx.merge(graphdef, params, stats)(x, n)
            lp = jax.nn.log_softmax(logits, -1)
            ce = -jnp.take_along_axis(lp, jnp.maximum(y, 0)[..., None], -1)[..., 0]
            m = valid * w_val[:, None]
            denom = jnp.maximum(jnp.sum(m), 1.0)
            dec = _decode_batch(lp, n)[0]
            hit = (dec == y) * m
            n_c = jnp.stack([jnp.sum(m * (y == c)) for c in range(3)])
            rec = jnp.stack([jnp.sum(hit * (y == c)) for c in range(3)]) / jnp.maximum(n_c, 1.0)
            present = n_c > 0
            stack_ok = jnp.all((dec == y) | ~valid, axis=1)
            curves = dict(train_loss=loss, val_loss=jnp.sum(ce * m) / denom, accuracy=jnp.sum(hit) / denom,
                          balanced_accuracy=jnp.sum(rec * present) / jnp.maximum(jnp.sum(present), 1),
                          exact=jnp.sum(stack_ok * w_val) / jnp.maximum(jnp.sum(w_val), 1.0))
            return (params, opt_state), curves

        keys = jax.random.split(key, epochs)
        (params, _), curves = jax.lax.scan(step, (params, opt.init(params)), (keys, jnp.arange(epochs)))
        return params, curves

    runs = jax.vmap(one_run, in_axes=(None, None, None, None, None, None, 0, 0, 0, 0, 0))
    return jax.jit(runs)


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
                      subjects: Sequence[str], *, seed: int = 0, protocol: dict | None = None,
                      verbose: bool = True) -> StackModel:
    """Train the stack head on stacks ordered apex -> base (CV for lr and epochs, then all data).

    features: per stack (S_i, D) (see `slice_features`); labels: per stack (S_i,) class indices
    0=OAP, 1=IN, 2=OBS; subjects: per stack subject id (folds never split a subject).
    protocol: overrides of DEFAULT_PROTOCOL (hidden, dropout, epochs, learning_rates, weight_decay,
    folds, reverse_prob, feature_noise).
    """
    p = {**DEFAULT_PROTOCOL, **(protocol or {})}
    unknown = set(p) - set(DEFAULT_PROTOCOL)
    if unknown:
        raise ValueError(f"train_stack_model: unknown protocol keys {sorted(unknown)}; known: {sorted(DEFAULT_PROTOCOL)}")
    if p["select"] not in SELECT:
        raise ValueError(f"train_stack_model: select={p['select']!r}, want one of {SELECT}")
    if p["class_weight"] not in ("balanced", "sqrt", "none", None):
        raise ValueError(f"train_stack_model: class_weight={p['class_weight']!r}, want 'balanced', 'sqrt' or 'none'")
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
    t0 = time.perf_counter()
    x, n = pad(feats)
    y, _ = pad(labs, fill=-1)
    allf = np.concatenate(feats)
    cw = class_weights(np.concatenate(labs), p["class_weight"])
    if p["residual"] and D < 3:
        raise ValueError("train_stack_model: residual=True needs features ending with 3 log-probabilities")
    head = StackHead(D, int(p["hidden"]), float(p["dropout"]), bool(p["residual"]), rngs=nnx.Rngs(seed))
    head.mean[...] = jnp.asarray(allf.mean(0))
    head.std[...] = jnp.asarray(allf.std(0) + 1e-3)
    graphdef, params, stats = nnx.split(head, nnx.Param, Stat)
    epochs, lrs = int(p["epochs"]), [float(v) for v in p["learning_rates"]]
    train = _make_trainer(graphdef, epochs, p)
    key = jax.random.PRNGKey(seed)

    k = min(int(p["folds"]), len(set(subjects)))
    info = dict(protocol={k_: (list(v) if isinstance(v, tuple) else v) for k_, v in p.items()},
                n_stacks=len(feats), n_slices=int(n.sum()), features=FEATURES_VERSION, in_features=D)
    if k >= 2:
        folds = _patient_folds(list(subjects), k, seed)
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
        score = -vl if p["select"] == "loss" else curves[p["select"]]
        # best mean validation score; among ties (within 1e-9) the lower validation loss
        cand = np.argwhere(score >= score.max() - 1e-9)
        li, ei = min(cand, key=lambda c: vl[c[0], c[1]])
        sel_lr, sel_epochs = lrs[int(li)], int(ei) + 1
        info["cv"] = dict(folds=k, learning_rates=lrs, select=p["select"],
                          **{f"val_{c}" if c in SELECT else c: v.round(5).tolist() for c, v in curves.items()},
                          best={c: float(v[li, ei]) for c, v in curves.items()})
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
        R, train = 1, _make_trainer(graphdef, sel_epochs, p)
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
    config = dict(in_features=D, hidden=int(p["hidden"]), dropout=float(p["dropout"]),
                  residual=bool(p["residual"]), features=FEATURES_VERSION)
    return StackModel(head, config, info)


def save_stack_model(path, model: StackModel) -> Path:
    """Write `path/config.json` (architecture, training record) and `path/state` (orbax)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model.head)
    ckpt = ocp.StandardCheckpointer()
    target = path / "state"
    if target.exists():
        import shutil
        shutil.rmtree(target)
    ckpt.save(target, state)
    ckpt.wait_until_finished()
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(dict(config=model.config, info=model.info), indent=1))
    tmp.replace(path / "config.json")
    return path


def load_stack_model(path) -> StackModel:
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    cfg_file = path / "config.json"
    if not cfg_file.exists() or not (path / "state").exists():
        raise FileNotFoundError(f"{path}: not a saved stack model (needs config.json and state/)")
    blob = json.loads(cfg_file.read_text())
    c = blob["config"]
    abstract = nnx.eval_shape(lambda: StackHead(c["in_features"], c["hidden"], c["dropout"],
                                                c.get("residual", False), rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    state = ocp.StandardCheckpointer().restore(path / "state", abs_state)
    return StackModel(nnx.merge(graphdef, state), c, blob.get("info"))


def synthetic_feature_stacks(n_stacks: int, dim: int = 8, noise: float = 1.2, seed: int = 0):
    """Ordered feature sequences for tests and demos: (features, labels, subjects).

    Each stack has 8-16 slices, 1-3 OAP and 1-3 OBS; a slice's features are its class mean (fixed
    random vectors) plus Gaussian noise, so single slices are ambiguous but neighbours help.
    """
    rng = np.random.default_rng(seed)
    mu = np.random.default_rng(1234).normal(size=(3, dim))
    feats, labels, subjects = [], [], []
    for i in range(n_stacks):
        S = int(rng.integers(8, 17))
        a, c = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        y = np.array([0] * a + [1] * (S - a - c) + [2] * c, np.int32)
        feats.append((mu[y] + noise * rng.normal(size=(S, dim))).astype(np.float32))
        labels.append(y)
        subjects.append(f"syn{seed}_{i // 2}")          # two stacks (ED, ES) per subject
    return feats, labels, subjects
