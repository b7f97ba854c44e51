"""What the stack head reads besides the slice classifier: per-slice anatomy measured on the
anatomy network's mask probabilities (N, n, n, 4: background, RV cavity, LV myocardium, LV cavity)
at physical.SPACING_MM per pixel.

`evidence` gives every column of EVIDENCE, in that order; a model reads the columns its file lists
(`columns`): files written before `border_enclosed` list the first six. `border_enclosed` is the
basal rule of clinical practice in its direct form (the share of the cavity's border that
myocardium encloses); benchmarks/basal_rule.py measures the stack head with and without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stackcls.preprocess.physical import SPACING_MM

EVIDENCE = ("lv_cavity_area", "lv_myocardium_area", "rv_cavity_area", "lv_cavity_peak",
            "ring_closure", "cavity_inside_ring", "border_enclosed")
_SECTORS = 16


def evidence(mask_probs: jax.Array) -> jax.Array:
    """Per-slice anatomy read off the mask probabilities (N, n, n, 4) -> (N, len(EVIDENCE)).

    Areas are in cm^2 (log1p), so they mean the same whatever the input size. Ring closure: the
    share of 16 angular sectors around the cavity (or, without one, the LV) centre in which some
    myocardium is seen: a full ring marks a cut through the ventricle, a crescent the basal or
    apical edge. cavity_inside_ring: how much of the cavity lies within the ring's radius around
    the ring's own centre (the myocardium's centroid), low when the "cavity" is the outflow tract
    or an atrium opening beside the myocardium. Measured around the cavity-weighted centre instead,
    a ring beside the cavity only looks far away, and the whole cavity passes as inside it."""
    p = mask_probs
    n = p.shape[1]
    px_cm2 = (SPACING_MM / 10.0) ** 2
    area = jnp.sum(p, axis=(1, 2)) * px_cm2                            # (N, 4)
    cav, myo = p[..., 3], p[..., 2]
    peak = jnp.max(cav, axis=(1, 2))
    rr, cc = jnp.meshgrid(jnp.arange(n, dtype=jnp.float32), jnp.arange(n, dtype=jnp.float32),
                          indexing="ij")
    w = cav + 0.2 * myo + 1e-6
    wsum = jnp.sum(w, axis=(1, 2))
    r0 = jnp.sum(w * rr, axis=(1, 2)) / wsum
    c0 = jnp.sum(w * cc, axis=(1, 2)) / wsum
    dr, dc = rr[None] - r0[:, None, None], cc[None] - c0[:, None, None]
    dist = jnp.sqrt(dr ** 2 + dc ** 2) * SPACING_MM                     # mm
    near = dist < 50.0
    sector = jnp.floor((jnp.arctan2(dr, dc) + jnp.pi) / (2 * jnp.pi) * _SECTORS).astype(jnp.int32)
    sector = jnp.clip(sector, 0, _SECTORS - 1)
    onehot = jax.nn.one_hot(sector, _SECTORS)                           # (N, n, n, K)
    seen = jnp.max(onehot * (myo * near)[..., None], axis=(1, 2))       # (N, K)
    closure = jnp.mean(jnp.clip(seen * 2.0, 0.0, 1.0), axis=-1)
    wm = myo + 1e-6 * w                          # without myocardium: the centre above
    wmsum = jnp.sum(wm, axis=(1, 2))
    dr_m = rr[None] - (jnp.sum(wm * rr, axis=(1, 2)) / wmsum)[:, None, None]
    dc_m = cc[None] - (jnp.sum(wm * cc, axis=(1, 2)) / wmsum)[:, None, None]
    dist_m = jnp.sqrt(dr_m ** 2 + dc_m ** 2)
    ring_r = jnp.sum(myo * dist_m, axis=(1, 2)) / (jnp.sum(myo, axis=(1, 2)) + 1e-3)
    inside = jnp.sum(cav * (dist_m <= ring_r[:, None, None]), axis=(1, 2)) / (jnp.sum(cav, axis=(1, 2)) + 1e-3)
    return jnp.stack([jnp.log1p(area[:, 3]), jnp.log1p(area[:, 2]), jnp.log1p(area[:, 1]),
                      peak, closure, inside, border_enclosed(p)], axis=-1)


def columns(names) -> list[int]:
    """The positions in EVIDENCE of the columns a model file lists (its config's "evidence")."""
    unknown = [n for n in names if n not in EVIDENCE]
    if unknown:
        raise ValueError(f"model reads evidence {unknown} that this stackcls does not compute "
                         f"(it knows {list(EVIDENCE)}): the file needs a newer stackcls")
    return [EVIDENCE.index(n) for n in names]


def _pool3(x: jax.Array, op, init: float) -> jax.Array:
    """op over each pixel's 3 x 3 neighbourhood of (N, n, n); outside the image counts as init."""
    return jax.lax.reduce_window(x, init, op, (1, 3, 3), (1, 1, 1), "SAME")


def border_enclosed(mask_probs: jax.Array) -> jax.Array:
    """(N, n, n, 4) -> (N,): the share of the LV cavity's border with myocardium beside it.

    The basal rule: a slice is still inside the ventricle while myocardium encloses most of the
    cavity's circumference; at the base the cavity opens into the outflow tract or the atrium.
    Border: cavity pixels with a non-cavity pixel among their 8 neighbours (soft: cavity times one
    minus the neighbourhood's minimum); enclosed: the neighbourhood's maximum of myocardium. 0 where
    there is no cavity. Exact on hard masks (tests/test_anatomy.py checks it by brute force)."""
    cav, myo = mask_probs[..., 3], mask_probs[..., 2]
    inner = -_pool3(-cav, jax.lax.max, -jnp.inf)          # the neighbourhood's minimum
    border = cav * (1.0 - inner)
    near = _pool3(myo, jax.lax.max, 0.0)
    return jnp.sum(border * near, axis=(1, 2)) / jnp.maximum(jnp.sum(border, axis=(1, 2)), 1e-6)
