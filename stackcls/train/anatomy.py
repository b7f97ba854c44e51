"""Training method=anatomy's network (stackcls.models.anatomy): each slice's crop of its larger
canvas (stackcls.preprocess.physical) with a random rotation, scale, flip, shift and gamma inside
the jitted step; masked segmentation plus slice-label losses; AdamW with a cosine schedule; the
whole encoder trains, its BatchNorm in training mode, then precise BatchNorm statistics."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stackcls.models.anatomy import N_MASK, AnatomyConfig, AnatomyNet, _rgb, centre_crop
from stackcls.preprocess.physical import SPACING_MM
from stackcls.progress import bar as tqdm

_STEPS: dict = {}    # compiled training steps, by graph and config
_BN: dict = {}       # compiled BatchNorm passes, by graph


def _warp(img, coords):
    """Bilinear sample of img (H, W, k) at coords (2, h, w) -> (h, w, k); outside the image: 0
    (blended in at the edges, as scipy.ndimage.map_coordinates order=1, mode="grid-constant")."""
    H, W = img.shape[:2]
    r, c = coords
    r0, c0 = jnp.floor(r), jnp.floor(c)
    fr, fc = (r - r0)[..., None], (c - c0)[..., None]

    def at(ri, ci):
        ok = (ri >= 0) & (ri < H) & (ci >= 0) & (ci < W)
        v = img[jnp.clip(ri, 0, H - 1).astype(jnp.int32), jnp.clip(ci, 0, W - 1).astype(jnp.int32)]
        return v * ok[..., None]

    return ((at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc) * (1 - fr)
            + (at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc) * fr)



def augment(key, canvas, onehot, cfg: AnatomyConfig):
    """One training sample: a `cfg.size` crop of a canvas (C, C, 3) (or grey (C, C)) and its
    one-hot mask (C, C, 4), randomly rotated, scaled, flipped and shifted (the same map for both),
    gamma-adjusted, and the neighbour channels swapped half of the time."""
    ka, ks, kf, kt, kg = jax.random.split(key, 5)
    if canvas.ndim == 2:
        canvas = jnp.repeat(canvas[..., None], 3, -1)
    C, n = canvas.shape[0], cfg.size
    t = jnp.deg2rad(jax.random.uniform(ka, (), minval=-cfg.rotation, maxval=cfg.rotation))
    s = jnp.exp(jax.random.uniform(ks, (), minval=-cfg.scale, maxval=cfg.scale))
    flip = jnp.where(jax.random.bernoulli(kf), -1.0, 1.0)
    shift = jax.random.uniform(kt, (2,), minval=-1, maxval=1) * cfg.shift_mm / SPACING_MM
    o = jnp.arange(n, dtype=jnp.float32) - (n - 1) / 2.0
    r, c = jnp.meshgrid(o, o * flip, indexing="ij")
    src_r = s * (jnp.cos(t) * r - jnp.sin(t) * c) + (C - 1) / 2.0 + shift[0]
    src_c = s * (jnp.sin(t) * r + jnp.cos(t) * c) + (C - 1) / 2.0 + shift[1]
    both = jnp.concatenate([canvas, onehot], -1)
    out = _warp(both, (src_r, src_c))
    x = out[..., :3] / 255.0
    gamma = jnp.exp(jax.random.uniform(kg, (), minval=-0.35, maxval=0.35))
    x = jnp.clip(x, 0, 1) ** gamma * 255.0
    # a key of its own, so the other draws stay those of single-slice training
    x = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 7)), x[..., ::-1], x)
    target = out[..., 3:]
    # pixels the warp took from outside the canvas are background
    target = target.at[..., 0].add(1.0 - jnp.sum(target, -1))
    return x, target



def _class_weights(y: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return np.ones(3, np.float32)
    n = np.bincount(y, minlength=3).astype(np.float64)
    w = np.where(n > 0, len(y) / (3.0 * np.maximum(n, 1)), 0.0)
    if how == "sqrt":      # rare classes up-weighted, but not 25-50x: that made the head collapse
        w = np.sqrt(w)
    return (w / w[np.bincount(y, minlength=3).argmax()]).astype(np.float32)



def _losses(net, x, target, has_mask, y, cw, key):
    seg, logits, _ = net(x, key, train=True)
    logp = jax.nn.log_softmax(seg, -1)
    ce = -jnp.sum(target * logp, -1).mean(axis=(1, 2))
    p = jnp.exp(logp)
    inter = jnp.sum(p * target, axis=(1, 2))[:, 1:]
    denom = jnp.sum(p + target, axis=(1, 2))[:, 1:]
    dice = 1.0 - jnp.sum(2 * inter + 1.0, 0) / jnp.sum(denom + 1.0, 0)   # batch soft Dice
    m = has_mask.astype(jnp.float32)
    nm = jnp.maximum(m.sum(), 1.0)
    seg_loss = jnp.sum(ce * m) / nm + jnp.mean(dice) * (m.sum() > 0)
    w = cw[y]
    cls = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * w) / jnp.sum(w)
    return seg_loss, cls



def _step_fn(graphdef, cfg: AnatomyConfig):
    """The jitted training step of one architecture and config, compiled once and shared by every
    fold and the final model (the data and the learning rate are arguments, not constants)."""
    key = (graphdef, cfg)
    if key in _STEPS:
        return _STEPS[key]
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.learning_rate,
                                               weight_decay=cfg.weight_decay)

    @jax.jit
    def step(params, stats, rest, opt_state, canvas, onehot, has_mask, y, cw, lr, key):
        ka, kd = jax.random.split(key)
        keys = jax.random.split(ka, canvas.shape[0])
        x, t = jax.vmap(lambda k, c, o: augment(k, c, o, cfg))(keys, canvas, onehot)

        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats, rest, copy=True)
            seg, cls = _losses(m, x, t, has_mask, y, cw, kd)
            return cfg.mask_weight * seg + cls, (seg, cls, nnx.state(m, nnx.BatchStat))

        (loss, (seg, cls, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state,
                jnp.stack([loss, seg, cls]))

    _STEPS[key] = (tx, step)
    return tx, step



def end_slices(stack_index: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: the slice is among the first or last k of its stack (stack_index: the stack of
    each slice, the slices of a stack consecutive and in order)."""
    si = np.asarray(stack_index)
    start = np.r_[True, si[1:] != si[:-1]]
    first = np.flatnonzero(start)
    n = np.diff(np.r_[first, len(si)])
    pos = np.arange(len(si)) - np.repeat(first, n)
    return (pos < k) | (pos >= np.repeat(n, n) - k)



def _epoch_order(rng, N: int, size: int, weight: np.ndarray | None) -> np.ndarray:
    """`size` training indices for one epoch: a permutation (repeated as needed), or with
    per-slice weights a draw without replacement from the slices each repeated round(weight)
    times, so an epoch costs the same whatever the weighting."""
    if weight is None:
        order = rng.permutation(N)
        return np.concatenate([order, rng.permutation(N)])[:size]
    pool = np.repeat(np.arange(N), np.round(weight).astype(int))
    return rng.permutation(pool)[:size] if len(pool) >= size else rng.choice(pool, size)



def train(net: AnatomyNet, data: dict, cfg: AnatomyConfig, seed: int = 0, desc: str = "anatomy",
          eval_every: int = 0, on_eval=None) -> dict:
    """Train `net` in place on data = dict(canvas (N, C, C, 3) float32 0..255 (with_context),
    masks (N, C, C) uint8, has_mask (N,) bool, y (N,) int, and stack_index (N,) for
    cfg.end_weight). Every `eval_every` epochs (and after the last)
    `on_eval(net, epoch)` is called with the weights of that epoch. Returns the loss history."""
    canvas, masks = np.asarray(data["canvas"], np.float32), np.asarray(data["masks"], np.uint8)
    has_mask, y = np.asarray(data["has_mask"], bool), np.asarray(data["y"], np.int32)
    cw = jnp.asarray(_class_weights(y, cfg.class_weight))
    net.log_weight[...] = jnp.log(jnp.where(cw > 0, cw, 1.0))   # an absent class: weight 0, no prior
    N, B = len(y), cfg.batch_size
    steps = max(1, math.ceil(N / B))
    total = cfg.epochs * steps
    weight = None
    if cfg.end_weight != 1.0:
        if "stack_index" not in data:
            raise ValueError("end_weight needs the stack of each slice (data['stack_index'])")
        weight = np.where(end_slices(data["stack_index"], cfg.end_slices), cfg.end_weight, 1.0)
    graphdef, params, stats, rest = nnx.split(net, nnx.Param, nnx.BatchStat, ...)
    tx, step = _step_fn(graphdef, cfg)
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(seed)
    rng = np.random.default_rng(seed)
    history, t0, t = [], time.perf_counter(), 0
    for epoch in tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False):
        order = _epoch_order(rng, N, steps * B, weight)     # full batches only
        losses = []
        for b in range(steps):
            i = np.sort(order[b * B:(b + 1) * B])
            key, k = jax.random.split(key)
            # cosine decay to 2 % of the peak over the whole run
            lr = cfg.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t / total)))
            params, stats, opt_state, l = step(params, stats, rest, opt_state, canvas[i],
                                        jax.nn.one_hot(masks[i], N_MASK, dtype=jnp.float32),
                                        has_mask[i], y[i], cw, jnp.float32(lr), k)
            losses.append(l)
            t += 1
        history.append(np.mean(np.stack(jax.device_get(losses)), 0).round(5).tolist())
        if on_eval is not None and eval_every and ((epoch + 1) % eval_every == 0
                                                   or epoch + 1 == cfg.epochs):
            nnx.update(net, params, stats)
            precise_bn(net, canvas, cfg, seed)
            on_eval(net, epoch + 1)
    nnx.update(net, params, stats)
    precise_bn(net, canvas, cfg, seed)
    return dict(loss=history, seconds=round(time.perf_counter() - t0, 1))



def precise_bn(net: AnatomyNet, canvas: np.ndarray, cfg: AnatomyConfig, seed: int,
               batches: int = 8) -> None:
    """Replace the BatchNorm moving statistics by their average over `batches` batches of
    centre-cropped training canvases under the final weights. The moving averages (momentum
    0.99) trail weights that changed quickly, and the gap showed at test time as missed cavities."""
    from stackcls.models.backbones.layers import BatchNorm
    layers = [m for _, m in net.iter_modules() if isinstance(m, BatchNorm)]
    saved = [l.momentum for l in layers]
    for l in layers:
        l.momentum = 0.0               # one batch's statistics replace the moving ones
    graphdef, state = nnx.split(net)
    fn = _BN.get(graphdef)
    if fn is None:
        @jax.jit
        def fn(state, x):
            m = nnx.merge(graphdef, state, copy=True)
            m(_rgb(x), train=True)
            return nnx.state(m, nnx.BatchStat)
        _BN[graphdef] = fn
    rng = np.random.default_rng(seed)
    B = min(cfg.batch_size, len(canvas))
    crops = centre_crop(canvas, cfg.size)
    acc = None
    for _ in range(batches):
        s = fn(state, jnp.asarray(crops[rng.choice(len(crops), B, replace=False)]))
        acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    for l, m in zip(layers, saved):
        l.momentum = m
    nnx.update(net, jax.tree.map(lambda a: a / batches, acc))
