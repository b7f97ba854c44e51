"""Physical normalisation: every slice at one spacing (mm per pixel), cut around the heart.

The paper's preprocessing keeps a fixed fraction of the pixels around the image centre, so what the
network sees depends on the scanner's field of view and on where the operator put the heart. Here:

    resample   each slice to SPACING_MM per pixel from its PixelSpacing / NIfTI zooms, on a canvas
               of a given size centred on a given point (bilinear; masks by nearest neighbour)
    intensity  one window per stack (its 1st..99th percentile to 0..255), so slices of one stack
               keep their relative brightness (an apical cap is darker than a mid slice). The
               window makes any linear rescaling (an 8-bit copy, another window) the same input;
               a negated copy (bright air, dark blood) is turned back first (`polarity`)
    centre     where the heart is: from the masks when a stack has them (training), otherwise from
               a localiser's LV probability map (`heart_centre`), otherwise the image centre

Unknown spacing (a NIfTI without zooms, an array given without spacing): the slice is assumed to
span ASSUMED_FOV_MM, the median field of view of cardiac cines, and the stack's meta says so. The
anatomy model estimates it from the images instead (preprocess/spacing.py; this is its ablation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SPACING_MM = 1.5          # mm per pixel of everything the anatomy model sees
ASSUMED_FOV_MM = 360.0    # the field of view assumed when a file carries no pixel spacing
LV_CLASSES = (2, 3)       # mask labels of the left ventricle (myocardium, cavity)
POLARITY_SPLIT = 0.5      # median's place in the 1-99 % range above which a stack is negated


def pixel_spacing(spacing, shape_hw) -> tuple[tuple[float, float], str | None]:
    """(row, col) mm per pixel from a stack's spacing (or None), and a note when it was assumed."""
    if spacing is not None and np.all(np.isfinite(spacing[:2])) and 0.05 < min(spacing[:2]) \
            and max(spacing[:2]) < 20:
        return (float(spacing[0]), float(spacing[1])), None
    s = ASSUMED_FOV_MM / max(shape_hw)
    return (s, s), (f"pixel spacing unknown: assumed {s:.2f} mm (the slice taken to span "
                    f"{ASSUMED_FOV_MM:.0f} mm)")


def _grid(shape_hw, spacing_rc, centre_rc, size: int) -> np.ndarray:
    """(2, size, size) native pixel coordinates sampled by an output canvas of `size` pixels at
    SPACING_MM centred on `centre_rc` (native pixel coordinates)."""
    off = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * SPACING_MM
    rr = centre_rc[0] + off / spacing_rc[0]
    cc = centre_rc[1] + off / spacing_rc[1]
    return np.stack(np.meshgrid(rr, cc, indexing="ij"))


def resample(images: np.ndarray, spacing_rc, centre_rc, size: int, order: int = 1) -> np.ndarray:
    """(S, H, W) -> (S, size, size) at SPACING_MM around centre_rc; outside the image: 0."""
    grid = _grid(images.shape[1:], spacing_rc, centre_rc, size)
    out = np.empty((len(images), size, size), np.float32 if order else images.dtype)
    for i, im in enumerate(images):
        out[i] = ndimage.map_coordinates(im, grid, order=order, mode="constant", cval=0,
                                         prefilter=False)
    return out


def inside(shape_hw, spacing_rc, centre_rc, size: int) -> np.ndarray:
    """(size, size) bool: which canvas pixels fall inside the image."""
    g = _grid(shape_hw, spacing_rc, centre_rc, size)
    return ((g[0] >= -0.5) & (g[0] <= shape_hw[0] - 0.5) & (g[1] >= -0.5) & (g[1] <= shape_hw[1] - 0.5))


def intensity(canvas: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """One window per stack: its [1, 99] percentile range (over pixels inside the image) to
    0..255, clipped; (S, n, n) grey (the model repeats it into RGB)."""
    vals = canvas[:, valid] if valid.any() else canvas.reshape(len(canvas), -1)
    if not np.all(np.isfinite(vals)):
        raise ValueError("images contain NaN or infinite values")
    lo, hi = np.percentile(vals, [1.0, 99.0])
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    x = (canvas - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(canvas)
    return np.where(valid[None], np.clip(x, 0.0, 255.0), 0.0).astype(np.float32)


def polarity(images) -> float:
    """-1.0 when a stack's grey levels are negated, else 1.0. In a cine most pixels (air, lung,
    muscle) lie in the dark part of the 1-99 % range and only blood and fat are bright, so the
    median sits low: 0.03-0.31 of the range on all 160 ACDC stacks and 0.11-0.21 on phantom
    stacks, 0.69-0.97 when they are negated. The middle of the range splits them."""
    x = np.asarray(images, np.float32)
    lo, med, hi = np.percentile(x, [1.0, 50.0, 99.0])
    return -1.0 if hi > lo and (med - lo) / (hi - lo) > POLARITY_SPLIT else 1.0


def mask_centre(masks: np.ndarray) -> np.ndarray | None:
    """(row, col) native pixel centre of the LV over the whole stack, or None without LV pixels."""
    lv = np.isin(masks, LV_CLASSES)
    if not lv.any():
        return None
    _, r, c = np.nonzero(lv)
    return np.array([r.mean(), c.mean()])


def heart_centre(lv_prob: np.ndarray, spacing_rc, centre_rc, min_mass_mm2: float = 200.0):
    """The heart's centre (native pixel coordinates) from an LV probability map (S, n, n) computed
    on a canvas at SPACING_MM around `centre_rc`; None when the map holds too little LV to trust.

    The centre is the probability-weighted median over the whole stack, not the mean: a false
    blob (stomach, aorta) moves a mean but not a median of a map dominated by the true LV."""
    p = np.asarray(lv_prob, np.float64)
    mass = p.sum()
    if mass * SPACING_MM ** 2 < min_mass_mm2:
        return None
    n = p.shape[-1]
    off = (np.arange(n) - (n - 1) / 2.0) * SPACING_MM

    def wmedian(w):
        cw = np.cumsum(w)
        return off[np.searchsorted(cw, cw[-1] / 2.0)]

    dr, dc = wmedian(p.sum(axis=(0, 2))), wmedian(p.sum(axis=(0, 1)))
    return np.array([centre_rc[0] + dr / spacing_rc[0], centre_rc[1] + dc / spacing_rc[1]])


def image_centre(shape_hw) -> np.ndarray:
    return np.array([(shape_hw[0] - 1) / 2.0, (shape_hw[1] - 1) / 2.0])


def canvas(images, spacing, size: int, centre_rc=None, masks=None):
    """Slices (S, H, W) on a canvas of `size` pixels at SPACING_MM centred on centre_rc (native
    pixel coordinates; None: the image centre): (x (S, size, size) float32 0..255, masks
    (S, size, size) uint8 or None, info dict(centre, spacing, note)). A negated stack (`polarity`)
    is turned back before anything else."""
    images = np.asarray(images, np.float32)
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or infinite values")
    if polarity(images) < 0:
        images = -images
    shape = images.shape[1:]
    spacing_rc, note = pixel_spacing(spacing, shape)
    centre_rc = image_centre(shape) if centre_rc is None else np.asarray(centre_rc, np.float64)
    raw = resample(images, spacing_rc, centre_rc, size)
    x = intensity(raw, inside(shape, spacing_rc, centre_rc, size))
    m = None if masks is None else resample(np.asarray(masks, np.uint8), spacing_rc, centre_rc,
                                            size, order=0)
    return x, m, dict(centre=centre_rc.tolist(), spacing=list(spacing_rc), note=note)
