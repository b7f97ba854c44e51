"""Ordered decoding: the best labelling OAP^a IN^b OBS^c of a stack, exactly.

Along apex -> base the labels of a stack run OAP...OAP, IN...IN, OBS...OBS (any run may be empty),
so a labelling is a choice of two boundaries 0 <= a <= b <= L: slices [0, a) are OAP, [a, b) IN,
[b, L) OBS. Given per-slice log-scores s (S, 3) (log-probabilities of any per-slice model), the
labelling maximising sum_i s[i, label_i] is found in O(S) with prefix sums:

    total(a, b) = C0[a] + (C1[b] - C1[a]) + (C2[L] - C2[b]),   Ck[j] = sum_{i<j} s[i, k]
    best        = C2[L] + max_b ( C1[b] - C2[b] + max_{a<=b} (C0[a] - C1[a]) )

(a running maximum over a, then a maximum over b). Exact, no learned transitions: the per-slice
scores come from a bidirectional recurrent head that already sees the neighbours, so a CRF's
transition scores would add parameters and a second training objective for what is, after the
constraint, only two numbers (the boundaries). The same decoder runs on top of the single-slice
classifier (`slice_ordered`) and gives the sequence score used to decide orientation.

Batched over padded stacks: `log_probs` (B, S, 3) with `lengths` (B,); padded slices never change
the result (their scores are ignored and their labels are -1). Padded lengths come from `bucket`,
so stacks of similar length share one compiled decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stackcls.stack import CLASS_INDEX

NEG = -1e30
IN = CLASS_INDEX["IN"]


def bucket(S: int) -> int:
    """Padded length for S slices (multiples of 16, at least 16), so stacks of 8-16 slices share
    one compile."""
    return max(16, -(-S // 16) * 16)


@jax.jit
def decode_batch(log_probs: jax.Array, lengths: jax.Array):
    """log_probs (B, S, 3), lengths (B,) -> (labels (B, S) int32 with -1 padding, a (B,), b (B,), score (B,))."""
    B, S, _ = log_probs.shape
    pos = jnp.arange(S)
    valid = pos[None, :] < lengths[:, None]                          # (B, S)
    s = jnp.where(valid[..., None], log_probs.astype(jnp.float32), 0.0)
    # C[:, j, k] = sum_{i<j} s[:, i, k], j = 0..S
    C = jnp.concatenate([jnp.zeros((B, 1, 3), s.dtype), jnp.cumsum(s, axis=1)], axis=1)  # (B, S+1, 3)
    j = jnp.arange(S + 1)
    allowed = j[None, :] <= lengths[:, None]                        # boundaries must lie in [0, L]
    g = jnp.where(allowed, C[..., 0] - C[..., 1], NEG)              # value of choosing a = j
    run_max = jax.lax.cummax(g, axis=1)                              # max_{a<=b} g[a]
    # which a attains run_max[j]: the latest index <= j where g set a new running maximum
    is_new = g >= run_max
    arg_a = jax.lax.cummax(jnp.where(is_new, j[None, :], 0), axis=1)
    h = jnp.where(allowed, C[..., 1] - C[..., 2] + run_max, NEG)   # value of choosing b = j
    b = jnp.argmax(h, axis=1)
    a = jnp.take_along_axis(arg_a, b[:, None], axis=1)[:, 0]
    CL2 = jnp.take_along_axis(C[..., 2], lengths[:, None], axis=1)[:, 0]
    score = jnp.max(h, axis=1) + CL2
    labels = jnp.where(pos[None, :] < a[:, None], 0, jnp.where(pos[None, :] < b[:, None], 1, 2))
    labels = jnp.where(valid, labels, -1).astype(jnp.int32)
    return labels, a.astype(jnp.int32), b.astype(jnp.int32), score


def ordered_decode(log_probs, lengths=None):
    """Best ordered labelling (apex -> base) of one stack or a padded batch.

    log_probs: (S, 3) or (B, S, 3) per-slice log-scores, columns OAP, IN, OBS, apex first.
    lengths: (B,) valid lengths for a batch (default: all S).
    Returns dict(labels (S,)|(B, S) int32 (-1 on padding), first (.)|(B,) first IN index,
    stop (.)|(B,) one past the last IN index (first == stop: no IN slice), score (.)|(B,) the
    summed log-score of the labelling). Arrays are jax arrays (jit-friendly); see `in_range`.
    """
    lp = jnp.asarray(log_probs)
    single = lp.ndim == 2
    if single:
        lp = lp[None]
    if lp.ndim != 3 or lp.shape[-1] != 3:
        raise ValueError(f"ordered_decode: log_probs must be (S, 3) or (B, S, 3), got {tuple(lp.shape)}")
    if lengths is None:
        lengths = jnp.full((lp.shape[0],), lp.shape[1], jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    labels, a, b, score = decode_batch(lp, lengths)
    out = dict(labels=labels, first=a, stop=b, score=score)
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def best_score(log_probs, lengths=None):
    """Score of the best ordered labelling (used to compare the two directions of a stack)."""
    return ordered_decode(log_probs, lengths)["score"]


def in_range(labels) -> tuple[int, int] | None:
    """(first, last) indices of the IN slices of a label sequence (class indices or names), or None.

    For an ordered labelling this is the IN run; for an unordered one (mode="slice") it spans the
    first to the last IN slice.
    """
    idx = [i for i, label in enumerate(np.asarray(labels).tolist()) if label == IN or label == "IN"]
    return (idx[0], idx[-1]) if idx else None


def brute_force_decode(log_probs: np.ndarray) -> tuple[np.ndarray, float]:
    """Reference: try every boundary pair (O(S^3)); for tests."""
    s = np.asarray(log_probs, dtype=np.float64)
    L = s.shape[0]
    best, arg = -np.inf, None
    for a in range(L + 1):
        for b in range(a, L + 1):
            lab = np.array([0] * a + [1] * (b - a) + [2] * (L - b), dtype=np.int32)
            tot = s[np.arange(L), lab].sum()
            if tot > best:
                best, arg = tot, lab
    return arg, float(best)


def decode_many(log_probs_list) -> list[np.ndarray]:
    """Ordered labels (S_i,) int32 for a list of per-stack log-score tables (S_i, 3): one padded call."""
    if not len(log_probs_list):
        return []
    lengths = np.array([len(t) for t in log_probs_list], np.int32)
    batch = np.zeros((len(lengths), bucket(int(lengths.max())), 3), np.float32)
    for b, t in enumerate(log_probs_list):
        batch[b, :lengths[b]] = t
    labels = np.asarray(decode_batch(jnp.asarray(batch), jnp.asarray(lengths))[0])
    return [labels[b, :lengths[b]] for b in range(len(lengths))]
