"""What `stackcls serve` holds: the stacks, the label session, and predictions made once per stack.

Stacks are named by their position in the loaded list (the stack id of every URL); no request ever
names a file. Labels go through `LabelSession` (merge, lock, atomic write) under one lock, so two
tabs never interleave a save; another process writing the same CSV is picked up on the next read
(the file's state is compared on every request) and merged by the session on the next save.

The model runs in one background thread, stack after stack, the stack a person has open first;
everything the browser shows of it is read from the cached `Prediction`, in the stack's own slice
order (slice 0 = apex).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import deque
from pathlib import Path

import numpy as np

from stackcls.atomic import jsonable
from stackcls import CLASSES
from stackcls.decode.ordered import in_range
from stackcls.ui.label_session import LabelSession, file_state, stacks_to_label
from stackcls.ui.web import render
from stackcls.train.calibration import review_effort

STATUSES = ("unreviewed", "agreed", "corrected", "labelled")
FLAGS = ("apex may be missing", "base may be missing")


def resolve_model(model):
    """None / "default": the shipped model; "none" / False: labelling only; a run folder; or an
    object with the `predict_stack` contract (tests)."""
    if model is False or (isinstance(model, str) and model.lower() == "none"):
        return None
    from stackcls import load_model

    if model is None or (isinstance(model, str) and model.lower() == "default"):
        return load_model(None)
    if isinstance(model, (str, Path)):
        return load_model(Path(model))
    return model


class AppState:
    def __init__(self, root, labels=None, model=None, masks=None, stacks=None, start=True):
        self.root = Path(root)
        # Without --labels, edits go to a scratch file in the working folder (as `stackcls review`),
        # never into ROOT: a data set is often a shared reference copy, and root ignores its
        # read-only bits.
        self.labels_path = Path(labels) if labels is not None else Path.cwd() / "review_labels.csv"
        self.stacks = stacks if stacks is not None else stacks_to_label(self.root, self.labels_path, masks)
        if not self.stacks:
            raise ValueError(f"{root}: no stacks found (try `stackcls inspect {root}`)")
        self.lock = threading.RLock()          # the session and the file state
        self.session = LabelSession(self.stacks, self.labels_path)
        self._seen = file_state(self.labels_path)
        self._model_spec = model
        self.model = None
        self.model_lock = threading.Lock()     # JAX calls: one at a time on a 2-core machine
        self.model_state = "loading"
        self.model_error: str | None = None
        self.preds: dict[int, object] = {}
        self.pred_errors: dict[int, str] = {}
        self._wanted: deque[int] = deque()
        self._wake = threading.Condition()
        self.pngs = render.PngCache()
        self._cams: dict[int, np.ndarray] = {}
        self._cines: dict[int, list | None] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._work, name="stackcls-predict", daemon=True)
        if start:
            self.thread.start()

    # -- predictions ------------------------------------------------------------------------
    def want(self, sid: int) -> None:
        """Put a stack the user opened ahead of the background pass."""
        with self._wake:
            if sid not in self.preds and sid not in self.pred_errors:
                self._wanted.appendleft(sid)
                self._wake.notify()

    def _next_sid(self) -> int | None:
        while self._wanted:
            sid = self._wanted.popleft()
            if sid not in self.preds and sid not in self.pred_errors:
                return sid
        for sid in range(len(self.stacks)):
            if sid not in self.preds and sid not in self.pred_errors:
                return sid
        return None

    def _work(self) -> None:
        try:
            with self.model_lock:
                self.model = resolve_model(self._model_spec)
        except Exception as e:   # a bad run folder must not stop labelling
            self.model_state, self.model_error = "failed", f"{type(e).__name__}: {e}"
            print(f"error: the model could not be loaded ({self.model_error}); labelling only",
                  file=sys.stderr)
            return
        if self.model is None:
            self.model_state = "none"
            return
        self.model_state = "running"
        from stackcls import predict_stack

        mode = "stack" if getattr(self.model, "stack_head", None) is not None else "slice_ordered"
        while not self._stop:
            with self._wake:
                sid = self._next_sid()
            if sid is None:
                break
            try:
                with self.model_lock:
                    pred = predict_stack(self.stacks[sid], self.model, mode=mode)
                self.preds[sid] = pred
            except Exception as e:    # one bad stack is reported on its row, the pass goes on
                self.pred_errors[sid] = f"{type(e).__name__}: {e}"
        self.model_state = "done"
        # slices rendered ahead, so the first visit of each stack page costs no rendering
        for sid in range(len(self.stacks)):
            if self._stop:
                break
            for k in range(self.stacks[sid].n_slices):
                self.slice_png(sid, k)

    def stop(self) -> None:
        self._stop = True

    def progress(self) -> dict:
        done = len(self.preds) + len(self.pred_errors)
        return dict(done=done, total=len(self.stacks), model=self.model_state,
                    error=self.model_error)

    def pred_view(self, sid: int) -> dict | None:
        """The prediction in the stack's slice order (predict_stack's caller order)."""
        p = self.preds.get(sid)
        if p is None:
            return None
        n = len(p.labels)
        first, last = np.zeros(n), np.zeros(n)
        b = p.boundary_probabilities or {}
        for rank, k in enumerate(p.apex_to_base):
            first[k] = b.get("first_in", [0] * n)[rank]
            last[k] = b.get("last_in", [0] * n)[rank]
        cov = p.coverage or {}
        return dict(labels=list(p.labels), probs=np.round(np.asarray(p.probabilities, float), 4).tolist(),
                    first_in=np.round(first, 4).tolist(), last_in=np.round(last, 4).tolist(),
                    no_in=b.get("no_in"), range=in_range(p.labels),
                    range_probability=p.range_probability, coverage=cov.get("status"),
                    apex_end_in=cov.get("apex_end_in"), base_end_in=cov.get("base_end_in"),
                    alternatives=[dict(range=a.get("in_range"), p=a.get("probability"))
                                  for a in (p.alternatives or [])][:3],
                    warning=p.orientation_warning)

    # -- labels -----------------------------------------------------------------------------
    def _fresh(self) -> None:
        """Re-read the CSV if another writer changed it since this server last read or wrote it."""
        now = file_state(self.labels_path)
        if now != self._seen:
            self.session = LabelSession(self.stacks, self.labels_path)
            self._seen = now

    def labels_of(self, sid: int) -> list:
        with self.lock:
            self._fresh()
            return self.session.labels_of(sid)

    def all_labels(self) -> list[list]:
        with self.lock:
            self._fresh()
            return [self.session.labels_of(i) for i in range(len(self.stacks))]

    def edit(self, sid: int, op: str, **kw) -> list:
        """One change, saved at once; returns the stack's labels after it."""
        with self.lock:
            self._fresh()
            sess = self.session
            sess.go(sid)
            if op == "first":
                sess.set_first_in(kw["k"])
            elif op == "last":
                sess.set_last_in(kw["k"])
            elif op == "range":
                sess.set_range(kw["first"], kw["last"])
            elif op == "label":
                sess.set_label(kw["k"], kw["label"])
            elif op == "set":
                self._set_all(sess, kw["labels"])
            elif op == "accept":
                pred = self.preds.get(sid)
                if pred is None:
                    raise LookupError("the model has not predicted this stack yet")
                self._set_all(sess, list(pred.labels))
            else:
                raise ValueError(f"unknown edit {op!r}")
            self._seen = file_state(self.labels_path)
            return sess.labels_of(sid)

    @staticmethod
    def _set_all(sess, labels: list) -> None:
        # one save for the whole stack (undo, accept); set_label per slice would write S times
        sess.set_labels(dict(enumerate(labels)))

    # -- the queue --------------------------------------------------------------------------
    def status(self, sid: int, labels: list) -> str:
        if any(lab is None for lab in labels):
            return "unreviewed"
        p = self.preds.get(sid)
        if p is None:
            return "labelled"
        return "agreed" if list(p.labels) == list(labels) else "corrected"

    def order(self) -> list[int]:
        """Least sure first; stacks not predicted yet after them, in loading order."""
        def key(sid):
            p = self.preds.get(sid)
            rp = None if p is None else p.range_probability
            return (rp is None, rp if rp is not None else 0.0, sid)
        return sorted(range(len(self.stacks)), key=key)

    def queue(self) -> dict:
        labels = self.all_labels()
        rows = []
        for sid in self.order():
            s, labs = self.stacks[sid], labels[sid]
            pv = self.pred_view(sid)
            cov = (pv or {}).get("coverage")
            rows.append(dict(
                sid=sid, subject=s.subject, phase=s.phase, frame=s.frame, slices=s.n_slices,
                range_probability=None if pv is None else pv["range_probability"],
                coverage=cov, flags=[f for f in FLAGS if cov and f.split()[0] in cov],
                model_range=None if pv is None else pv["range"],
                label_range=in_range(labs) if all(l is not None for l in labs) else None,
                labelled=sum(l is not None for l in labs), status=self.status(sid, labs),
                error=self.pred_errors.get(sid)))
        return dict(rows=rows, progress=self.progress(), effort=self.effort(labels))

    def effort(self, labels: list[list]) -> dict | None:
        """Review effort on the stacks that are both fully labelled and predicted."""
        rp, ok, triv = [], [], []
        for sid, labs in enumerate(labels):
            p = self.preds.get(sid)
            if p is None or p.range_probability is None or any(l is None for l in labs):
                continue
            truth = in_range(labs)
            rp.append(p.range_probability)
            ok.append(in_range(p.labels) == truth)
            triv.append(truth == (0, len(labs) - 1))
        return review_effort(rp, ok, triv) if rp else None

    # -- images -----------------------------------------------------------------------------
    def slice_png(self, sid: int, k: int):
        return self.pngs.get(("slice", sid, k), lambda: render.grey(self.stacks[sid].images[k]))

    def mask_png(self, sid: int, k: int):
        """The anatomy masks: the model's own (a model with `stack_masks`), else the stack's."""
        def make():
            m = self._model_masks(sid)
            if m is None:
                m = self.stacks[sid].masks
            if m is None:
                raise LookupError("this stack has no masks")
            return render.mask(m[k])
        return self.pngs.get(("mask", sid, k), make)

    def _model_masks(self, sid: int):
        fn = getattr(self.model, "stack_masks", None)
        if fn is None:
            return None
        with self.model_lock:
            return np.asarray(fn(self.stacks[sid]))

    def has_masks(self, sid: int) -> bool:
        return self.stacks[sid].masks is not None or hasattr(self.model, "stack_masks")

    def has_cam(self) -> bool:
        from stackcls.ui.label_ui import has_gradcam
        return self.model is not None and has_gradcam(self.model)

    def cam_png(self, sid: int, k: int):
        def make():
            if sid not in self._cams:
                from stackcls.ui.label_ui import stack_gradcam
                p = self.preds.get(sid)
                if p is None or not self.has_cam():
                    raise LookupError("no Grad-CAM for this stack")
                with self.model_lock:
                    self._cams[sid] = stack_gradcam(self.model, self.stacks[sid],
                                                    [CLASSES.index(l) for l in p.labels])
            return render.cam(self._cams[sid][k])
        return self.pngs.get(("cam", sid, k), make)

    # -- cine -------------------------------------------------------------------------------
    def has_cine(self, sid: int) -> bool:
        s = self.stacks[sid]
        return bool(s.files) and int(s.meta.get("n_phases") or 1) > 1

    def cine(self, sid: int) -> list | None:
        """The stack's slices over the cardiac cycle, (T, S, H, W) as a list of frames, read once
        from the folders its own files are in (never from a path a request names)."""
        if sid in self._cines:
            return self._cines[sid]
        frames = None
        s = self.stacks[sid]
        if self.has_cine(sid):
            from stackcls.io import scan
            folders = sorted({str(Path(f).parent) for f in s.files})
            files = [str(p) for d in folders for p in sorted(Path(d).iterdir()) if p.is_file()]
            res = scan(files, phases="all", progress=False)
            uid = s.meta.get("series_uid")
            same = [t for t in res.stacks if t.subject == s.subject and t.n_slices == s.n_slices
                    and t.meta.get("series_uid") == uid]
            same.sort(key=lambda t: (t.frame is None, t.frame or 0))
            if len(same) > 1:
                frames = [np.array(t.images) for t in same]
        self._cines[sid] = frames
        return frames

    def cine_png(self, sid: int, k: int, t: int):
        def make():
            frames = self.cine(sid)
            win = render.grey_window(np.stack([f[k] for f in frames]))
            return render.grey_in(frames[t][k], win)
        return self.pngs.get(("cine", sid, k, t), make)

    # -- export -----------------------------------------------------------------------------
    def predictions_jsonl(self) -> str:
        lines = []
        for sid in range(len(self.stacks)):
            p = self.preds.get(sid)
            if p is not None:
                lines.append(json.dumps(p.to_dict(), default=jsonable))
        return "".join(line + "\n" for line in lines)


