"""From a subject's anatomy to a cine short-axis stack: acquisition plan, bSSFP-like images, labels.

One subject = one `SubjectData`: uint16 pixels (phase, slice apex->base, row, col) with their
rescale, the DICOM geometry of every slice, the trigger times, and the OAP/IN/OBS labels and the
anatomy masks of the ED and ES frames, computed from what each rendered slice actually contains.

Partial volume: a slice integrates N_SUB sub-slices with the weights SUB_WEIGHTS. A pixel counts as
LV blood pool when LV blood covers at least half of that weight (the labels' pool area), and its
mask class is the one of MASK_TISSUES that covers at least half of it (background when none
does). The LV cavity holds the papillary muscles and trabeculae, as in ACDC's masks, so the cavity
mask contains every pool pixel; IN is decided by the pool alone (`MIN_POOL_MM2`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stackcls.phantom import anatomy as A

N_SUB = 5                     # sub-slices integrated across the slice thickness (partial volume)
SUB_WEIGHTS = np.array([0.6, 1.0, 1.0, 1.0, 0.6])  # tapered slice profile
MIN_POOL_MM2 = 40.0           # "visible LV blood pool": >= 40 mm^2 of pixels at least half blood
# The tissues of each mask class 1..3 (stack.MASK_CLASSES: RV cavity, LV myocardium, LV cavity).
MASK_TISSUES = ((A.RV_BLOOD,), (A.LV_MYO,), (A.LV_BLOOD, A.PAPILLARY))


@dataclasses.dataclass
class SubjectData:
    subject: str
    pixels: np.ndarray          # (P, S, H, W) uint16, slice 0 = most apical
    slope: float
    intercept: float
    ipp: np.ndarray             # (S, 3) ImagePositionPatient of each slice (LPS mm)
    iop: np.ndarray             # (6,) ImageOrientationPatient (row dir, col dir)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float
    spacing: float              # centre-to-centre slice distance (thickness + gap)
    trigger_times: np.ndarray   # (P,) ms, increasing, ED first
    frames: dict                # {"ED": 0, "ES": k}
    labels: dict                # {"ED": [...], "ES": [...]} apex -> base
    pool_mm2: np.ndarray        # (P, S) visible LV blood pool area per slice
    masks: dict                 # {"ED": (S, H, W) uint8, "ES": ...} stack.MASK_CLASSES, apex -> base
    shift: np.ndarray           # (S, 3) breath-hold displacement of the anatomy per slice (mm)
    dicom: dict                 # header variations: slice-location sign, instance order, ...
    anatomy: A.Anatomy

    def images(self) -> np.ndarray:
        """Float images as a DICOM reader sees them (pixels * slope + intercept)."""
        return self.pixels.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


def _cine(rng):
    hr = rng.uniform(55, 95)
    rr = 60000.0 / hr
    n_ph = int(rng.integers(5, 7))          # 5 or 6 phases keep a subject near 2-3 MB
    k_es = int(np.clip(round(rng.uniform(0.3, 0.42) * n_ph), 1, n_ph - 2))
    c = np.zeros(n_ph)
    for k in range(1, n_ph):
        if k <= k_es:
            c[k] = np.sin(np.pi / 2 * k / k_es) ** 2
        else:  # rapid filling then diastasis: the cavity never gets as small as at ES again
            f = min(1.0, (k - k_es) / max(1.0, 0.3 * n_ph))
            c[k] = max(rng.uniform(0.1, 0.25), 1 - np.sin(np.pi / 2 * f) ** 2 - 0.15)
    t = rng.uniform(0, 20) + np.arange(n_ph) * rr / n_ph
    return np.round(t, 1), c, k_es


def plan(anat: A.Anatomy, rng: np.random.Generator, matrix_scale: float = 1.0) -> dict:
    """Random acquisition: slice geometry, FOV, matrix, in-plane rotation, coverage."""
    u = rng.uniform
    p = anat.p
    e1, e2, e3 = anat.frame
    thick = round(u(6, 10) * 2) / 2
    gap = 0.0 if rng.random() < 0.3 else round(u(0.5, 4), 1)
    sp = thick + gap
    # Slice normal: the long axis, imperfectly prescribed (up to 8 degrees off).
    tilt_axis = np.cross(e3, rng.normal(size=3))
    n = A._rot(tilt_axis, np.deg2rad(u(0, 8))) @ e3
    r0 = -e1 - (-e1 @ n) * n
    r0 /= np.linalg.norm(r0)
    c0 = np.cross(n, r0)                     # r0 x c0 = n: RV on the image left, anterior up
    th = np.deg2rad(u(-40, 40))
    r = np.cos(th) * r0 + np.sin(th) * c0
    c = -np.sin(th) * r0 + np.cos(th) * c0
    mirrored = bool(rng.random() < 0.2)       # some scanners' SAX views are mirrored
    if mirrored:
        c = -c
    # Coverage: 0-3 slices below the apex to 0-3 above the base, 8-16 slices.
    n_cov = int(np.ceil(p["zb0"] / sp))
    below, above = int(rng.integers(0, 4)), int(rng.integers(0, 4))
    S = int(np.clip(below + n_cov + above, 8, 16))
    z0 = -below * sp + u(-0.2, 0.6) * sp
    heights = z0 + sp * np.arange(S)
    # FOV / matrix.
    rows = int(rng.choice([112, 128, 128, 144, 144, 160, 176]) * matrix_scale) // 8 * 8
    cols = rows if rng.random() < 0.5 else int(rows * u(0.75, 0.95)) // 8 * 8
    ps = round(u(1.4, 2.1) / matrix_scale, 3)
    off = u(-0.07, 0.07, size=2) * ps * np.array([cols, rows])
    centers = anat.apex + heights[:, None] * n + off[0] * r + off[1] * c
    ipp = centers - (cols - 1) / 2 * ps * r - (rows - 1) / 2 * ps * c
    # Breath-hold mismatch: each slice is acquired in its own breath-hold, so the anatomy shifts
    # a few mm between slices (mostly head-foot) while the DICOM geometry stays nominal.
    sd = u(0.5, 2.5)
    shift = np.clip(rng.normal(size=(S, 3)) * sd * np.array([0.4, 0.4, 1.0]), -2 * sd, 2 * sd)
    return dict(thick=thick, gap=gap, sp=sp, n=n, r=r, c=c, mirrored=mirrored, S=S, rows=rows,
                cols=cols, ps=ps, ipp=ipp, heights=heights, below=below, above=above, shift=shift)


def _points(acq: dict) -> np.ndarray:
    """(S, N_SUB, H, W, 3) patient coordinates of every sub-slice pixel centre."""
    S, H, W, ps = acq["S"], acq["rows"], acq["cols"], acq["ps"]
    d = ((np.arange(N_SUB) + 0.5) / N_SUB - 0.5) * acq["thick"]
    j = np.arange(W, dtype=np.float32) * ps
    i = np.arange(H, dtype=np.float32) * ps
    base = (acq["ipp"][:, None, :] + d[None, :, None] * acq["n"])            # (S, N_SUB, 3)
    if "shift" in acq:  # the body moved by `shift` during this slice's breath-hold
        base = base - acq["shift"][:, None, :]
    plane = i[:, None, None] * acq["c"] + j[None, :, None] * acq["r"]          # (H, W, 3)
    return (base[:, :, None, None, :] + plane[None, None]).astype(np.float32)


def _bias(anat, acq, rng, pts_mid):
    """Coil sensitivity: anterior and posterior surface coils, 1 at the LV centre."""
    p = anat.p
    bc = anat.body_center
    coils = [(bc + np.array([rng.uniform(-20, 80), -p["ay"] - 30, anat.apex[2] - bc[2] + rng.uniform(0, 60)]),
              rng.uniform(110, 180), 1.0),
             (bc + np.array([rng.uniform(-40, 60), p["ay"] + 30, anat.apex[2] - bc[2] + rng.uniform(0, 60)]),
              rng.uniform(110, 180), rng.uniform(0.3, 0.8))]

    def field(q):
        b = 0.25
        for pos, s, g in coils:
            b = b + g * np.exp(-np.sum((q - pos) ** 2, axis=-1) / (2 * s * s))
        return b

    lv_c = anat.apex + anat.frame[2] * p["zb0"] * 0.5
    return (field(pts_mid) / field(lv_c[None])[0]).astype(np.float32)


def _kspace_filter(H, W, frac_r, frac_c):
    """Acquired k-space window (lower resolution than the display matrix, Tukey edges)."""
    def win(n, f):
        k = np.abs(np.fft.fftfreq(n)) * 2       # 0..1
        edge = f * 0.8
        w = np.where(k <= edge, 1.0, np.where(k <= f, 0.5 * (1 + np.cos(np.pi * (k - edge) / (f - edge))), 0.0))
        return w
    return np.outer(win(H, frac_r), win(W, frac_c)).astype(np.float32)


def render_subject(seed: int, index: int, matrix_scale: float = 1.0) -> SubjectData:
    """Subject `index` of the cohort with this seed; depends only on (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index), 0x5AC])
    anat = A.sample_anatomy(rng)
    acq = plan(anat, rng, matrix_scale)
    times, cvals, k_es = _cine(rng)
    S, H, W = acq["S"], acq["rows"], acq["cols"]
    pts = _points(acq).reshape(-1, 3)
    body = A.body_labels(anat, pts)
    h = A.to_heart(anat, pts)
    # Only points near the heart need the (per-phase) heart model.
    reach = 2.6 * anat.p["a_o"] + 20
    near = np.flatnonzero((h[:, 0] ** 2 + h[:, 1] ** 2 < reach ** 2) & (h[:, 2] > -15)
                          & (h[:, 2] < anat.p["zb0"] + 80))
    hn, bn = h[near], body[near]
    static = A.heart_static(anat, hn)
    w = (SUB_WEIGHTS / SUB_WEIGHTS.sum()).astype(np.float32)[None, :, None, None]
    sig = anat.signal
    mid = _points(dict(acq, thick=0.0)).reshape(S, N_SUB, H, W, 3)[:, 0]
    bias = _bias(anat, acq, rng, mid)                                     # (S, H, W)
    filt = _kspace_filter(H, W, rng.uniform(0.55, 0.85), rng.uniform(0.5, 0.85))
    snr = rng.uniform(12, 35)
    sigma_k = (1.0 / snr) * H * W / np.sqrt(np.sum(filt ** 2))
    texture = 1 + 0.06 * _smooth_noise(rng, (S, H, W))
    P = len(times)
    imgs = np.empty((P, S, H, W), np.float32)
    pool = np.empty((P, S))
    masks = {}
    for k in range(P):
        lab = body.copy()
        lab[near] = A.heart_labels(anat, hn, float(cvals[k]), bn, static)
        lab = lab.reshape(S, N_SUB, H, W)
        obj = np.sum(sig[lab] * w, axis=1)
        lv = np.sum((lab == A.LV_BLOOD) * w, axis=1)
        pool[k] = np.sum(lv >= 0.5, axis=(1, 2)) * acq["ps"] ** 2
        for ph in (ph for ph, f in (("ED", 0), ("ES", k_es)) if f == k):
            masks[ph] = _mask(lab, w)
        kspace = np.fft.fft2(obj * bias * texture)
        noise = rng.standard_normal((2,) + kspace.shape, dtype=np.float32) * np.float32(sigma_k)
        kspace += noise[0] + 1j * noise[1]
        imgs[k] = np.abs(np.fft.ifft2(kspace * filt))
    # Scanner scaling to uint16, sometimes with a non-trivial rescale.
    scale = rng.uniform(400, 2500)
    slope, intercept = (1.0, 0.0) if rng.random() < 0.7 else (round(rng.uniform(0.25, 4.0), 4), 0.0)
    pixels = np.clip(np.round(imgs * scale / slope), 0, 65535).astype(np.uint16)
    labels = {ph: _labels(pool[f]) for ph, f in (("ED", 0), ("ES", k_es))}
    iop = np.concatenate([acq["r"], acq["c"]])
    dic = dict(sliceloc_sign=int(rng.choice([-1, 1])), shuffled_instances=bool(rng.random() < 0.3),
               reversed_instances=bool(rng.random() < 0.5), mirrored=acq["mirrored"],
               name_seed=int(rng.integers(2 ** 62)))
    return SubjectData(subject=f"syn{index:04d}", pixels=pixels, slope=slope, intercept=intercept,
                       ipp=acq["ipp"], iop=iop, pixel_spacing=(acq["ps"], acq["ps"]),
                       thickness=acq["thick"], spacing=acq["sp"], trigger_times=times,
                       frames={"ED": 0, "ES": k_es}, labels=labels, pool_mm2=pool, masks=masks,
                       shift=acq["shift"], dicom=dic, anatomy=anat)


def _mask(lab: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(S, H, W) mask class per pixel from the sub-slice tissues `lab` (S, N_SUB, H, W): the class
    whose tissues cover at least half of the slice-profile weight `w` (the pool rule; no two
    classes can: no subset of SUB_WEIGHTS holds exactly half)."""
    out = np.zeros((lab.shape[0],) + lab.shape[2:], np.uint8)
    for cls, tissues in enumerate(MASK_TISSUES, start=1):
        out[np.sum(np.isin(lab, tissues) * w, axis=1) >= 0.5] = cls
    return out


def _labels(pool_mm2: np.ndarray) -> list[str]:
    """The paper's definitions on the rendered slices: LV blood pool visible -> IN; apical side
    without it -> OAP; basal side -> OBS (at most a crescent of myocardium, atria, vessels)."""
    has = np.flatnonzero(pool_mm2 >= MIN_POOL_MM2)
    if has.size == 0:
        raise RuntimeError("phantom: no slice cuts the LV blood pool (generator bug)")
    lo, hi = has[0], has[-1]
    return ["OAP"] * lo + ["IN"] * (hi - lo + 1) + ["OBS"] * (len(pool_mm2) - hi - 1)


def _smooth_noise(rng, shape):
    """Low-frequency multiplicative texture (tissue inhomogeneity), unit-ish amplitude."""
    S, H, W = shape
    g = rng.standard_normal((S, 6, 6)).astype(np.float32)
    yi = np.linspace(0, 5, H)
    xi = np.linspace(0, 5, W)
    y0 = np.clip(np.floor(yi).astype(int), 0, 4)
    x0 = np.clip(np.floor(xi).astype(int), 0, 4)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    a = g[:, y0][:, :, x0]
    b = g[:, y0][:, :, x0 + 1]
    c = g[:, y0 + 1][:, :, x0]
    d = g[:, y0 + 1][:, :, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx).astype(np.float32)
