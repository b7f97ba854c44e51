"""Real stacks extended past their ends, for training (`protocol.anatomy.beyond`).

ACDC's stacks stop at the heart (3 % of their slices OAP, 2 % OBS), while clinical stacks often run
1-3 slices past the apex and the base. A drawn phantom is told from real slices by a linear probe
every time (docs/phantom.md), so the slices beyond the ends are made from the real image itself:
the stack's end slice is copied, and the structures that end there are replaced by tissue cut
from elsewhere in the same image, so noise, contrast and coil shading are the scanner's own (an end
slice already past them is copied as it is).

- Below the apex the ventricles end: the LV myocardium, the LV cavity and the RV go.
- Above the base the LV ends but the RV outflow tract goes on: the LV myocardium and cavity go.

The masks of the new slices mark nothing of what was removed, and their labels are OAP (apex side)
and OBS (base side).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from stackcls.stack import Stack

APEX_CLASSES = (1, 2, 3)    # RV cavity, LV myocardium, LV cavity (MASK_CLASSES)
BASE_CLASSES = (2, 3)       # LV myocardium, LV cavity
MARGIN_MM = 3.0             # the erased region reaches this far past the structures
FEATHER_MM = 2.0            # its edge is blended over about this width


def erase(image: np.ndarray, mask: np.ndarray, classes, spacing_rc, rng) -> tuple[np.ndarray, np.ndarray]:
    """One slice with the mask's `classes` replaced by tissue from elsewhere in the same image:
    (image, mask with those classes set to background). The source region is shifted away from
    the whole heart, lies inside the image and inside the body (not darker than 0.6 of the body's
    median); of 64 random shifts the first that qualifies is used, else the one whose
    source overlaps the heart least. A slice without those classes comes back unchanged."""
    image = np.asarray(image, np.float32)
    mask = np.asarray(mask)
    target = np.isin(mask, classes)
    if not target.any():
        return image.copy(), mask.copy()
    px = float(min(spacing_rc))
    region = ndimage.binary_dilation(target, iterations=max(1, round(MARGIN_MM / px)))
    alpha = np.clip(ndimage.gaussian_filter(region.astype(np.float32), FEATHER_MM / px) * 2.0, 0, 1)
    alpha[region] = 1.0
    heart = ndimage.binary_dilation(mask > 0, iterations=max(1, round(MARGIN_MM / px)))
    H, W = image.shape
    rows, cols = np.nonzero(alpha > 0)
    body = image > 0.2 * np.percentile(image, 99)
    floor = 0.6 * np.median(image[body]) if body.any() else 0.0
    extent = max(np.ptp(rows), np.ptp(cols)) + 1
    best, best_overlap = None, np.inf
    for _ in range(64):
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(extent, max(extent + 1, 0.5 * max(H, W)))
        d = np.round(dist * np.array([np.sin(angle), np.cos(angle)])).astype(int)
        sr, sc = rows + d[0], cols + d[1]
        if sr.min() < 0 or sc.min() < 0 or sr.max() >= H or sc.max() >= W:
            continue
        overlap = heart[sr, sc].mean()
        inside = image[sr, sc].mean() >= floor
        if overlap == 0 and inside:
            best = d
            break
        if inside and overlap < best_overlap:
            best, best_overlap = d, overlap
    if best is None:      # nowhere inside the image: blur the region away instead
        fill = ndimage.gaussian_filter(np.where(region, np.median(image[~heart]), image), 4.0 / px)
    else:
        fill = np.roll(image, (-best[0], -best[1]), axis=(0, 1))
    out = image * (1 - alpha) + fill * alpha
    return out.astype(np.float32), np.where(target, 0, mask).astype(mask.dtype)


def extend(stack: Stack, apex: int, base: int, seed: int = 0) -> Stack:
    """`stack` with `apex` slices below its apex and `base` above its base (see the module's
    docstring). Needs masks, labels and the in-plane spacing. The new slices' ids run below 0 and
    from the stack's length up; their sources say what they are; meta["beyond"] = (apex, base)."""
    if stack.masks is None or stack.labels is None:
        raise ValueError(f"stack {stack.key}: extending past the ends needs its masks and labels")
    if stack.spacing is None:
        raise ValueError(f"stack {stack.key}: extending past the ends needs its pixel spacing")
    rng = np.random.default_rng(seed)
    spacing_rc = stack.spacing[:2]
    lo, hi = 0, stack.n_slices - 1
    below = [erase(stack.images[lo], stack.masks[lo], APEX_CLASSES, spacing_rc, rng) for _ in range(apex)]
    above = [erase(stack.images[hi], stack.masks[hi], BASE_CLASSES, spacing_rc, rng) for _ in range(base)]
    n = stack.n_slices
    images = np.stack([b[0] for b in below[::-1]] + list(stack.images) + [a[0] for a in above])
    masks = np.stack([b[1] for b in below[::-1]] + list(stack.masks) + [a[1] for a in above])
    positions = None
    if stack.positions is not None and n > 1:
        step = float(np.median(np.diff(stack.positions)))
        positions = np.concatenate([stack.positions[0] - step * np.arange(apex, 0, -1), stack.positions,
                                    stack.positions[-1] + step * np.arange(1, base + 1)])
    return dataclasses.replace(
        stack, images=images, masks=masks, positions=positions, files=None,
        sources=([f"beyond the apex {k}" for k in range(apex, 0, -1)] + list(stack.sources)
                 + [f"beyond the base {k}" for k in range(1, base + 1)]),
        slice_ids=list(range(-apex, 0)) + list(stack.slice_ids) + list(range(n, n + base)),
        labels=["OAP"] * apex + list(stack.labels) + ["OBS"] * base,
        meta=dict(stack.meta, beyond=(apex, base)))


def extended(stacks, share: float, seed: int = 0, most: int = 3) -> list[tuple[int, Stack]]:
    """(index, extended copy) for about `share` of the stacks that have masks, labels and spacing,
    each with 1..`most` slices past either end (drawn at random, seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, st in enumerate(stacks):
        usable = st.masks is not None and st.labels is not None and st.spacing is not None
        if usable and rng.random() < share:
            a, b = rng.integers(1, most + 1, size=2)
            out.append((i, extend(st, int(a), int(b), seed=int(rng.integers(2**31)))))
    return out


def beyond_slices(stack: Stack) -> np.ndarray:
    """(S,) bool: the slices `extend` added."""
    apex, base = stack.meta.get("beyond", (0, 0))
    keep = np.zeros(stack.n_slices, bool)
    keep[:apex] = True
    keep[stack.n_slices - base:] = True
    return keep
