"""The stack-aware model: a bidirectional GRU over the per-slice features of a whole stack.

API (features come from the trained single-slice classifier):

    feats = slice_features(penultimate (S, 256), probs (S, 3))          # (S, 259) per stack
    model = train_stack_model(features    # stackcls.train.stack_head: list[(S_i, D)], labels: list[(S_i,) int 0/1/2],
                              subjects: list[str], *, seed=0, protocol=None) -> StackModel
    model.scores(features (S, D)) -> log-probs (S, 3) np.float32       (apex -> base as given)
    model.scores_many(list of (S_i, D)) -> list of (S_i, 3)            (one padded jitted call)
    probs, labels = model.predict_many(list of (S_i, D))                # per stack: (S_i, 3) probs and
                                                                        # ordered labels (S_i,) int
    model.info  # dict: selected lr/epochs, CV curves, timing (JSON-able)
    checkpoint.save_stack_model(path, model); checkpoint.load_stack_model(path) -> StackModel

Input features (`slice_features`): the classifier's penultimate activations (Dense 256 after ReLU)
concatenated with its log-probabilities (3), i.e. D = 259; standardised with the training mean and
std (stored in the model). Any (S, D) features work; D is recorded in the config.

Architecture: standardise -> Dense(hidden) ReLU -> dropout -> forward GRU and backward GRU
(each direction sees the stack only up to its true length; padding never reaches a valid slice)
-> concat -> dropout -> Dense 3. Order along the stack is imposed afterwards by
`stackcls.decode.ordered.ordered_decode`, which also gives the sequence score used to judge orientation.

Training (`StackHeadConfig` holds every default): AdamW, full batch of padded stacks per step (one
step = one epoch, `engine.sequence_trainer`), masked per-slice cross-entropy, each stack reversed
with probability 1/2 at every step (labels reversed with it) so that per-slice scores do not
depend on the direction and the ordered-decoding score can tell the directions apart. Protocol as
the single-slice classifier: patient-level k-fold CV (`stackcls.preprocess.arrays.patient_folds`) for each
learning rate, all folds x learning rates trained together (vmap); the (learning rate, epoch count)
with the best mean validation accuracy of the ordered decoding (ties: lower validation loss,
`stackcls.train.selection.select`) is chosen, then one model is trained on all stacks.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.decode.ordered import bucket, decode_many

FEATURES_VERSION = "penultimate+logprobs"
PROB_FLOOR = 1e-6          # probabilities are clipped here before the log (slice_features, predict)

SELECT = ("exact", "balanced_accuracy", "accuracy", "loss")
CLASS_WEIGHTS = ("balanced", "sqrt", "none")


@dataclasses.dataclass(frozen=True)
class StackHeadConfig:
    """The stack head's architecture and training protocol; the one source of its defaults."""

    hidden: int = 64                 # GRU width per direction
    dropout: float = 0.2
    epochs: int = 200                # maximum; the CV picks the count
    learning_rates: tuple[float, ...] = (1e-2, 3e-3)
    weight_decay: float = 1e-4
    folds: int = 5                   # 1: no CV (the first learning rate, every epoch)
    reverse_prob: float = 0.5        # random reversals during training
    feature_noise: float = 0.1       # Gaussian noise on standardised features while training
    residual: bool = True            # features end with the classifier's log-probs (slice_features):
                                     # learn a correction to them
    class_weight: str = "none"       # loss weight per class: "balanced" (1/frequency), "sqrt", "none"
    select: str = "accuracy"         # CV criterion: "accuracy" (of the ordered decoding), "exact"
                                     # (stacks labelled exactly), "balanced_accuracy", "loss"

    def __post_init__(self):
        object.__setattr__(self, "learning_rates", tuple(self.learning_rates))
        bad = [f"{name}={getattr(self, name)!r} ({want})" for name, ok, want in (
            ("hidden", self.hidden >= 1, ">= 1"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("learning_rates", len(self.learning_rates) > 0 and min(self.learning_rates) > 0,
             "at least one, all > 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("folds", self.folds >= 1, ">= 1"),
            ("reverse_prob", 0 <= self.reverse_prob <= 1, "in [0, 1]"),
            ("feature_noise", self.feature_noise >= 0, ">= 0"),
            ("class_weight", self.class_weight in CLASS_WEIGHTS, f"one of {CLASS_WEIGHTS}"),
            ("select", self.select in SELECT, f"one of {SELECT}")) if not ok]
        if bad:
            raise ValueError(f"StackHeadConfig: {'; '.join(bad)}")

    @classmethod
    def of(cls, protocol: "StackHeadConfig | Mapping | None") -> "StackHeadConfig":
        """The config itself, the defaults (None), or the defaults with a mapping's overrides."""
        if isinstance(protocol, cls):
            return protocol
        overrides = dict(protocol or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(overrides) - set(known)
        if unknown:
            raise ValueError(f"StackHeadConfig: unknown protocol keys {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        return cls(**overrides)


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
        lps = self.scores_many(features)
        return [np.exp(lp) for lp in lps], decode_many(lps)
