"""Labelling and review UI (matplotlib), after the authors' own labelling tool (paper, Fig. S2).

`stackcls label DATA --labels L.csv` shows one stack at a time, apex to base, and writes the labels
CSV atomically after every change, so a crash or Ctrl-C never loses a label. `stackcls review DATA
--model RUN` adds the model's probabilities, its ordered prediction and a Grad-CAM overlay, and
under the grid how sure the model is: P(its IN range), the next ranges, the coverage and, per
slice, the probability that it is the first (apical) or the last (basal) IN slice. `--queue
review_queue.csv` (from `stackcls predict --review-below P`) walks only the queued stacks, least
sure first.

The state (`stackcls.ui.label_session.LabelSession`: the label table, its CSV, merging with another
writer) is plain Python and is what the tests drive; `StackView` only draws it and turns key/mouse
events into session calls. Both commands load the ES frame that the labels CSV names.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from stackcls.atomic import inside, safe_name
from stackcls.ui.explain import gradcam
from stackcls.predict.load import load_model
from stackcls.ui.label_session import (LabelsConflictError, LabelSession, read_review_queue,
                                       stacks_to_label)
from stackcls.predict.stack import predict_stack
from stackcls.progress import bar as tqdm
from stackcls.stack import CLASS_INDEX, CLASSES, Stack

__all__ = ["LabelSession", "StackView", "Review", "review_stack", "stack_gradcam",
           "label_command", "review_command"]

COLORS = {"OAP": "#4c72b0", "IN": "#55a868", "OBS": "#c44e52", None: "#888888"}

HELP = """\
keys
  left / right   select previous / next slice (or click a slice)
  o  i  b        label the selected slice OAP / IN / OBS   (also 1 2 3)
  a              selected slice is the first IN (apical boundary): slices before it become OAP
  z              selected slice is the last IN (basal boundary): slices after it become OBS
                 (mouse: left-click = first IN, right-click = last IN)
  x              clear this stack's labels
  n / p          next / previous stack
  u              jump to the next unlabelled stack
  g              toggle the Grad-CAM overlay (review mode)
  h or ?         show / hide this help
every change is saved to the labels CSV at once (write, then rename)"""


# -------------------------------------------------------------- Model outputs for review mode

@dataclass
class Review:
    """What review mode overlays on one stack: probabilities, ordered labels, Grad-CAM maps."""

    probabilities: np.ndarray            # (S, 3), apex -> base
    labels: list[str]                    # predicted, apex -> base
    in_range: tuple[int, int] | None
    cams: np.ndarray | None = None       # (S, H, W) in [0, 1], on the stack's own image grid
    range_probability: float | None = None
    alternatives: list = field(default_factory=list)     # as predict.Prediction.alternatives
    first_in: np.ndarray | None = None   # (S,) P(first IN slice = rank), apex -> base
    last_in: np.ndarray | None = None    # (S,) P(last IN slice = rank)
    coverage: dict | None = None


def review_stack(stack: Stack, model, with_cam: bool = True) -> Review:
    pred = predict_stack(stack, model, mode="stack" if model.stack_head is not None else "slice_ordered")
    order = list(pred.apex_to_base)
    probs = np.asarray(pred.probabilities)[order]
    labels = [pred.labels[i] for i in order]
    cams = None
    if with_cam and has_gradcam(model):
        cams = stack_gradcam(model, stack, [CLASS_INDEX[l] for l in labels])
    b = pred.boundary_probabilities
    return Review(probs, labels, pred.in_range_apex_to_base, cams, pred.range_probability,
                  pred.alternatives, np.asarray(b["first_in"]), np.asarray(b["last_in"]),
                  pred.coverage)


def _range_text(r) -> str:
    return "none" if r is None else f"{r[0]}..{r[1]}"


def how_sure_text(rev: Review) -> str:
    """One line: P(the predicted range), the alternatives, the coverage."""
    alts = ", ".join(f"{_range_text(a['in_range_apex_to_base'])} {a['probability']:.2f}"
                     for a in rev.alternatives)
    cov = rev.coverage or {}
    return (f"P(IN {_range_text(rev.in_range)}) = {rev.range_probability:.2f}    next: {alts}    "
            f"coverage: {cov.get('status', '?')} (P(end slice IN) apex {cov.get('apex_end_in', 0):.2f}, "
            f"base {cov.get('base_end_in', 0):.2f})")


def has_gradcam(model) -> bool:
    """Grad-CAM needs the single-slice classifier (a TrainedModel's .model); a method=anatomy
    model, the shipped default among them, has none (its evidence is its masks)."""
    return hasattr(model, "model")


def stack_gradcam(model, stack: Stack, classes) -> np.ndarray:
    """Grad-CAM maps (S, H, W) on the stack's own image grid.

    The model sees the centre crop resized to its input size; the map is resized back onto the
    crop and left at zero outside it, so it overlays the slice the user looks at.
    """
    cams = gradcam(model.model, model.preprocess(stack.images), classes=np.asarray(classes))
    keep = float(model.config.get("keep", 0.6))
    S, H, W = stack.images.shape
    ch, cw = max(1, round(keep * H)), max(1, round(keep * W))
    top, left = (H - ch) // 2, (W - cw) // 2
    out = np.zeros((S, H, W), np.float32)
    for k, cam in enumerate(cams):
        out[k, top:top + ch, left:left + cw] = np.asarray(
            Image.fromarray(np.asarray(cam, np.float32)).resize((cw, ch), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------- View

class StackView:
    """Draws the session's current stack in a grid and routes events to the session."""

    def __init__(self, session: LabelSession, model=None, figure=None):
        # pyplot here, not at the top: review_command picks the backend first
        import matplotlib.pyplot as plt

        self.session = session
        self.model = model
        self.show_cam = False
        self.show_help = False
        self._reviews: dict[int, Review] = {}
        self.fig = figure if figure is not None else plt.figure(figsize=(13, 8))
        self.fig.canvas.mpl_connect("key_press_event", self.on_key)
        self.fig.canvas.mpl_connect("button_press_event", self.on_click)
        self.axes: list = []
        self.message = ""
        self.draw()

    # -- drawing ------------------------------------------------------------------------------
    def review(self) -> Review | None:
        if self.model is None:
            return None
        i = self.session.index
        if i not in self._reviews:
            self._reviews[i] = review_stack(self.session.stack, self.model)
        return self._reviews[i]

    def draw(self) -> None:
        s, sess = self.session.stack, self.session
        self.fig.clf()
        n = s.n_slices
        ncols = min(n, max(4, math.ceil(math.sqrt(n * 1.5))))
        nrows = math.ceil(n / ncols)
        rev = self.review()
        labels = sess.labels_of()
        sure = rev is not None and rev.range_probability is not None
        gs = self.fig.add_gridspec(nrows, ncols, hspace=0.45 if rev is not None else 0.25,
                                   wspace=0.08, top=0.88,
                                   bottom=0.24 if sure else 0.10 if rev is not None else 0.04,
                                   left=0.03, right=0.98)
        self.axes = []
        for k in range(n):
            r, c = divmod(k, ncols)
            ax = self.fig.add_subplot(gs[r, c])
            img = s.images[k]
            lo, hi = np.percentile(img, [2, 98])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
            if rev is not None and self.show_cam and rev.cams is not None:
                # Weak activations stay transparent so the anatomy under them remains readable.
                cam = np.ma.masked_less(rev.cams[k], 0.15)
                ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            lab = labels[k]
            pos = "" if s.positions is None else f" {s.positions[k]:+.0f}mm"
            title = f"{k}{pos}  {lab or '?'}"
            if rev is not None:
                title += f" | pred {rev.labels[k]}"
            disagree = rev is not None and lab is not None and lab != rev.labels[k]
            ax.set_title(title, fontsize=8, color="red" if disagree else COLORS[lab])
            edge = "red" if disagree else COLORS[lab]
            width = 4 if disagree else (3 if k == sess.selected else 1.5)
            for sp in ax.spines.values():
                sp.set_edgecolor("yellow" if k == sess.selected and not disagree else edge)
                sp.set_linewidth(width)
            self.axes.append(ax)
            if rev is not None:
                # Probability bars just below the slice, as wide as the image.
                bx = ax.inset_axes([0.0, -0.30, 1.0, 0.26])
                bx.barh(range(3), rev.probabilities[k], color=[COLORS[c_] for c_ in CLASSES])
                bx.set_xlim(0, 1)
                bx.set_yticks(range(3), CLASSES, fontsize=6)
                bx.invert_yaxis()
                bx.set_xticks([])
        if sure:
            self._draw_boundaries(rev, n)
        done, total = sess.progress()
        head = (f"{s.subject}  {s.phase}  ({n} slices, apex -> base)    stack {sess.index + 1}/{total}"
                f"    labelled {done}/{total}")
        if rev is not None:
            rng = "none" if rev.in_range is None else f"{rev.in_range[0]}..{rev.in_range[1]}"
            head += f"    predicted IN range {rng}" + ("   [Grad-CAM]" if self.show_cam else "")
        self.fig.suptitle(head, fontsize=11)
        self.fig.text(0.02, 0.93, self.message or "h: help", fontsize=9, color="#444444")
        if self.show_help:
            self.fig.text(0.5, 0.5, HELP, ha="center", va="center", multialignment="left",
                          family="monospace", fontsize=10,
                          bbox=dict(facecolor="white", alpha=0.95, edgecolor="black"))
        self.fig.canvas.draw_idle()

    def _draw_boundaries(self, rev: Review, n: int) -> None:
        """Under the grid: the how-sure line, then each end's boundary probabilities per slice."""
        self.fig.text(0.03, 0.165, how_sure_text(rev), fontsize=9, family="monospace")
        bx = self.fig.add_axes([0.05, 0.03, 0.92, 0.11])
        k = np.arange(n)
        bx.bar(k - 0.2, rev.first_in, width=0.4, color=COLORS["OAP"], label="P(first IN = slice)")
        bx.bar(k + 0.2, rev.last_in, width=0.4, color=COLORS["OBS"], label="P(last IN = slice)")
        bx.set_xlim(-0.6, n - 0.4)
        bx.set_ylim(0, 1)
        bx.set_xticks(k)
        bx.tick_params(labelsize=7)
        bx.legend(fontsize=7, loc="upper center", ncols=2, frameon=False)

    # -- events -------------------------------------------------------------------------------
    def on_key(self, event) -> None:
        sess, key = self.session, event.key
        n = sess.stack.n_slices
        keymap = {"o": "OAP", "1": "OAP", "i": "IN", "2": "IN", "b": "OBS", "3": "OBS"}
        self.message = ""
        if key in keymap:
            self._edit(sess.set_label, sess.selected, keymap[key])
        elif key == "right":
            sess.selected = min(sess.selected + 1, n - 1)
        elif key == "left":
            sess.selected = max(sess.selected - 1, 0)
        elif key == "a":
            self._edit(sess.set_first_in, sess.selected)
        elif key == "z":
            self._edit(sess.set_last_in, sess.selected)
        elif key == "x":
            self._edit(sess.clear)
        elif key == "n":
            sess.go(sess.index + 1)
        elif key == "p":
            sess.go(sess.index - 1)
        elif key == "u":
            if not sess.next_unlabelled():
                self.message = "every stack is labelled"
        elif key == "g":
            self.show_cam = not self.show_cam
        elif key in ("h", "?"):
            self.show_help = not self.show_help
        else:
            return
        self.draw()

    def on_click(self, event) -> None:
        if event.inaxes is None or event.inaxes not in self.axes:
            return
        k = self.axes.index(event.inaxes)
        self.session.selected = k
        self.message = ""
        if event.button == 1:
            self._edit(self.session.set_first_in, k)
        elif event.button == 3:
            self._edit(self.session.set_last_in, k)
        self.draw()

    def _edit(self, fn, *args) -> None:
        """An edit of the session; a save it refuses (the CSV changed on disk and cannot be read)
        is shown in the window and on stderr instead of escaping the event loop."""
        try:
            fn(*args)
        except LabelsConflictError as e:
            self.message = f"NOT SAVED: {e}"
            print(f"error: {e}", file=sys.stderr)

    def save(self, path: Path) -> None:
        self.fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------- Commands

def _load(data: Path, labels: Path | None = None) -> list[Stack]:
    """`label_session.stacks_to_label`, or the command ends naming the folder."""
    stacks = stacks_to_label(data, labels)
    if not stacks:
        raise SystemExit(f"{data}: no stacks found (try `stackcls inspect {data}`)")
    return stacks


def label_command(data: Path, labels: Path) -> int:
    import matplotlib.pyplot as plt   # see StackView.__init__

    try:
        session = LabelSession(_load(data, labels), labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done, total = session.progress()
    print(f"{total} stacks, {done} labelled; labels are saved to {labels} after every change")
    StackView(session)
    plt.show()
    return 0


def queued(stacks: list[Stack], queue) -> list[Stack]:
    """The stacks the review queue CSV names, in its order; queued stacks not found under the
    data folder are reported on stderr and skipped."""
    by_key = {(s.subject, s.phase): s for s in stacks}
    order = read_review_queue(queue)
    missing = [f"{sub}/{ph}" for sub, ph in order if (sub, ph) not in by_key]
    if missing:
        print(f"warning: {queue}: {len(missing)} queued stacks not found under the data folder "
              f"(skipped): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    out = [by_key[k] for k in dict.fromkeys(order) if k in by_key]
    if not out:
        raise ValueError(f"{queue}: none of its {len(order)} stacks is under the data folder")
    return out


def review_command(data: Path, model: Path | None = None, labels: Path | None = None,
                   save: Path | None = None, queue: Path | None = None) -> int:
    """`stackcls review DATA [--model RUN_DIR]`: model None is the shipped model."""
    if save is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # only after the backend is chosen

    m = load_model(model)
    try:
        stacks = _load(data, labels)
        if queue is not None:
            stacks = queued(stacks, queue)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Review never writes labels unless the user edits them; without a CSV, edits go to a scratch
    # file next to the figures (or the run dir, or the working folder for the shipped model),
    # never over anything that exists.
    scratch = save or (Path(model) if model is not None else Path.cwd())
    lab_path = labels if labels is not None else scratch / "review_labels.csv"
    try:
        session = LabelSession(stacks, lab_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if queue is not None:
        session.go(0)                  # the queue's order, not the first unlabelled stack
    view = StackView(session, model=m)
    if save is None:
        plt.show()
        return 0
    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    cam_modes = (False, True) if has_gradcam(m) else (False,)
    for i in tqdm(range(len(stacks)), desc="review figures"):
        session.go(i)
        for cam in cam_modes:
            view.show_cam = cam
            view.draw()
            s = session.stack
            # subject and phase come from the files: made safe, and kept inside `save`
            view.save(inside(save, safe_name(s.subject, s.phase, *(["gradcam"] if cam else [])) + ".png"))
    print(f"wrote {len(cam_modes) * len(stacks)} figures to {save}")
    return 0
