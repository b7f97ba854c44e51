"""Throughput of the data stage against the paper's reference path, in one process, after warm-up.

    python benchmarks/preprocess.py [--slices 400] [--batch 32 256] [--size 224] [--acdc ../shared/data/acdc]

1. `to_model_input` (window, 60 % centre crop, antialiased bilinear resize, grey->RGB) against a
   per-slice reference: numpy percentiles + Pillow crop/resize (how exported PNGs were made).
2. `augment.rotate` jitted on the default JAX device against Keras' `apply_affine_transform`
   (ImageDataGenerator's rotation, scipy on the host), on the same batch.
3. With --acdc: the fraction of ACDC LV voxels (myocardium + cavity masks) that the fixed 60 %
   centre crop keeps, per slice, a check of the paper's assumption that the crop keeps the heart.
Prints ratios; absolute times on shared CPUs are noise.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")


def _best(f, reps=3):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_preprocess(n_slices, size):
    from PIL import Image

    from stackcls.preprocess.arrays import to_model_input

    x = (np.random.default_rng(0).random((n_slices, 256, 216)) * 4000).astype(np.float32)

    def reference():
        out = np.empty((n_slices, size, size, 3), np.float32)
        for i, s in enumerate(x):
            lo, hi = np.percentile(s, [2, 98])
            w = np.clip((s - lo) / (hi - lo), 0, 1)
            H, W = w.shape
            h, ww = round(0.6 * H), round(0.6 * W)
            r0, c0 = (H - h) // 2, (W - ww) // 2
            im = Image.fromarray((w[r0:r0 + h, c0:c0 + ww] * 255).astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im)[..., None]
        return out

    t_ours = _best(lambda: to_model_input(x, size))
    t_ref = _best(reference)
    diff = np.abs(to_model_input(x, size) - reference()).mean()
    print(f"to_model_input  {n_slices} slices 256x216 -> {size}: ours {t_ours * 1e3:8.1f} ms "
          f"({n_slices / t_ours:7.0f} slices/s), numpy+Pillow loop {t_ref * 1e3:8.1f} ms, "
          f"speed-up x{t_ref / t_ours:.2f}, mean |diff| {diff:.2f} / 255")


def bench_rotate(batch, size):
    import jax
    import scipy.ndimage as nd

    from stackcls.preprocess.augment import random_rotation, rotate

    try:  # Keras' own ImageDataGenerator rotation; scipy's rotate is the same map where Keras is absent
        from keras.src.legacy.preprocessing.image import apply_affine_transform

        def rot_ref(img, a):
            return apply_affine_transform(img, theta=a, row_axis=0, col_axis=1, channel_axis=2,
                                          fill_mode="nearest", order=1)
        ref_name = "Keras apply_affine_transform"
    except ImportError:
        def rot_ref(img, a):
            return nd.rotate(img, a, axes=(0, 1), reshape=False, order=1, mode="nearest")
        ref_name = "scipy.ndimage.rotate"

    rng = np.random.default_rng(1)
    x = rng.random((batch, size, size, 3)).astype(np.float32) * 255
    angles = rng.uniform(-45, 45, batch).astype(np.float32)
    xd, ad = jax.device_put(x), jax.device_put(angles)
    f = jax.jit(rotate)
    t_ours = _best(lambda: f(xd, ad).block_until_ready(), reps=10)
    g = jax.jit(random_rotation)
    key = jax.random.key(0)
    t_rand = _best(lambda: g(key, xd).block_until_ready(), reps=10)

    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)

    def keras_ref():
        return np.stack([rot_ref(x[i], float(angles[i])) for i in range(batch)])

    t_ref = _best(keras_ref, reps=2)
    err = np.abs(np.asarray(f(xd, ad)) - keras_ref()).max()
    dev = jax.devices()[0].device_kind
    print(f"rotate          batch {batch}x{size}x{size}x3 on {dev}: jitted {t_ours * 1e3:7.2f} ms "
          f"(random_rotation {t_rand * 1e3:7.2f} ms, {batch / t_rand:8.0f} images/s), "
          f"{ref_name} (host) {t_ref * 1e3:7.1f} ms, speed-up x{t_ref / t_ours:.1f}, "
          f"max |diff| {err:.1e}")


def acdc_crop_coverage(root, keep=0.6):
    import glob

    import nibabel as nib

    from stackcls.preprocess.arrays import center_crop

    fracs = []
    for f in sorted(glob.glob(os.path.join(root, "patient*", "*_gt.nii.gz"))):
        m = np.asarray(nib.load(f).dataobj)  # (rows, cols, slices)
        m = np.moveaxis(m, -1, 0)
        lv = (m == 2) | (m == 3)
        kept = center_crop(lv, keep).sum(axis=(1, 2))
        tot = lv.sum(axis=(1, 2))
        fracs.extend((kept[tot > 0] / tot[tot > 0]).tolist())
    fracs = np.array(fracs)
    print(f"ACDC centre crop keep={keep}: {len(fracs)} slices with LV; LV voxels kept: mean "
          f"{fracs.mean():.3f}, min {fracs.min():.3f}; slices with all LV kept {np.mean(fracs == 1):.3f}, "
          f"with < 90 % kept {np.mean(fracs < 0.9):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--acdc", default=None, help="ACDC root for the crop-coverage check")
    a = ap.parse_args()
    if a.slices:
        bench_preprocess(a.slices, a.size)
    for b in a.batch:
        bench_rotate(b, a.size)
    if a.acdc:
        acdc_crop_coverage(a.acdc)


if __name__ == "__main__":
    main()
