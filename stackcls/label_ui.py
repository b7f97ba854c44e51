"""Labelling and review UI (matplotlib), after the authors' own labelling tool (paper, Fig. S2).

`stackcls label DATA --labels L.csv` shows one stack at a time, apex to base, and writes the labels
CSV atomically after every change, so a crash or Ctrl-C never loses a label. `stackcls review DATA
--model RUN` adds the model's probabilities, its ordered prediction and a Grad-CAM overlay.

The state (`LabelSession`) is plain Python and is what the tests drive; `StackView` only draws it
and turns key/mouse events into session calls.
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
from stackcls.decode import in_range
from stackcls.explain import gradcam
from stackcls.inference import load_model
from stackcls.io import load_labels, load_stacks, save_labels
from stackcls.predict import predict_stack
from stackcls.progress import bar as tqdm
from stackcls.stack import CLASS_INDEX, CLASSES, Stack

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


# -------------------------------------------------------------------------------------- State

Key = tuple[str, str]  # (subject, phase)


@dataclass
class LabelSession:
    """Stacks plus the label table, saved to `labels_path` after every change.

    The table keeps every row of the CSV, also rows of stacks not shown in this session, so a
    session never drops labels that it did not load.
    """

    stacks: list[Stack]
    labels_path: Path
    index: int = 0
    selected: int = 0
    rows: dict[tuple[str, str, int], tuple[int | None, str]] = field(default_factory=dict)

    def __post_init__(self):
        self.labels_path = Path(self.labels_path)
        if not self.stacks:
            raise ValueError("no stacks to label")
        if self.labels_path.exists():
            # load_labels raises with file and line on a malformed CSV; we never overwrite it.
            for r in load_labels(self.labels_path):
                self.rows[(r.subject, r.phase, int(r.slice))] = (r.frame, r.label)
        # Labels already attached to the stacks (e.g. by load_stacks(labels=...)) count too.
        for s in self.stacks:
            if s.labels is not None:
                for sid, lab in zip(s.slice_ids, s.labels):
                    self.rows.setdefault((s.subject, s.phase, sid), (s.frame, lab))
        self.index = self.first_unlabelled(start=0)
        if self.index is None:
            self.index = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def stack(self) -> Stack:
        return self.stacks[self.index]

    def labels_of(self, i: int | None = None) -> list[str | None]:
        s = self.stacks[self.index if i is None else i]
        return [self.rows.get((s.subject, s.phase, sid), (None, None))[1] for sid in s.slice_ids]

    def is_labelled(self, i: int) -> bool:
        return all(l is not None for l in self.labels_of(i))

    def progress(self) -> tuple[int, int]:
        return sum(self.is_labelled(i) for i in range(len(self.stacks))), len(self.stacks)

    def first_unlabelled(self, start: int) -> int | None:
        n = len(self.stacks)
        for k in range(n):
            i = (start + k) % n
            if not self.is_labelled(i):
                return i
        return None

    # -- edits (each one is saved at once) ----------------------------------------------------
    def set_label(self, slice_pos: int, label: str) -> None:
        if label not in CLASS_INDEX:
            raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")
        s = self.stack
        self.rows[(s.subject, s.phase, s.slice_ids[slice_pos])] = (s.frame, label)
        self.save()

    def set_first_in(self, slice_pos: int) -> None:
        """Apical boundary: slices apical of `slice_pos` become OAP; the basal boundary stays where
        it is (or at the last slice if there is none yet, until the user sets it)."""
        rng = in_range(self.labels_of())
        last = rng[1] if rng else self.stack.n_slices - 1
        self.set_range(slice_pos, max(last, slice_pos))

    def set_last_in(self, slice_pos: int) -> None:
        """Basal boundary: slices basal of `slice_pos` become OBS."""
        rng = in_range(self.labels_of())
        first = rng[0] if rng else 0
        self.set_range(min(first, slice_pos), slice_pos)

    def set_range(self, first: int, last: int) -> None:
        """Both boundaries at once: OAP before `first`, IN from `first` to `last`, OBS after."""
        s = self.stack
        for k, sid in enumerate(s.slice_ids):
            lab = "OAP" if k < first else "IN" if k <= last else "OBS"
            self.rows[(s.subject, s.phase, sid)] = (s.frame, lab)
        self.save()

    def clear(self) -> None:
        s = self.stack
        for sid in s.slice_ids:
            self.rows.pop((s.subject, s.phase, sid), None)
        self.save()

    # -- navigation ---------------------------------------------------------------------------
    def go(self, i: int) -> None:
        self.index = int(i) % len(self.stacks)
        self.selected = min(self.selected, self.stack.n_slices - 1)

    def next_unlabelled(self) -> bool:
        i = self.first_unlabelled(self.index + 1)
        if i is None:
            return False
        self.go(i)
        return True

    # -- persistence --------------------------------------------------------------------------
    def save(self) -> None:
        """The whole table, written atomically by `save_labels`."""
        rows = [
            {"subject": sub, "frame": frame, "phase": ph, "slice": sl, "label": lab}
            for (sub, ph, sl), (frame, lab) in sorted(self.rows.items())
        ]
        save_labels(rows, self.labels_path)


# -------------------------------------------------------------- Model outputs for review mode

@dataclass
class Review:
    """What review mode overlays on one stack: probabilities, ordered labels, Grad-CAM maps."""

    probabilities: np.ndarray            # (S, 3), apex -> base
    labels: list[str]                    # predicted, apex -> base
    in_range: tuple[int, int] | None
    cams: np.ndarray | None = None       # (S, H, W) in [0, 1], on the stack's own image grid


def review_stack(stack: Stack, model, with_cam: bool = True) -> Review:
    pred = predict_stack(stack, model, mode="stack" if model.stack_head is not None else "slice_ordered")
    order = list(pred.apex_to_base)
    probs = np.asarray(pred.probabilities)[order]
    labels = [pred.labels[i] for i in order]
    cams = None
    if with_cam:
        cams = stack_gradcam(model, stack, [CLASS_INDEX[l] for l in labels])
    return Review(probs, labels, pred.in_range_apex_to_base, cams)


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
        gs = self.fig.add_gridspec(nrows, ncols, hspace=0.45 if rev is not None else 0.25,
                                   wspace=0.08, top=0.88, bottom=0.10 if rev is not None else 0.04,
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

    # -- events -------------------------------------------------------------------------------
    def on_key(self, event) -> None:
        sess, key = self.session, event.key
        n = sess.stack.n_slices
        keymap = {"o": "OAP", "1": "OAP", "i": "IN", "2": "IN", "b": "OBS", "3": "OBS"}
        self.message = ""
        if key in keymap:
            sess.set_label(sess.selected, keymap[key])
        elif key == "right":
            sess.selected = min(sess.selected + 1, n - 1)
        elif key == "left":
            sess.selected = max(sess.selected - 1, 0)
        elif key == "a":
            sess.set_first_in(sess.selected)
        elif key == "z":
            sess.set_last_in(sess.selected)
        elif key == "x":
            sess.clear()
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
        if event.button == 1:
            self.session.set_first_in(k)
        elif event.button == 3:
            self.session.set_last_in(k)
        self.draw()

    def save(self, path: Path) -> None:
        self.fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------- Commands

def _load(data: Path) -> list[Stack]:
    stacks = load_stacks(data)
    if not stacks:
        raise SystemExit(f"{data}: no stacks found (try `stackcls inspect {data}`)")
    return stacks


def label_command(data: Path, labels: Path) -> int:
    import matplotlib.pyplot as plt   # see StackView.__init__

    try:
        session = LabelSession(_load(data), labels)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done, total = session.progress()
    print(f"{total} stacks, {done} labelled; labels are saved to {labels} after every change")
    StackView(session)
    plt.show()
    return 0


def review_command(data: Path, model: Path, labels: Path | None = None,
                   save: Path | None = None) -> int:
    if save is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # only after the backend is chosen

    m = load_model(model)
    stacks = _load(data)
    # Review never writes labels unless the user edits them; without a CSV, edits go to a scratch
    # file next to the figures (or the run dir), never over anything that exists.
    lab_path = labels if labels is not None else (save or Path(model)) / "review_labels.csv"
    try:
        session = LabelSession(stacks, lab_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    view = StackView(session, model=m)
    if save is None:
        plt.show()
        return 0
    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(stacks)), desc="review figures"):
        session.go(i)
        for cam in (False, True):
            view.show_cam = cam
            view.draw()
            s = session.stack
            # subject and phase come from the files: made safe, and kept inside `save`
            view.save(inside(save, safe_name(s.subject, s.phase, *(["gradcam"] if cam else [])) + ".png"))
    print(f"wrote {2 * len(stacks)} figures to {save}")
    return 0
