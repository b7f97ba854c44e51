"""On-device augmentation: the paper's random rotation in [-45, 45] degrees with nearest fill.

Keras' ImageDataGenerator(rotation_range=45, fill_mode="nearest") rotates each image about its
centre ((H-1)/2, (W-1)/2 in pixel indices) with `scipy.ndimage.affine_transform(order=1,
mode="nearest")`: bilinear interpolation, and samples outside the image take the value of the
nearest edge pixel. Here the same map is a jittable gather, so augmentation runs inside the jitted
training step on the accelerator. `rotate(x, a)` equals `scipy.ndimage.rotate(x, a, axes=(0, 1),
reshape=False, order=1, mode="nearest")` and, for square images (every backbone input), Keras'
`apply_affine_transform(x, theta=a, fill_mode="nearest", order=1)`. (On non-square images Keras
swaps the two centre offsets; we keep the true centre.) The tests check both references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate_one(img: jax.Array, angle_deg: jax.Array) -> jax.Array:
    """img (H, W, C), angle in degrees -> rotated (H, W, C), bilinear, edge-replicate fill."""
    H, W = img.shape[0], img.shape[1]
    t = jnp.deg2rad(angle_deg.astype(jnp.float32))
    c, s = jnp.cos(t), jnp.sin(t)
    cr, cc = (H - 1) / 2.0, (W - 1) / 2.0
    r = jnp.arange(H, dtype=jnp.float32)[:, None] - cr
    q = jnp.arange(W, dtype=jnp.float32)[None, :] - cc
    # Inverse map (output pixel -> input coordinate), the matrix scipy.ndimage.rotate builds.
    src_r = c * r + s * q + cr
    src_c = -s * r + c * q + cc
    # Clamping each coordinate to the image = interpolating an edge-replicated image ("nearest").
    src_r = jnp.clip(src_r, 0.0, H - 1.0)
    src_c = jnp.clip(src_c, 0.0, W - 1.0)
    r0 = jnp.floor(src_r)
    c0 = jnp.floor(src_c)
    fr = (src_r - r0)[..., None]
    fc = (src_c - c0)[..., None]
    r0 = r0.astype(jnp.int32)
    c0 = c0.astype(jnp.int32)
    r1 = jnp.minimum(r0 + 1, H - 1)
    c1 = jnp.minimum(c0 + 1, W - 1)
    x = img.astype(jnp.float32)
    top = x[r0, c0] * (1 - fc) + x[r0, c1] * fc
    bot = x[r1, c0] * (1 - fc) + x[r1, c1] * fc
    return (top * (1 - fr) + bot * fr).astype(img.dtype if jnp.issubdtype(img.dtype, jnp.floating)
                                              else jnp.float32)


def rotate(images: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate each image of (N, H, W, C) (or (N, H, W)) by its angle in degrees, about the centre.

    Bilinear, edge-replicate fill (Keras fill_mode="nearest"). Jittable; float dtype preserved
    (integer input comes back float32).
    """
    images = jnp.asarray(images)
    angles = jnp.asarray(angles)
    squeeze = images.ndim == 3
    if squeeze:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"rotate: expected images (N, H, W, C) or (N, H, W), got {images.shape}")
    if angles.shape != (images.shape[0],):
        raise ValueError(f"rotate: need one angle per image, got angles {angles.shape} for "
                         f"{images.shape[0]} images")
    out = jax.vmap(_rotate_one)(images, angles)
    return out[..., 0] if squeeze else out


def random_rotation(key: jax.Array, images: jax.Array, max_degrees: float = 45.0) -> jax.Array:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees] (Keras
    `rotation_range`). Jittable; one independent angle per image."""
    n = jnp.shape(images)[0]
    angles = jax.random.uniform(key, (n,), jnp.float32, -max_degrees, max_degrees)
    return rotate(images, angles)
