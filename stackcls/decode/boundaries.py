"""The exact probability of every IN range of a stack under the order constraint.

`decode.py` finds the best labelling OAP^a IN^(b-a) OBS^(L-b) of a stack (0 <= a <= b <= L, apex
first). Reading the per-slice log-scores s (S, 3) as independent per-slice evidence restricted to
ordered labellings, every boundary pair has the probability

    P(a, b) = exp(total(a, b) / T) / sum_{a' <= b'} exp(total(a', b') / T),
    total(a, b) = C0[a] + (C1[b] - C1[a]) + (C2[L] - C2[b]),   Ck[j] = sum_{i<j} s[i, k]

with T a temperature (1 = the scores as they are; `stackcls.train.calibration` fits it). A stack has
only (L+1)(L+2)/2 pairs (153 for 16 slices), so the whole table is computed at once in log space
(logsumexp over the pairs); no forward-backward recursion is needed. Its mode is the ordered
decoder's answer for every T > 0, and everything else is a sum over the table:

    first IN slice r     P(a = r, b > r)            last IN slice r   P(b = r + 1, a <= r)
    no IN slice          sum_a P(a, a)              (the labellings OAP^a OBS^(L-a))
    slice i is OAP       P(a > i)                   slice i is OBS    P(b <= i)

An IN range (first, last) is one pair (a, b) = (first, last + 1); "no IN range" gathers the L + 1
pairs with a = b. Batched over padded stacks like `decode_batch` (padding rows are ignored,
lengths pad to `decode.bucket`). Everything runs in float32: the table is built from differences
of prefix sums, and the logsumexp subtracts the maximum, so no exp overflows; probabilities are exact to
~1e-5 (float32 prefix sums of ~1e2 nats).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stackcls.decode.ordered import IN, bucket

# An end slice more likely IN than not: the stack may stop short of the heart on that side.
COVERAGE_THRESHOLD = 0.5
LEVELS = ("apical", "mid", "basal")        # AHA 17-segment short-axis levels, apex -> base


@jax.jit
def distribution_batch(log_probs: jax.Array, lengths: jax.Array, temperature=1.0) -> dict:
    """log_probs (B, S, 3) apex first, lengths (B,), temperature (scalar or (B,)) ->

    log_joint (B, S+1, S+1): log P(a, b), -inf where a > b or b > length;
    marginals (B, S, 3): per-slice class probabilities under the constraint (0 on padding);
    first (B, S), last (B, S): P(first / last IN slice = r) (0 on padding); none (B,): P(no IN).
    """
    B, S, _ = log_probs.shape
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    pos = jnp.arange(S)
    valid = pos[None, :] < lengths[:, None]
    s = jnp.where(valid[..., None], log_probs.astype(jnp.float32), 0.0) / t[:, None, None]
    C = jnp.concatenate([jnp.zeros((B, 1, 3), s.dtype), jnp.cumsum(s, axis=1)], axis=1)   # (B, S+1, 3)
    CL2 = jnp.take_along_axis(C[..., 2], lengths[:, None], axis=1)                          # (B, 1)
    g = C[..., 0] - C[..., 1]                                      # the part of total() set by a
    h = C[..., 1] - C[..., 2] + CL2                                # the part set by b
    j = jnp.arange(S + 1)
    allowed = (j[:, None] <= j[None, :])[None] & (j[None, None, :] <= lengths[:, None, None])
    total = jnp.where(allowed, g[:, :, None] + h[:, None, :], -jnp.inf)
    log_joint = total - jax.nn.logsumexp(total, axis=(1, 2), keepdims=True)
    joint = jnp.exp(log_joint)
    rows, cols = joint.sum(2), joint.sum(1)                        # P(a = j), P(b = j)
    diag = jnp.diagonal(joint, axis1=1, axis2=2)                   # P(a = b = j)
    # P(a > i) = sum_{j > i} rows[j];  P(b <= i) = sum_{j <= i} cols[j]
    p_oap = jnp.flip(jnp.cumsum(jnp.flip(rows, 1), 1), 1)[:, 1:]
    p_obs = jnp.cumsum(cols, 1)[:, :-1]
    p_in = jnp.clip(1.0 - p_oap - p_obs, 0.0, 1.0)
    marginals = jnp.where(valid[..., None], jnp.stack([p_oap, p_in, p_obs], -1), 0.0)
    first = jnp.where(valid, (rows - diag)[:, :-1], 0.0)
    last = jnp.where(valid, (cols - diag)[:, 1:], 0.0)
    return dict(log_joint=log_joint, marginals=marginals, first=first, last=last,
                none=diag.sum(1))


@dataclasses.dataclass
class BoundaryDistribution:
    """The distribution over IN ranges of one stack (slice ranks apex -> base)."""

    joint: np.ndarray          # (L+1, L+1) P(a, b); IN range (first, last) = pair (first, last+1)
    marginals: np.ndarray      # (L, 3) P(OAP / IN / OBS) per slice under the constraint
    first: np.ndarray          # (L,) P(first IN slice = r)
    last: np.ndarray           # (L,) P(last IN slice = r)
    none: float                # P(no IN slice)
    temperature: float = 1.0

    @property
    def n_slices(self) -> int:
        return len(self.first)

    def probability(self, rng: tuple[int, int] | None) -> float:
        """P(the IN range is exactly `rng`) ((first, last) ranks, or None: no IN slice)."""
        if rng is None:
            return float(self.none)
        a, last = int(rng[0]), int(rng[1])
        if not 0 <= a <= last < self.n_slices:
            raise ValueError(f"IN range {rng} is not a range of a {self.n_slices}-slice stack")
        return float(self.joint[a, last + 1])

    def ranges(self) -> list[tuple[tuple[int, int] | None, float]]:
        """Every IN range (None: no IN slice) with its probability, most probable first."""
        L = self.n_slices
        a, b = np.triu_indices(L + 1, k=1)
        out = [((int(x), int(y) - 1), float(self.joint[x, y])) for x, y in zip(a, b)]
        out.append((None, float(self.none)))
        return sorted(out, key=lambda kv: -kv[1])

    def mode(self) -> tuple[int, int]:
        """The most probable boundary pair (a, b): the ordered decoder's (first, stop)."""
        a, b = np.unravel_index(int(np.argmax(self.joint)), self.joint.shape)
        return int(a), int(b)

    def coverage(self, threshold: float = COVERAGE_THRESHOLD) -> dict:
        """Does the stack reach past the LV at both ends? An end slice that is probably IN means
        the stack may stop short of the apex (first slice) or the base (last slice)."""
        p_apex = float(self.marginals[0, IN]) if self.n_slices else 0.0
        p_base = float(self.marginals[-1, IN]) if self.n_slices else 0.0
        missing = [end for end, p in (("apex", p_apex), ("base", p_base)) if p > threshold]
        status = "complete" if not missing else " and ".join(missing) + " may be missing"
        return dict(status=status, apex_end_in=round(p_apex, 6), base_end_in=round(p_base, 6),
                    threshold=threshold)


def levels(rng: tuple[int, int] | None, n_slices: int) -> list[str | None]:
    """Short-axis level of each slice (ranks apex -> base): equal thirds of the IN range by slice
    centre (apical, mid, basal), None outside it. One IN slice is mid; two are apical and basal."""
    out: list[str | None] = [None] * n_slices
    if rng is None:
        return out
    a, last = rng
    n = last - a + 1
    for k in range(n):
        out[a + k] = LEVELS[min(2, int(3 * (k + 0.5) / n))]
    return out


def distributions(tables, temperature: float = 1.0) -> list[BoundaryDistribution]:
    """One `BoundaryDistribution` per log-score table (L_i, 3) (apex first), in one padded call."""
    tables = [np.asarray(t, np.float32) for t in tables]
    if not tables:
        return []
    for i, t in enumerate(tables):
        if t.ndim != 2 or t.shape[1] != 3:
            raise ValueError(f"boundary distribution: table {i} must be (S, 3), got {t.shape}")
    if not temperature > 0:
        raise ValueError(f"boundary distribution: temperature must be > 0, got {temperature}")
    lengths = np.array([len(t) for t in tables], np.int32)
    batch = np.zeros((len(tables), bucket(int(lengths.max())), 3), np.float32)
    for i, t in enumerate(tables):
        batch[i, :len(t)] = t
    out = {k: np.asarray(v, np.float64) for k, v in
           distribution_batch(jax.device_put(batch), jax.device_put(lengths), float(temperature)).items()}
    return [BoundaryDistribution(joint=np.exp(out["log_joint"][i, :L + 1, :L + 1]),
                                 marginals=out["marginals"][i, :L], first=out["first"][i, :L],
                                 last=out["last"][i, :L], none=float(out["none"][i]),
                                 temperature=float(temperature))
            for i, L in enumerate(lengths)]


def distribution(log_probs, temperature: float = 1.0) -> BoundaryDistribution:
    """The `BoundaryDistribution` of one stack's log-scores (S, 3), apex first."""
    return distributions([log_probs], temperature)[0]


def brute_force_ranges(log_probs, temperature: float = 1.0) -> dict:
    """Reference for tests: every ordered labelling enumerated in float64 ->
    {(a, b): probability}."""
    s = np.asarray(log_probs, np.float64) / temperature
    L = len(s)
    scores = {}
    for a in range(L + 1):
        for b in range(a, L + 1):
            lab = [0] * a + [1] * (b - a) + [2] * (L - b)
            scores[(a, b)] = s[np.arange(L), lab].sum()
    m = max(scores.values())
    z = sum(np.exp(v - m) for v in scores.values())
    return {k: float(np.exp(v - m) / z) for k, v in scores.items()}
