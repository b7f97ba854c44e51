"""The paper's figures for a run: curves (Fig. 3), confusion (Fig. 4), t-SNE (Fig. 5), Grad-CAM
(Fig. 6). Each function takes plain arrays and writes one PNG (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stackcls.stack import CLASSES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
