"""Montage of synthetic stacks (end-diastole, apex -> base) beside a real ACDC stack, for judging
the phantom's realism by eye.

    python -m stackcls.phantom.montage --out docs/img/montage.png [--acdc ../shared/data/acdc]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from stackcls.phantom.render import render_subject


def _acdc_stack(root: Path, patient: str):
    """ED stack of one ACDC patient, reversed to apex -> base (ACDC slice 0 is basal)."""
    import nibabel as nib  # ~0.6 s; only the montage's ACDC row reads NIfTI
    cfg = dict(l.split(":", 1) for l in (root / patient / "Info.cfg").read_text().splitlines() if ":" in l)
    frame = int(cfg["ED"])
    img = nib.load(root / patient / f"{patient}_frame{frame:02d}.nii.gz").get_fdata()
    img = np.transpose(img, (2, 1, 0))[::-1]                   # (S, rows, cols), apex first
    labels = {}
    with open(root / "labels.csv") as f:
        for r in csv.DictReader(f):
            if r["subject"] == patient and r["phase"] == "ED":
                labels[int(r["slice"])] = r["label"]
    n = img.shape[0]
    return img, [labels.get(n - 1 - k, "?") for k in range(n)]


def montage(out: Path, acdc: Path | None = None, subjects=(0, 1, 2, 3), seed: int = 0,
            patient: str = "patient001") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for i in subjects:
        d = render_subject(seed, i)
        rows.append((f"synthetic {d.subject} ({d.anatomy.group})", d.images()[0], d.labels["ED"]))
    if acdc is not None and (Path(acdc) / patient).is_dir():
        img, labs = _acdc_stack(Path(acdc), patient)
        rows.append((f"real ACDC {patient}", img, labs))
    ncol = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(ncol * 1.05, len(rows) * 1.25 + 0.3),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (name, img, labs) in enumerate(rows):
        for k in range(img.shape[0]):
            lo, hi = np.percentile(img[k], [1, 99.5])
            ax = axes[r, k]
            ax.imshow(img[k], cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
            ax.set_title(labs[k], fontsize=7, pad=2,
                         color={"OAP": "tab:blue", "IN": "black", "OBS": "tab:red"}.get(labs[k], "gray"))
        axes[r, 0].text(-0.08, 0.5, name, transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=6)
    fig.suptitle("End-diastolic stacks, apex (left) to base (right): synthetic phantoms and one "
                 "real ACDC stack (bottom)", fontsize=8)
    fig.subplots_adjust(left=0.03, right=0.995, top=0.9, bottom=0.01, wspace=0.04, hspace=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    plt.close(fig)
    from PIL import Image  # a 64-colour palette keeps the committed PNG small
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--acdc", type=Path, default=None, help="ACDC-layout folder for the real row")
    p.add_argument("--patient", default="patient001")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", type=int, nargs="+", default=[0, 1, 2, 3])
    a = p.parse_args(argv)
    print(montage(a.out, a.acdc, a.subjects, a.seed, a.patient))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
