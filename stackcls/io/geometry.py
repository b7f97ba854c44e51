"""Shared geometry and cine helpers: which end of a stack is the apex, and which phase is ES.

Patient coordinates are DICOM LPS (x to the patient's left, y posterior, z head). The LV apex
points left, anterior and inferior, roughly APEX_DIRECTION. NIfTI affines are RAS: flip x and y.
"""

from __future__ import annotations

import functools

import numpy as np

APEX_DIRECTION = np.array([1.0, -1.0, -1.0]) / np.sqrt(3.0)  # LPS
# Below this |cos| between the slice normal and the apex direction the stack is not a short-axis
# stack we can orient (e.g. a 4-chamber view): keep the file/position order, orientation unknown.
MIN_APEX_COS = 0.2


def apex_to_base(normal_lps: np.ndarray, along_normal: np.ndarray):
    """Order slices apex -> base.

    normal_lps: (3,) unit slice normal in LPS; along_normal: (S,) slice positions along it (mm).
    Returns (order, positions, known, note): `order` indexes the input apex first, `positions` are
    the ordered slice positions in mm increasing from apex to base, `known` tells whether the apex
    end was decided from geometry.
    """
    d = np.asarray(along_normal, dtype=np.float64)
    c = float(np.dot(normal_lps, APEX_DIRECTION))
    if abs(c) < MIN_APEX_COS:
        order = np.argsort(d, kind="stable")
        note = (f"slice normal nearly perpendicular to the apex direction (cos {c:+.2f}): apex end "
                "unknown, slices kept in increasing position along the normal")
        return order, d[order], False, note
    # The apex has the largest projection on APEX_DIRECTION = largest d*c, so t = -sign(c)*d grows
    # from apex to base.
    t = -np.sign(c) * d
    order = np.argsort(t, kind="stable")
    note = f"from patient geometry (slice normal . apex direction = {c:+.2f})"
    return order, t[order], True, note


def _histogram_of_counts(values: np.ndarray, counts: np.ndarray, bins: int):
    """np.histogram of the pixels that a table counts: counts[k] of them equal values[k]. Each
    distinct value is binned once with its count as weight; the same result, since the same values
    give the same outer edges and a value's bin depends on it alone."""
    present = np.flatnonzero(counts)
    hist, edges = np.histogram(values[present], bins=bins, weights=counts[present])
    return hist.astype(np.intp), edges


def _otsu_of(hist: np.ndarray, edges: np.ndarray) -> float:
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m / w0
        mu1 = (m[-1] - m) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between)
    return float(centers[int(np.argmax(between))])


@functools.lru_cache(maxsize=16)
def es_disk(H: int, W: int):
    """The central disk of estimate_es (radius 30 % of the smaller side): (rows, cols) slices of
    its bounding box and the (h, w) bool mask within that box (the whole-image mask cropped)."""
    yy, xx = np.mgrid[:H, :W]
    disk = (yy - (H - 1) / 2) ** 2 + (xx - (W - 1) / 2) ** 2 <= (0.3 * min(H, W)) ** 2
    rows, cols = np.flatnonzero(disk.any(1)), np.flatnonzero(disk.any(0))  # never empty: the
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))    # centre is in it
    mask = disk[box]
    mask.flags.writeable = False
    return box, mask


def middle_slices(S: int) -> tuple[int, int]:
    """The slices [lo, hi) of an S-slice cine, apex to base, whose disks estimate_es reads."""
    return S // 3, max(S // 3 + 1, (2 * S + 2) // 3)


def estimate_es(cine: np.ndarray, n_slices: int | None = None) -> tuple[int, str]:
    """Estimate the end-systolic phase of a cine (T, S, H, W) ordered in time, ED first.

    ES is where the LV blood pool is smallest. Bright-blood (SSFP) cine: count the pixels brighter
    than one Otsu threshold (computed over all phases, so it is the same for every phase) inside a
    central disk (radius 30 % of the smaller image side) of the middle third of the slices, and take
    the phase (other than ED) with the fewest. With two phases, ES is the second.
    n_slices: `cine` holds only the slices middle_slices(n_slices) of an n_slices-slice cine (all
    the estimate reads, so a reader need not build the rest).
    Returns (phase index, how it was chosen).
    """
    T, S = cine.shape[0], cine.shape[1] if n_slices is None else n_slices
    if T <= 2:
        return _es_of_areas(None, T, S)
    lo, hi = middle_slices(S)
    return _es_of_areas(_bright_areas(cine if n_slices else cine[:, lo:hi])[1], T, S)


def estimate_es_from_counts(values: np.ndarray, counts: np.ndarray, S: int) -> tuple[int, str]:
    """estimate_es of an S-slice cine given by a table of its pixels in the disks of the middle
    slices: counts[t, k] of phase t's equal values[k] (the cine's dtype; repeats allowed). The
    same answer, for a reader that counts stored values instead of converting them."""
    T = counts.shape[0]
    return _es_of_areas(_areas_of_counts(values, counts)[1] if T > 2 else None, T, S)


def _es_of_areas(area, T: int, S: int) -> tuple[int, str]:
    if T == 1:
        return 0, "single phase: ES = ED"
    if T == 2:
        return 1, "two phases: ES = the second"
    lo, hi = middle_slices(S)
    es = 1 + int(np.argmin(area[1:]))
    return es, (f"estimated: smallest bright-pool area (Otsu threshold, central disk, slices "
                f"{lo}..{hi - 1}) at phase {es} of {T}")


def _bright_areas(cine: np.ndarray):
    """(threshold, area per phase) of estimate_es over the slices given, (T, s, H, W)."""
    T = cine.shape[0]
    (rows, cols), disk = es_disk(*cine.shape[2:])
    vals = cine[:, :, rows, cols][..., disk]  # (T, s, n): the disk's pixels in C order
    thr = _otsu_of(*np.histogram(vals, bins=128))
    return thr, (vals > thr).reshape(T, -1).sum(axis=1)


def _areas_of_counts(values: np.ndarray, counts: np.ndarray):
    """_bright_areas from a table: counts[t, k] pixels of phase t equal values[k]."""
    thr = _otsu_of(*_histogram_of_counts(values, counts.sum(axis=0), 128))
    # the values above the threshold, compared as `vals > thr` compares them (in their dtype)
    return thr, counts[:, values > thr].sum(axis=1)


def resolve_phases(phases, n_phases: int, es: int) -> list[tuple[int, str]]:
    """Requested phases -> [(temporal index, phase name)]; unknown indices are ignored later."""
    def name(t):
        return "ED" if t == 0 else "ES" if t == es else str(t)
    if isinstance(phases, str) and phases == "all":
        return [(t, name(t)) for t in range(n_phases)]
    if isinstance(phases, (str, int)):
        phases = (phases,)
    out = []
    for p in phases:
        if p == "ED":
            t = 0
        elif p == "ES":
            t = es
        else:
            try:
                t = int(p)
            except (TypeError, ValueError):
                raise ValueError(f"unknown phase {p!r}: use 'ED', 'ES', an index or 'all'") from None
        if 0 <= t < n_phases and t not in [o[0] for o in out]:
            out.append((t, name(t)))
    return out
