"""How far the built-in phantom is from real ACDC slices, as a frozen ImageNet network sees them.

    python benchmarks/realism.py [--subjects 20] [--seed 0] [--shared ../shared] [--beyond]

The same measure as `../shared/tools/realism_probe.py`: `stackcls synth`-equivalent cohort
(phantom.generate), real ACDC stacks (the first 2 x N of ../shared/data/acdc, ED and ES), every slice
windowed 1-99 %, resized to 224 px, grey to RGB, Keras MobileNet 0.25 ImageNet features (avg pool),
then a standardised logistic regression (C=0.1) with subject-level 5-fold CV. 0.5 = indistinguishable.
Printed beside the same probe on real data: ACDC vs another hospital 0.88, ACDC train vs test 0.69.
Two finer readings of our own, which still move while the probe reads 1.000: the accuracy of a far
more regularised probe (C=1e-4) and how many single features alone separate the two (AUC > 0.9).
--beyond measures the other route instead (preprocess/beyond.py): the slices made past the apex
and the base of every ACDC stack against ACDC's real slices past them (its OAP and OBS slices),
the same features and probe, scored as balanced accuracy (the made slices outnumber the real). Only
the slices made by erasing count: an end slice already past the heart is copied as it is. Beside it
the control: the phantom's slices past the ends (--subjects of them) against the same real ones,
which the probe must still tell apart.
--crop F adds a control of the probe itself: the same real slices against their own centre crops
(a share F of each side), so nothing but the field of view differs.
Needs keras (JAX backend), scikit-learn and ../shared (data/acdc, weights); skips without them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (("ACDC vs another hospital (real)", 0.88), ("ACDC train vs test patients", 0.69))
WEIGHTS = "weights/mobilenet_2_5_224_tf_no_top.h5"


def _slices(stacks, tag):
    import numpy as np
    from PIL import Image
    X, g = [], []
    for i, s in enumerate(stacks):
        for im in np.asarray(s.images, np.float32):
            lo, hi = np.percentile(im, [1, 99])
            im = np.clip((im - lo) / max(hi - lo, 1e-6), 0, 1)
            im = np.asarray(Image.fromarray((im * 255).astype(np.uint8)).resize((224, 224), Image.BILINEAR),
                            np.float32)
            X.append(np.repeat(im[..., None], 3, -1) / 127.5 - 1.0)
            g.append(f"{tag}{getattr(s, 'subject', i)}")
    return np.stack(X), g


def _crop(stacks, f: float) -> list:
    from stackcls.stack import Stack
    out = []
    for st in stacks:
        H, W = st.images.shape[1:]
        h, w = int(H * f), int(W * f)
        a, b = (H - h) // 2, (W - w) // 2
        out.append(Stack(images=st.images[:, a:a + h, b:b + w], sources=["-"] * st.n_slices,
                         subject=st.subject, phase=st.phase))
    return out


def measure(n: int, seed: int, shared: Path, crop: float | None = None) -> dict:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    import keras
    import stackcls
    from stackcls.phantom import generate

    real = stackcls.load_stacks(shared / "data" / "acdc")[: 2 * n]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        summary = generate(Path(d), n, seed, progress=False)
        syn = stackcls.load_stacks(Path(d) / "dicom")
    gen_s = time.perf_counter() - t0
    net = keras.applications.MobileNet(alpha=0.25, include_top=False, pooling="avg",
                                       input_shape=(224, 224, 3), weights=str(shared / WEIGHTS))
    Xr, gr = _slices(real, "r")
    Xs, gs = _slices(syn, "s")
    F = np.asarray(net.predict(np.concatenate([Xr, Xs]), batch_size=64, verbose=0))
    y = np.r_[np.zeros(len(Xr)), np.ones(len(Xs))]
    groups = np.array(gr + gs)

    auc = np.array([roc_auc_score(y, F[:, j]) if F[:, j].std() > 0 else 0.5 for j in range(F.shape[1])])
    auc = np.maximum(auc, 1 - auc)
    cropped = None
    if crop:
        Xc, gc = _slices(_crop(real, crop), "c")
        Fc = np.asarray(net.predict(Xc, batch_size=64, verbose=0))
        cropped = _probe(np.concatenate([F[:len(Xr)], Fc]), np.r_[np.zeros(len(Xr)), np.ones(len(Xc))],
                         np.array(gr + gc))
    return dict(cropped=cropped, probe=_probe(F, y, groups), probe_c1e4=_probe(F, y, groups, C=1e-4),
                features_auc90=int((auc > 0.9).sum()),
                n_features=int(F.shape[1]), real=len(Xr), synthetic=len(Xs),
                generate_s=round(gen_s, 1), generate_workers=summary["workers"])


def _probe(F, y, groups, C=0.1, scoring="accuracy") -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=C))
    return float(cross_val_score(pipe, F, y, groups=groups, cv=GroupKFold(5), scoring=scoring).mean())


def measure_beyond(n: int, seed: int, shared: Path) -> dict:
    import numpy as np
    import keras
    import stackcls
    from stackcls.phantom import generate
    from stackcls.preprocess.beyond import beyond_slices, extended
    from stackcls.stack import Stack

    acdc = shared / "data" / "acdc"
    stacks = stackcls.load_stacks(acdc, labels=acdc / "labels.csv")

    def part(st, keep, name):
        return Stack(images=st.images[keep], sources=["-"] * int(keep.sum()), subject=st.subject,
                     phase=name)

    real = [part(s, np.isin(s.labels, ("OAP", "OBS")), "real") for s in stacks
            if s.labels and set(s.labels) != {"IN"}]
    made = []
    for _, e in extended(stacks, 1.0, seed=seed):
        a, b = e.meta["beyond"]
        ends = np.r_[[a] * a, np.arange(a, e.n_slices - b), [e.n_slices - b - 1] * b]
        # an end slice already past the heart is copied as it is: only the slices made by erasing
        erased = beyond_slices(e) & ~np.array([np.array_equal(e.images[i], e.images[j])
                                               for i, j in enumerate(ends)])
        if erased.any():
            made.append(part(e, erased, "made"))
    # the control: the phantom's slices past the ends, which the probe should still tell apart
    with tempfile.TemporaryDirectory() as d:
        generate(Path(d), n, seed, progress=False)
        syn = stackcls.load_stacks(Path(d) / "dicom", labels=Path(d) / "labels.csv")
    drawn = [part(s, np.isin(s.labels, ("OAP", "OBS")), "drawn") for s in syn
             if s.labels and set(s.labels) != {"IN"}]
    net = keras.applications.MobileNet(alpha=0.25, include_top=False, pooling="avg",
                                       input_shape=(224, 224, 3), weights=str(shared / WEIGHTS))
    (Xr, gr), (Xm, gm), (Xd, gd) = _slices(real, "r"), _slices(made, "m"), _slices(drawn, "d")
    F = np.asarray(net.predict(np.concatenate([Xr, Xm, Xd]), batch_size=64, verbose=0))
    r, m = len(Xr), len(Xm)

    def against_real(F2, n2, g2):
        return _probe(np.concatenate([F[:r], F2]), np.r_[np.zeros(r), np.ones(n2)], np.array(gr + g2),
                      scoring="balanced_accuracy")

    return dict(probe=against_real(F[r:r + m], m, gm), control=against_real(F[r + m:], len(Xd), gd),
                real=r, made=m, drawn=len(Xd), real_patients=len({s.subject for s in real}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--beyond", action="store_true",
                   help="the slices made past the ends of real stacks, against real ones")
    p.add_argument("--crop", type=float, default=None,
                   help="control: the real slices against their own centre crops (this share of a side)")
    a = p.parse_args(argv)
    if not (a.shared / "data" / "acdc").is_dir() or not (a.shared / WEIGHTS).is_file():
        print(f"skipped: {a.shared} has no data/acdc or {WEIGHTS} (the real side of the probe)")
        return 0
    try:
        import keras  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (the probe needs keras and scikit-learn)")
        return 0
    if a.beyond:
        r = measure_beyond(a.subjects, a.seed, a.shared)
        print(f"made past the ends by erasing: {r['made']} slices of the ACDC stacks (seed {a.seed}) "
              f"against the {r['real']} real OAP/OBS slices of {r['real_patients']} patients")
        print(f"  {'probe, balanced accuracy (0.5 = indistinguishable)':56s} {r['probe']:.3f}")
        print(f"  {'control: the phantom past the ends (%d slices)' % r['drawn']:56s} {r['control']:.3f}")
        for name, v in REFERENCE:
            print(f"  {name:56s} {v:.3f}   (reference)")
        return 0
    r = measure(a.subjects, a.seed, a.shared, a.crop)
    print(f"phantom: {a.subjects} subjects (seed {a.seed}), {r['synthetic']} slices against "
          f"{r['real']} real ACDC slices; generated and read in {r['generate_s']} s "
          f"({r['generate_workers']} workers)")
    print(f"{'probe (subject-level CV accuracy, 0.5 = indistinguishable)':64s}")
    print(f"  {'phantom vs real ACDC':40s} {r['probe']:.3f}")
    for name, v in REFERENCE:
        print(f"  {name:40s} {v:.3f}   (reference)")
    if r["cropped"] is not None:
        print(f"  {'control: real vs its %g centre crops' % a.crop:40s} {r['cropped']:.3f}")
    print(f"  {'target / stretch':40s} 0.880 / 0.750")
    print(f"finer readings: C=1e-4 probe {r['probe_c1e4']:.3f}; single features with AUC > 0.9: "
          f"{r['features_auc90']} of {r['n_features']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
