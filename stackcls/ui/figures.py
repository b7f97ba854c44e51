"""The paper's figures for a run: curves (Fig. 3), confusion (Fig. 4), t-SNE (Fig. 5), Grad-CAM
(Fig. 6), and the predictions of `stackcls predict`. Each function takes plain arrays (or
`predict.Prediction`s) and writes one PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackcls.stack import CLASSES


def _plt():
    # imported when a figure is drawn: pyplot takes ~1 s to import, and the Agg backend must be
    # chosen before it is
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slice_tile(ax, im):
    """One slice in a grid: its 2-98 percentile window, no ticks."""
    lo, hi = np.percentile(im, (2, 98))
    ax.imshow(np.clip((im - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def curves(settings: dict, path) -> Path:
    """settings: {name: dict(lr=float, train_loss (F, E), val_loss (F, E), val_acc (F, E))}: one
    row per setting; thin lines per fold, thick line their mean."""
    plt = _plt()
    rows = max(1, len(settings))
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.2 * rows), squeeze=False)
    for r, (name, c) in enumerate(settings.items()):
        for k, (key, title) in enumerate([("train_loss", "training loss"),
                                          ("val_loss", "validation loss"),
                                          ("val_acc", "validation accuracy")]):
            ax = axes[r, k]
            a = np.asarray(c[key])
            ep = np.arange(1, a.shape[1] + 1)
            for f in range(a.shape[0]):
                ax.plot(ep, a[f], lw=0.8, alpha=0.5, label=f"fold {f + 1}")
            ax.plot(ep, a.mean(0), lw=2.2, color="k", label="mean")
            if key == "val_acc" and "epochs" in c:
                ax.axvline(c["epochs"], color="r", ls="--", lw=1, label="selected")
            ax.set_title(f"{name} (lr {c['lr']:g}): {title}", fontsize=9)
            ax.set_xlabel("epoch")
        axes[r, 2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def confusion(matrices: dict, path) -> Path:
    """matrices: {title: 3x3 counts (rows truth, columns prediction)}."""
    plt = _plt()
    n = max(1, len(matrices))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, (title, m) in zip(axes[0], matrices.items()):
        m = np.asarray(m)
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{m[i, j]}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(3), CLASSES)
        ax.set_yticks(range(3), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def tsne(embedding, labels, path, title: str = "t-SNE of penultimate features (test)") -> Path:
    plt = _plt()
    e = np.asarray(embedding)
    y = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for k, name in enumerate(CLASSES):
        sel = y == k
        ax.scatter(e[sel, 0], e[sel, 1], s=8, label=f"{name} ({int(sel.sum())})")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def gradcam(cells: dict, path, title: str = "Grad-CAM (rows: truth, columns: prediction)") -> Path:
    """cells: {(truth, pred): (image (H, W) grey 0..255, cam (H, W) in [0, 1])}; empty cells are
    left blank."""
    plt = _plt()
    fig, axes = plt.subplots(3, 3, figsize=(7.5, 7.5))
    for i in range(3):
        for j in range(3):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if (i, j) in cells:
                img, cam = cells[(i, j)]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            else:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            if j == 0:
                ax.set_ylabel(f"true {CLASSES[i]}")
            if i == 0:
                ax.set_title(f"pred {CLASSES[j]}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def predictions(preds, images, path) -> Path:
    """preds: `predict.Prediction`s; images: each stack's (S, H, W) in the caller's order. Each
    stack a row (apex -> base): thumbnail, label, and OAP/IN/OBS probability bars."""
    plt = _plt()
    ncol = max(len(p.labels) for p in preds)
    fig = plt.figure(figsize=(1.3 * ncol, 2.7 * len(preds)), dpi=80)
    gs = fig.add_gridspec(2 * len(preds), ncol, height_ratios=[3, 1.2] * len(preds), hspace=0.7, wspace=0.08)
    colors = ("tab:orange", "tab:green", "tab:blue")
    for row, (pred, imgs) in enumerate(zip(preds, images)):
        for r, c in enumerate(pred.apex_to_base):
            ax = _slice_tile(fig.add_subplot(gs[2 * row, r]), imgs[c])
            ax.set_title(f"{pred.labels[c]}", fontsize=8, color=colors[CLASSES.index(pred.labels[c])])
            if r == 0:
                rng = pred.in_range_apex_to_base
                ax.set_ylabel(f"{pred.subject}/{pred.phase}\nIN {'none' if rng is None else f'{rng[0]}..{rng[1]}'}"
                              f"\napex", fontsize=7)
            bx = fig.add_subplot(gs[2 * row + 1, r])
            bx.bar(range(3), pred.probabilities[c], color=colors)
            bx.set_ylim(0, 1)
            bx.set_xticks(range(3))
            bx.set_xticklabels(CLASSES, fontsize=5)
            bx.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def anatomy(rows: list[dict], path, title: str = "method=anatomy on test stacks") -> Path:
    """What the anatomy model sees and segments. rows: dict(key, x (S, n, n) model inputs,
    mask (S, n, n) predicted classes, truth [labels], pred [labels]); one row per stack, apex
    left; contours: LV cavity red, LV myocardium green, RV cavity blue; a slice's title is
    truth/prediction, red where they differ."""
    plt = _plt()
    cols = max(len(r["x"]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.9 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(r["x"]):
                continue
            ax.imshow(r["x"][j], cmap="gray", vmin=0, vmax=255)
            for cls, colour in ((3, "red"), (2, "lime"), (1, "deepskyblue")):
                m = (r["mask"][j] == cls).astype(float)
                if m.any():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=0.7)
            t, p = r["truth"][j], r["pred"][j]
            ax.set_title(f"{t}/{p}", fontsize=7, color="k" if t == p else "red")
        axes[i, 0].text(-0.1, 0.5, r["key"], transform=axes[i, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=7)
    fig.suptitle(f"{title} (slice titles: truth/prediction; apex left)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def reliability(curves: dict, path, bins: int = 10) -> Path:
    """Reliability diagrams of P(returned IN range): curves {title: (probabilities (N,), right
    (N,) bool)}, one panel each: accuracy against mean confidence per equal-width bin (marker
    area ~ stacks in the bin), the diagonal, ECE and Brier in the title."""
    from stackcls.train.calibration import brier, ece
    from stackcls.train.calibration import reliability as bin_stats

    plt = _plt()
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.5), squeeze=False)
    for ax, (title, (p, right)) in zip(axes[0], curves.items()):
        r = bin_stats(p, right, bins)
        keep = r["count"] > 0
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.plot(r["confidence"][keep], r["accuracy"][keep], color="tab:blue", lw=1.2)
        ax.scatter(r["confidence"][keep], r["accuracy"][keep], s=12 + 200 * r["count"][keep] / max(len(p), 1),
                   color="tab:blue", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("P(returned IN range)")
        ax.set_ylabel("share exactly right")
        ax.set_title(f"{title}\n{len(p)} stacks, ECE {ece(p, right, bins):.3f}, Brier {brier(p, right):.3f}",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def boundaries(preds, images, path, titles=None) -> Path:
    """Stacks side by side with how sure the model is: per stack a row of slices (apex -> base,
    predicted label and level above each), and under it P(first IN = slice) and P(last IN = slice)
    with the truth marked when `titles` gives it. preds: `predict.Prediction`s; images: each
    stack's (S, H, W) in the caller's order; titles: optional extra text per stack."""
    plt = _plt()
    ncol = max(len(p.labels) for p in preds)
    fig = plt.figure(figsize=(1.25 * ncol, 3.3 * len(preds)), dpi=90)
    gs = fig.add_gridspec(2 * len(preds), ncol, height_ratios=[2.2, 1.6] * len(preds), hspace=0.55,
                          wspace=0.06)
    colors = dict(OAP="tab:orange", IN="tab:green", OBS="tab:blue")
    for row, (pred, imgs) in enumerate(zip(preds, images)):
        S = len(pred.labels)
        for r, c in enumerate(pred.apex_to_base):
            ax = _slice_tile(fig.add_subplot(gs[2 * row, r]), imgs[c])
            lv = (pred.level or [None] * S)[c]
            ax.set_title(f"{r}: {pred.labels[c]}" + (f"\n{lv}" if lv else "\n "), fontsize=7,
                         color=colors[pred.labels[c]])
        bx = fig.add_subplot(gs[2 * row + 1, :S])
        k = np.arange(S)
        b = pred.boundary_probabilities
        bx.bar(k - 0.2, b["first_in"], width=0.4, color="tab:orange", label="P(first IN = slice)")
        bx.bar(k + 0.2, b["last_in"], width=0.4, color="tab:blue", label="P(last IN = slice)")
        bx.set_xlim(-0.5, S - 0.5)
        bx.set_ylim(0, 1.05)
        bx.set_xticks(k)
        bx.tick_params(labelsize=7)
        bx.legend(fontsize=7, loc="upper center", ncols=2, frameon=False)
        rng = pred.in_range_apex_to_base
        alts = ", ".join(f"{'none' if a['in_range_apex_to_base'] is None else '{}..{}'.format(*a['in_range_apex_to_base'])}"
                         f" {a['probability']:.2f}" for a in pred.alternatives)
        text = (f"{pred.subject}/{pred.phase}: IN {'none' if rng is None else f'{rng[0]}..{rng[1]}'}, "
                f"P = {pred.range_probability:.2f}; next {alts}; coverage {pred.coverage['status']}")
        if titles is not None:
            text += f"\n{titles[row]}"
        bx.set_title(text, fontsize=8, loc="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
