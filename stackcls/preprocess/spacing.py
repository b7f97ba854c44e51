"""In-plane pixel spacing of a stack whose file does not say it, estimated from its images.

Public conversions often drop the geometry (an identity affine with pixdim 1 x 1, see
io/nifti.py), and many are resampled or cropped on the way, so the number of pixels says little
about millimetres. Two cues remain, and neither is enough alone:

    field of view   operators frame the chest: cardiac cines span ~300-450 mm. Right for a stack
                    straight off a scanner, wrong by any factor for a crop or a resampled copy.
    heart size      the LV (cavity + myocardium) at its widest short-axis cut is ~25-70 cm^2 in
                    adults (ED and ES, normal hearts to dilated ones): a ruler in every stack, but
                    a loose one (about +-16 % in spacing, one SD).

The estimate is the most probable spacing under both: a log-normal heart size measured on the
localiser's LV map, times a field-of-view prior with broad tails (so a crop, whose field of view
is implausible, is decided by the heart). The map is measured at an assumed spacing; a segmenter
sees a heart at the wrong scale less well, so the measurement is repeated at the estimate while
it moves by more than MOVE (at most PASSES passes).

Only the mid slices are measured (the LV is widest there, and the passes cost less). `lv_map` is
passed in, as a function of canvases (S, n, n) at physical.SPACING_MM: this module knows no model.
"""

from __future__ import annotations

import math

import numpy as np

from stackcls.preprocess import physical

# Fitted on the 160 ACDC stacks of ../shared (80 patients, ED and ES) at their pixdim: per stack,
# the mean of the 3 largest per-slice LV areas (mask classes 2 + 3) in cm^2. Median 40.6 cm^2,
# SD of its log 0.30 (the spread of heart sizes from HCM to DCM, which the estimate cannot know).
LV_AREA_CM2 = 40.6
LV_AREA_LOG_SD = 0.30
# The localiser's map, thresholded at 0.5, reads the LV ~10 % larger than the masks (its border
# is soft, and the myocardium's outer edge is blurred), with ~0.1 spread: measured with the
# shipped model on 20 ACDC stacks at their true spacing.
MAP_BIAS = 1.10
MAP_LOG_SD = 0.10
# Field of view (mm across the longer image side) of the same stacks: median 370 mm, 10-90 %
# 350-420 mm (SD of its log ~0.10). TAIL is the prior's weight on "not a scanner's field of view"
# (a crop or a resampled copy), spread evenly over FOV_RANGE.
FOV_MM = 370.0
FOV_LOG_SD = 0.10
TAIL = 0.15
FOV_RANGE = (60.0, 800.0)
SPACING_RANGE = (0.25, 4.0)   # mm per pixel considered: micro-CT-fine to thumbnail-coarse
MOVE = 0.08                   # log change of the estimate that asks for one more measurement
PASSES = 3
MID_SLICES = 6
THRESHOLD = 0.5
RADIUS_MM = 80.0              # around the map's centre: a blob further away is not the LV


def mid_slices(n: int, k: int = MID_SLICES) -> np.ndarray:
    """Indices of the (at most k) middle slices of a stack of n: the LV is widest there."""
    if n <= k:
        return np.arange(n)
    lo = (n - k) // 2
    return np.arange(lo, lo + k)


def lv_area(lv: np.ndarray) -> float | None:
    """The LV's size in a stack's LV map (S, n, n) on a canvas at SPACING_MM: the mean of the 3
    largest per-slice areas (cm^2) of the thresholded map within RADIUS_MM of its centre; None
    when the map holds no LV."""
    lv = np.asarray(lv, np.float64)
    if lv.sum() * physical.SPACING_MM ** 2 < 100.0:     # < 1 cm^2 over the stack: nothing found
        return None
    n = lv.shape[-1]
    centre = physical.heart_centre(lv, (physical.SPACING_MM,) * 2, ((n - 1) / 2.0,) * 2,
                                    min_mass_mm2=0)   # canvas pixel coordinates
    rr, cc = np.mgrid[:n, :n]
    near = np.hypot(rr - centre[0], cc - centre[1]) * physical.SPACING_MM <= RADIUS_MM
    areas = ((lv > THRESHOLD) & near).sum(axis=(1, 2)) * physical.SPACING_MM ** 2 / 100.0
    top = np.sort(areas)[-3:]
    return float(top.mean()) if top.max() > 0 else None


def log_posterior(log_s: np.ndarray, area_px_cm2: float | None, n_pixels: int) -> np.ndarray:
    """Unnormalised log-probability of each log spacing: the heart-size likelihood (area_px_cm2:
    the measured LV area in cm^2 per square of native pixels, i.e. at 1 mm pixels times 1; None:
    no heart found) plus the field-of-view prior of an image n_pixels across."""
    log_fov = log_s + math.log(n_pixels)
    core = -0.5 * ((log_fov - math.log(FOV_MM)) / FOV_LOG_SD) ** 2 \
        + math.log((1 - TAIL) / (FOV_LOG_SD * math.sqrt(2 * math.pi)))
    flat = math.log(TAIL / math.log(FOV_RANGE[1] / FOV_RANGE[0]))
    out = np.logaddexp(core, np.where((log_fov >= math.log(FOV_RANGE[0]))
                                      & (log_fov <= math.log(FOV_RANGE[1])), flat, -np.inf))
    if area_px_cm2 is not None:
        sd = math.hypot(LV_AREA_LOG_SD, MAP_LOG_SD)
        mu = math.log(LV_AREA_CM2 * MAP_BIAS)
        out = out - 0.5 * ((math.log(area_px_cm2) + 2 * log_s - mu) / sd) ** 2
    return out


def most_probable(area_px_cm2: float | None, n_pixels: int) -> float:
    grid = np.linspace(math.log(SPACING_RANGE[0]), math.log(SPACING_RANGE[1]), 2001)
    return float(math.exp(grid[int(np.argmax(log_posterior(grid, area_px_cm2, n_pixels)))]))


def estimate_spacing(images, lv_map, size: int = 256):
    """(spacing (row, col) mm, info) of one stack (S, H, W) whose in-plane spacing is unknown.

    lv_map(canvas (k, size, size) float 0..255) -> LV probability maps (k, size, size). info:
    method, the passes [(assumed mm, measured LV cm^2 at it or None)], the field of view the
    estimate implies, and whether the heart was found (without it: the field-of-view prior alone).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 3 or min(images.shape) < 1:
        raise ValueError(f"estimate_spacing: images must be (S, H, W), got shape {images.shape}")
    n_px = max(images.shape[1:])
    mids = images[mid_slices(len(images))]
    s = most_probable(None, n_px)                        # the field of view alone
    passes = []
    for _ in range(PASSES):
        full, _, _ = physical.canvas(mids, (s, s), size)
        area = lv_area(lv_map(full))
        passes.append((round(s, 4), None if area is None else round(area, 2)))
        if area is None:
            break
        new = most_probable(area / s ** 2, n_px)
        moved = abs(math.log(new / s))
        s = new
        if moved <= MOVE:
            break
    found = any(a is not None for _, a in passes)
    info = dict(
        spacing=[s, s], fov_mm=round(s * n_px, 1), heart_found=found, passes=passes,
        method=("estimated: LV size on the localiser's map x field-of-view prior" if found else
                f"estimated: no LV found, field-of-view prior alone ({FOV_MM:.0f} mm)"))
    return (s, s), info


def resolve_spacing(images, spacing, lv_map, size: int = 256, estimate: bool = True):
    """(spacing for physical.canvas, info): the stack's own (row, col, slice) when its in-plane part
    is usable; otherwise estimated (`estimate_spacing`) or, with estimate=False, None (physical's
    fixed field of view). info: spacing_source "given" | "estimated" | "assumed", spacing_estimate
    (the estimate's info or None)."""
    images = np.asarray(images, np.float32)
    if physical.pixel_spacing(spacing, images.shape[1:])[1] is None:
        return spacing, dict(spacing_source="given", spacing_estimate=None)
    if not estimate:
        return None, dict(spacing_source="assumed", spacing_estimate=None)
    (sr, sc), est = estimate_spacing(images, lv_map, size)
    thick = float(spacing[2]) if spacing is not None and len(spacing) > 2 else math.nan
    return (sr, sc, thick), dict(spacing_source="estimated", spacing_estimate=est)
