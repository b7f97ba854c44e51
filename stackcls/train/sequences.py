"""The stack head's training loop (stackcls.train.stack_head): R runs (folds x learning rates)
of a sequence model trained at once under vmap, full batch, one step per epoch, validated with
the ordered decoding after each step."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stackcls.decode.ordered import decode_batch


def sequence_trainer(graphdef, epochs: int, *, weight_decay: float, feature_noise: float,
                     reverse_prob: float, reverse: Callable) -> Callable:
    """The stack head's trainer: a jitted function training R runs at once (vmap over runs).

    train(params, stats, x (B, S, D), y (B, S) with -1 padding, lengths (B,), class weights (3,),
    w_train (R, B), w_val (R, B), lr (R,), key (R,), stop (R,)) -> (params (R, ...), curves):
    full-batch AdamW, one step per epoch for `epochs` steps, each stack reversed with probability
    reverse_prob at every step (`reverse(x, lengths)`, labels with it); run r trains on the stacks
    weighted by w_train[r] and validates the ordered decoding on w_val[r] after each step.
    """
    rev_p, noise, wd = float(reverse_prob), float(feature_noise), float(weight_decay)

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
            xr = jnp.where(flip[:, None, None], reverse(x, n), x)
            yr = jnp.where(flip[:, None], reverse(y, n), y)
            loss, g = jax.value_and_grad(loss_fn)(params, xr, yr, w_train, k_fwd)
            upd, opt_state = opt.update(g, opt_state, params)
            # steps after `stop` leave the parameters alone: one compiled trainer serves every
            # epoch count (the CV runs and the final run share it)
            upd = jax.tree.map(lambda u: u * (t < stop), upd)
            params = optax.apply_updates(params, upd)
            return (params, opt_state), dict(train_loss=loss, **decoded_curves(params, y, w_val))

        def decoded_curves(params, y, w_val):
            """Validation (stated direction, no dropout) of the ordered decoding."""
            lp = jax.nn.log_softmax(nnx.merge(graphdef, params, stats)(x, n), -1)
            ce = -jnp.take_along_axis(lp, jnp.maximum(y, 0)[..., None], -1)[..., 0]
            m = valid * w_val[:, None]
            denom = jnp.maximum(jnp.sum(m), 1.0)
            dec = decode_batch(lp, n)[0]
            hit = (dec == y) * m
            n_c = jnp.stack([jnp.sum(m * (y == c)) for c in range(3)])
            rec = jnp.stack([jnp.sum(hit * (y == c)) for c in range(3)]) / jnp.maximum(n_c, 1.0)
            present = n_c > 0
            stack_ok = jnp.all((dec == y) | ~valid, axis=1)
            return dict(val_loss=jnp.sum(ce * m) / denom, accuracy=jnp.sum(hit) / denom,
                        balanced_accuracy=jnp.sum(rec * present) / jnp.maximum(jnp.sum(present), 1),
                        exact=jnp.sum(stack_ok * w_val) / jnp.maximum(jnp.sum(w_val), 1.0))

        keys = jax.random.split(key, epochs)
        (params, _), curves = jax.lax.scan(step, (params, opt.init(params)), (keys, jnp.arange(epochs)))
        return params, curves

    return jax.jit(jax.vmap(one_run, in_axes=(None, None, None, None, None, None, 0, 0, 0, 0, 0)))
