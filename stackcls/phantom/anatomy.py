"""3-D anatomy of the synthetic subjects: tissue labels as a function of position and cardiac phase.

Two frames are used. Patient coordinates are DICOM LPS in mm (x to the patient's left, y posterior,
z head). The heart frame has its origin at the end-diastolic epicardial apex of the LV, z along the
long axis towards the base, x towards the RV (septum) and y anterior (x, y, z right-handed).
Thorax and abdomen are fixed in patient coordinates; the heart contracts in its own frame: the apex
stays put, the base descends towards it, the cavity shrinks and the wall thickens (ED c=0 ->
ES c=1). Everything is a closed-form implicit shape evaluated on flat point arrays, so a whole stack
(all slices, sub-slices and pixels) is labelled with a few vectorised numpy passes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Tissue ids (uint8) and their bSSFP-like signal (blood and fat bright, muscle dark, lung black).
AIR, LUNG, FAT, MUSCLE, LV_MYO, LV_BLOOD, RV_BLOOD, RV_MYO, ATRIAL_BLOOD, VESSEL_BLOOD, \
    VESSEL_WALL, LIVER, STOMACH, SPLEEN, MARROW, CORTEX, CSF, SOFT, PAPILLARY, ABDOMEN = range(20)
TISSUES = ("air", "lung", "fat", "muscle", "lv_myo", "lv_blood", "rv_blood", "rv_myo",
           "atrial_blood", "vessel_blood", "vessel_wall", "liver", "stomach", "spleen", "marrow",
           "cortex", "csf", "soft", "papillary", "abdomen")
SIGNAL = np.array([0.0, 0.035, 0.82, 0.22, 0.26, 1.0, 0.95, 0.27, 0.9, 0.93,
                   0.3, 0.33, 0.75, 0.45, 0.5, 0.08, 0.95, 0.3, 0.28, 0.4], np.float32)

LAI = np.array([1.0, -1.0, -1.0]) / np.sqrt(3.0)  # typical apex direction in LPS


@dataclasses.dataclass
class Anatomy:
    """All random parameters of one subject (mm, patient LPS unless noted)."""
    group: str              # "NOR", "DCM" or "HCM": changes size, wall and ejection fraction
    apex: np.ndarray        # (3,) ED epicardial apex, patient coords
    frame: np.ndarray       # (3, 3) rows e1 (to RV), e2 (anterior), e3 (apex -> base)
    body_center: np.ndarray  # (3,)
    p: dict                 # scalar shape parameters (see sample_anatomy)
    signal: np.ndarray      # (n_tissues,) per-subject signal table
    fat_waves: np.ndarray   # (3, 4): wave vectors (mm^-1) and phases of the fat-patch field
    vessel_waves: np.ndarray  # (8, 4): pairs of plane waves whose crests cross in thin tubes
    trab_waves: np.ndarray  # (3, 4): fine field (6-10 mm) for apical trabeculae


def _rot(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    group = rng.choice(["NOR", "NOR", "NOR", "DCM", "HCM"])
    p: dict = {}
    # LV at end-diastole.
    if group == "DCM":
        a_o, wall, ef, d_base = u(36, 44), u(6, 8.5), u(0.15, 0.4), u(4, 9)
    elif group == "HCM":
        a_o, wall, ef, d_base = u(31, 37), u(12, 17), u(0.6, 0.75), u(7, 13)
    else:
        a_o, wall, ef, d_base = u(30, 36), u(7.5, 10.5), u(0.5, 0.7), u(9, 16)
    zb0 = u(78, 98) + (10 if group == "DCM" else 0)          # LV length, apex to base plane
    p.update(a_o=a_o, wall=wall, ef=ef, d_base=d_base, zb0=zb0,
             c_o=zb0 - u(0, 12),                            # spheroid semi-long axis
             t_apex=u(4, 7) if group != "HCM" else u(8, 12),  # thin apical wall
             ecc=u(0.92, 1.06),                             # septal flattening
             tilt=u(3, 10),                                 # lateral base higher than septal
             pap_angles=np.deg2rad([u(120, 160), u(215, 250)]),
             pap_r=u(3.0, 5.0), pap_rho=u(0.45, 0.65))
    # RV wrapped around the septum (ratios keep it a crescent that hugs the LV).
    p.update(x_rv=a_o * u(0.5, 0.75), rx_rv=a_o * u(1.3, 1.65), ry_rv=a_o * u(1.0, 1.25),
             y_rv=a_o * u(-0.12, 0.1), z_rv_apex=zb0 * u(0.18, 0.35), dz_rv=u(0, 6),
             t_rv=u(2.5, 4.0), s_rv=u(0.7, 0.88) if group != "DCM" else u(0.85, 0.95))
    # Atria and great vessels above the base (heart frame, scaled by the LV size).
    p.update(la=np.array([a_o * u(0.9, 1.2), a_o * u(0.7, 0.9), a_o * u(0.8, 1.1)]),
             la_c=np.array([-a_o * u(0.05, 0.3), -a_o * u(0.3, 0.6)]),
             ra=np.array([a_o * u(0.8, 1.0), a_o * u(0.7, 0.9), a_o * u(0.8, 1.1)]),
             ra_dx=a_o * u(0.3, 0.6), ra_dy=-a_o * u(0.2, 0.45),
             ao_r=u(11, 15), ao_p=np.array([a_o * u(0.15, 0.35), a_o * u(0.15, 0.35), -a_o * u(0.2, 0.4)]),
             ao_d=np.array([u(0.1, 0.4), u(0.15, 0.45), 1.0]),
             pa_r=u(11, 14), pa_p=np.array([a_o * u(0.9, 1.3), a_o * u(0.6, 0.9), -a_o * u(0.3, 0.5)]),
             pa_d=np.array([-u(0.2, 0.5), u(0.3, 0.6), 1.0]),
             fat_margin=u(2, 6), fat_level=u(0.2, 1.4))
    # Heart orientation: long axis (apex direction) around left-anterior-inferior, jittered.
    jitter_axis = np.cross(LAI, rng.normal(size=3))
    udir = _rot(jitter_axis, np.deg2rad(u(0, 20))) @ LAI
    e3 = -udir
    to_rv = np.array([-1.0, -1.0, 0.0])                      # RV: right and anterior of the LV
    e1 = to_rv - (to_rv @ e3) * e3
    e1 /= np.linalg.norm(e1)
    e1 = _rot(e3, np.deg2rad(u(-20, 20))) @ e1
    e2 = np.cross(e3, e1)                                     # anterior(-superior-left)
    frame = np.stack([e1, e2, e3])
    # Body: elliptic thorax, LV base centre left of midline and anterior.
    base_c = np.array([u(0, 30), u(-12, 12), 0.0])
    apex = base_c + zb0 * udir
    ax_b, ay_b = u(140, 185), u(95, 125)
    p.update(ax=ax_b, subcut=u(4, 15), wall_mm=u(8, 15))
    # Make sure the heart (RV anterior extent included) fits inside the chest wall.
    front = min(apex[1], base_c[1] - 1.4 * a_o - 10 * abs(e2[1]))
    ay_b = max(ay_b, -front + p["subcut"] + p["wall_mm"] + u(5, 20))
    p["ay"] = ay_b
    # Diaphragm: two domes, the left one just under the apex, the right one higher (liver).
    R = u(150, 250)
    hl = apex[2] - u(12, 30) + ((apex[0] - 60) ** 2 + apex[1] ** 2) / (2 * R)
    p.update(dome_r=R, dome_hl=hl, dome_hr=hl + u(0, 15), liver_x=u(30, 70),
             stomach_signal=u(0.08, 0.85))
    sig = SIGNAL * rng.uniform(0.9, 1.1, size=SIGNAL.shape).astype(np.float32)
    sig[STOMACH] = p["stomach_signal"]
    sig[[ATRIAL_BLOOD, VESSEL_BLOOD, RV_BLOOD]] = sig[LV_BLOOD] * rng.uniform(0.85, 1.0, 3)
    # Fat patches: a smooth random field (wavelengths 20-40 mm) thresholded.
    k = rng.normal(size=(3, 3))
    k *= (2 * np.pi / rng.uniform(20, 40, size=(3, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    waves = np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(3, 1))], axis=1)
    global_shift = rng.uniform(-40, 40, size=3)
    return Anatomy(group=str(group), apex=apex + global_shift, frame=frame,
                   body_center=np.array([0.0, 0.0, 0.0]) + global_shift, p=p, signal=sig,
                   fat_waves=waves, vessel_waves=_waves(rng, 8, 40, 75), trab_waves=_waves(rng, 3, 6, 10))


def _waves(rng, n, lo, hi):
    k = rng.normal(size=(n, 3))
    k *= (2 * np.pi / rng.uniform(lo, hi, size=(n, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, size=(n, 1))], axis=1).astype(np.float32)


def _tubes(q: np.ndarray, waves: np.ndarray, thr: float = 0.985) -> np.ndarray:
    """A network of thin straight tubes (pulmonary / hepatic vessels) at points q (N, 3): where the
    crests of two plane-wave families cross."""
    out = np.zeros(len(q), bool)
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    for j in range(0, len(waves), 2):
        w, v = waves[j], waves[j + 1]
        a = np.abs(np.cos(x * w[0] + y * w[1] + z * w[2] + w[3])) > thr
        a &= np.abs(np.cos(x * v[0] + y * v[1] + z * v[2] + v[3])) > thr
        # Cut the straight tubes into segments (~25-45 mm period along the tube).
        t = np.cross(w[:3], v[:3])
        t *= 2 * np.pi / (35.0 * np.linalg.norm(t))
        a &= np.cos(x * t[0] + y * t[1] + z * t[2] + w[3] + v[3]) > 0.2
        out |= a
    return out


def phase_shape(anat: Anatomy, c: float) -> dict:
    """Phase-dependent LV/RV sizes. c = 0 at end-diastole, 1 at end-systole."""
    p = anat.p
    zb0 = p["zb0"]
    s_long = 1.0 - c * p["d_base"] / zb0                   # apex fixed, base descends
    a_o, wall = p["a_o"], p["wall"]
    a_i = a_o - wall
    cav_len = zb0 - p["t_apex"]
    # End-systolic cavity: volume * (1 - EF) with the shorter long axis; myocardial volume kept.
    cav_len_es = zb0 * (1 - p["d_base"] / zb0) - p["t_apex"] * 1.2
    a_i_es = a_i * np.sqrt((1 - p["ef"]) * cav_len / cav_len_es)
    a_o_es = np.sqrt(a_i_es ** 2 + (a_o ** 2 - a_i ** 2) * zb0 / (zb0 - p["d_base"]))
    return dict(s_long=s_long,
                a_i=a_i + c * (a_i_es - a_i),
                a_o=a_o + c * (a_o_es - a_o),
                t_apex=p["t_apex"] * (1 + 0.2 * c),
                s_rv=1 - c * (1 - p["s_rv"]),
                s_atria=1 + 0.15 * c)


def to_heart(anat: Anatomy, pts: np.ndarray) -> np.ndarray:
    """(N, 3) patient coords -> (N, 3) heart-frame coords (float32)."""
    q = pts - anat.apex.astype(np.float32)
    f = anat.frame.astype(np.float32)
    out = np.empty_like(q)
    for k in range(3):  # explicit: numpy's (N, 3) @ (3, 3) is surprisingly slow
        out[:, k] = q[:, 0] * f[k, 0] + q[:, 1] * f[k, 1] + q[:, 2] * f[k, 2]
    return out


def _tube(x, y, z, origin, direction, radius, length):
    """Squared distance / radius^2 to a finite straight tube, inf outside its length."""
    d = np.asarray(direction, float)
    d = (d / np.linalg.norm(d)).astype(np.float32)
    origin = np.asarray(origin, np.float32)
    rx, ry, rz = x - origin[0], y - origin[1], z - origin[2]
    t = rx * d[0] + ry * d[1] + rz * d[2]
    q = (rx * rx + ry * ry + rz * rz - t * t) / radius ** 2
    return np.where((t >= 0) & (t <= length), q, np.inf)


def heart_static(anat: Anatomy, h: np.ndarray) -> dict:
    """The phase-independent part of the heart model at heart-frame points h (N, 3): the patchy
    fat field and the great vessels (their motion over the cycle is negligible here)."""
    p = anat.p
    x, y, z = h[:, 0], h[:, 1], h[:, 2]
    w = anat.fat_waves.astype(np.float32)
    field = sum(np.cos(x * w[i, 0] + y * w[i, 1] + z * w[i, 2] + w[i, 3]) for i in range(3))
    zb0 = p["zb0"]
    q_ao = _tube(x, y, z, p["ao_p"] + np.array([0.0, 0.0, zb0]), p["ao_d"], p["ao_r"], 110.0)
    q_pa = _tube(x, y, z, p["pa_p"] + np.array([0.0, 0.0, zb0]), p["pa_d"], p["pa_r"], 70.0)
    t = anat.trab_waves
    trab = sum(np.cos(x * t[i, 0] + y * t[i, 1] + z * t[i, 2] + t[i, 3]) for i in range(3)) > 1.3
    return dict(fat=field > p["fat_level"], q_ao=q_ao, q_pa=q_pa, trab=trab)


def heart_labels(anat: Anatomy, h: np.ndarray, c: float, base: np.ndarray,
                 static: dict | None = None) -> np.ndarray:
    """Tissue ids at heart-frame points h (N, 3) for phase c, drawn over `base` (body labels).
    Atria and vessels are evaluated only near and above the base, ventricles only inside their
    bounding box: most points of a stack need neither."""
    p, s = anat.p, phase_shape(anat, c)
    st = heart_static(anat, h) if static is None else static
    lab = base.copy()
    z = h[:, 2] * np.float32(1.0 / s["s_long"])             # normalised long-axis coordinate
    x, y = h[:, 0], h[:, 1]
    zb0, m = p["zb0"], p["fat_margin"]
    up = np.flatnonzero(z > zb0 - p["tilt"] - 12)
    if up.size:
        lab[up] = _upper(anat, s, h[up], z[up], lab[up], {k: v[up] for k, v in st.items()})
    reach = m + 14
    rv_x = p["x_rv"] + p["rx_rv"] + p["t_rv"] + reach
    rv_y = max(s["a_o"], p["ry_rv"] + abs(p["y_rv"])) + p["t_rv"] + reach
    lo = np.flatnonzero((z < zb0 + p["tilt"] + p["dz_rv"] + reach) & (x > -s["a_o"] * p["ecc"] - reach)
                        & (x < rv_x) & (np.abs(y) < rv_y))
    if lo.size:
        lab[lo] = _lower(anat, s, c, h[lo], z[lo], lab[lo], st["fat"][lo], st["trab"][lo])
    return lab


def _upper(anat, s, h, z, lab, st):
    """Atria (filling while the ventricles empty) and great vessels above the base."""
    p = anat.p
    x, y = h[:, 0], h[:, 1]
    zb0 = p["zb0"]
    zb = zb0 - p["tilt"] / p["a_o"] * x
    la, ra = p["la"] * s["s_atria"], p["ra"] * s["s_atria"]
    rho_la = ((x - p["la_c"][0]) / la[0]) ** 2 + ((y - p["la_c"][1]) / la[1]) ** 2 + \
        ((z - zb0 - 0.75 * la[2]) / la[2]) ** 2
    rho_ra = ((x - p["x_rv"] - p["ra_dx"]) / ra[0]) ** 2 + ((y - p["ra_dy"]) / ra[1]) ** 2 + \
        ((z - zb0 - 0.7 * ra[2]) / ra[2]) ** 2
    q_ao, q_pa = st["q_ao"], st["q_pa"]
    m = p["fat_margin"]
    near = (rho_la < 1.25) | (rho_ra < 1.25) | (q_ao < (1 + m / p["ao_r"]) ** 2) | \
        (q_pa < (1 + m / p["pa_r"]) ** 2)
    lab[near] = np.where(st["fat"][near], FAT, SOFT)
    lab[(rho_la < 1.12) & (z > zb)] = VESSEL_WALL
    lab[(rho_la < 1) & (z > zb + 1)] = ATRIAL_BLOOD
    ra_top = z > zb0 + p["dz_rv"]
    lab[(rho_ra < 1.12) & ra_top] = VESSEL_WALL
    lab[(rho_ra < 1) & ra_top] = ATRIAL_BLOOD
    for q, r in ((q_ao, p["ao_r"]), (q_pa, p["pa_r"])):
        lab[q < (1 + 2.0 / r) ** 2] = VESSEL_WALL
        lab[q < 1] = VESSEL_BLOOD
    return lab


_ATRIA_VESSELS = np.zeros(256, bool)
_ATRIA_VESSELS[[ATRIAL_BLOOD, VESSEL_BLOOD, VESSEL_WALL]] = True


def _lower(anat, s, c, h, z, lab, fat, trab):
    """LV and RV (with their epicardial fat), drawn over the atria/vessels near the base."""
    p = anat.p
    x, y = h[:, 0], h[:, 1]
    zb0, zc = p["zb0"], p["c_o"]
    zb = zb0 - p["tilt"] / p["a_o"] * x                      # tilted base plane (mitral annulus)
    below = z < zb
    ex = 1.0 / p["ecc"] ** 2
    r2 = x * x * ex + y * y                                   # squared (eccentric) radius
    rho_o = r2 / s["a_o"] ** 2 + ((z - zc) / zc) ** 2
    inner_c = zc - s["t_apex"] / s["s_long"]
    rho_i = r2 / s["a_i"] ** 2 + ((z - zc) / inner_c) ** 2
    # RV ellipsoid, widest at the base; the free wall moves in, the septum stays.
    rz_rv = zb0 - p["z_rv_apex"]
    rx, ry = p["rx_rv"] * s["s_rv"], p["ry_rv"] * s["s_rv"]
    xr = x - (p["x_rv"] + (1 - s["s_rv"]) * p["rx_rv"] * 0.5)
    yr = y - p["y_rv"]
    rv_top = z < zb0 + p["dz_rv"]
    t = p["t_rv"]
    zr = z - zb0
    rho_rv = (xr / rx) ** 2 + (yr / ry) ** 2 + (zr / rz_rv) ** 2
    rho_rv_wall = (xr / (rx + t)) ** 2 + (yr / (ry + t)) ** 2 + (zr / (rz_rv + t)) ** 2
    # Epicardial / pericardial fat: a patchy band (not over the atria and vessels above the base).
    m = p["fat_margin"]
    free = ~_ATRIA_VESSELS[lab]
    near = free & (((rho_o < (1 + m / s["a_o"]) ** 2) & (z < zb + m)) |
                   ((rho_rv_wall < (1 + m / ry) ** 2) & rv_top))
    lab[near] = np.where(fat[near], FAT, SOFT)
    lab[free & (np.abs(z - zb) < 6) & (rho_o < (1 + 12 / s["a_o"]) ** 2)] = FAT   # AV groove
    lab[(rho_rv_wall < 1) & rv_top] = RV_MYO
    lab[(rho_rv < 1) & rv_top] = RV_BLOOD
    lab[(rho_o < 1) & below] = LV_MYO
    cavity = (rho_i < 1) & below
    lab[cavity] = LV_BLOOD
    # Apical trabeculae: fine dark strands along the endocardium of the apical half.
    lab[cavity & trab & (rho_i > 0.8) & (z < 0.45 * zb0)] = PAPILLARY
    # Papillary muscles: two columns in the mid cavity, thicker at end-systole.
    zc_ok = cavity & (z > 0.3 * zb0) & (z < 0.68 * zb0)
    r = p["pap_r"] * (1 + 0.3 * c)
    for ang in p["pap_angles"]:
        px = np.cos(ang) * p["pap_rho"] * s["a_i"]
        py = np.sin(ang) * p["pap_rho"] * s["a_i"]
        lab[zc_ok & ((x - px) ** 2 + (y - py) ** 2 < r * r)] = PAPILLARY
    return lab


def body_labels(anat: Anatomy, pts: np.ndarray) -> np.ndarray:
    """Tissue ids of the static thorax/abdomen at patient points (N, 3)."""
    p = anat.p
    q = pts - anat.body_center
    x, y, z = q[:, 0].astype(np.float32), q[:, 1].astype(np.float32), q[:, 2].astype(np.float32)
    ax, ay = p["ax"], p["ay"]
    lab = np.full(x.shape, AIR, np.uint8)

    def ell(dx):
        return (x / (ax - dx)) ** 2 + (y / (ay - dx)) ** 2 < 1

    inside = ell(0)
    lab[inside] = FAT
    lab[ell(p["subcut"])] = MUSCLE
    cavity = ell(p["subcut"] + p["wall_mm"])
    R = p["dome_r"]
    dome = np.maximum(p["dome_hl"] - ((x - 60) ** 2 + y ** 2) / (2 * R),
                      p["dome_hr"] - ((x + 60) ** 2 + y ** 2) / (2 * R))
    thorax = cavity & (z > dome)
    abdo = cavity & ~thorax
    lab[thorax] = LUNG
    lab[abdo] = ABDOMEN
    # Bowel and mesenteric fat: patchy.
    w = anat.fat_waves
    idx = np.flatnonzero(abdo)
    xa, ya, za = x[idx], y[idx], z[idx]
    patch = sum(np.cos(xa * w[i, 0] + ya * w[i, 1] + za * w[i, 2] + w[i, 3]) for i in range(3)) > 0.8
    lab[idx[patch]] = FAT
    zl = p["dome_hl"]
    stomach = ((x - 70) / 45) ** 2 + ((y + 5) / 35) ** 2 + ((z - zl + 60) / 40) ** 2 < 1
    spleen = ((x - 95) / 30) ** 2 + ((y - 45) / 30) ** 2 + ((z - zl + 50) / 50) ** 2 < 1
    liver = x < p["liver_x"] - 0.4 * y
    lab[abdo & liver] = LIVER
    # Vessels: bright tubes through the lungs and the liver.
    idx = np.flatnonzero(thorax | (abdo & liver))
    lab[idx[_tubes(q[idx].astype(np.float32), anat.vessel_waves)]] = VESSEL_BLOOD
    lab[abdo & spleen] = SPLEEN
    lab[abdo & stomach] = STOMACH
    # Mediastinum (anterior fat strip and the posterior structures around the spine); these are
    # small, so only the points in their box are tested.
    spine_y = ay - 50
    post = np.flatnonzero(inside & (y > spine_y - 45) & (np.abs(x) < 50))
    px, py, sub = x[post], y[post] - spine_y, lab[post]
    sub[(sub == LUNG) & (np.abs(px) < 30) & (py > -30)] = SOFT
    sub[(np.abs(px) < 48) & (py > -5)] = MUSCLE
    r2 = px ** 2 + py ** 2
    sub[r2 < 18 ** 2] = CORTEX
    sub[r2 < 16 ** 2] = MARROW
    r2c = px ** 2 + (py - 27) ** 2
    sub[r2c < 9 ** 2] = CORTEX
    sub[r2c < 7 ** 2] = CSF
    r2a = (px - 28) ** 2 + (py + 20) ** 2
    sub[r2a < 13 ** 2] = VESSEL_WALL
    sub[r2a < 11 ** 2] = VESSEL_BLOOD
    lab[post] = sub
    return lab
