"""The labelling session's state: stacks, the label table and its CSV (the UI only draws it).

The table is keyed by (subject, phase, frame, slice), frame None when unknown, and holds every row
of the CSV, also rows of stacks, subjects or frames that this session does not show, so a save
never drops a label it did not load. A stack reads the rows of its own frame (and frameless rows);
a stack whose frame is unknown reads the rows of the one frame its (subject, phase) has.

Every change is saved at once, atomically (`save_labels` -> `stackcls.atomic.replace_atomically`).
Two sessions (two `stackcls label` processes) may work on one CSV: the session remembers the file's
(mtime_ns, size, sha256) at load and after each save; if the file changed on disk in between, the
save re-reads it and applies only this session's pending edits on top, so every row of the other
writer survives except the slices this session has just changed. A changed file that cannot be read
is never overwritten: the save is refused with a message naming the file. Saves of sessions on one
machine are serialised by an advisory lock on the CSV's folder, so none can slip in between the
check and the rename. Temp files that an interrupted save left beside the CSV are removed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, the compare-and-merge still runs
    fcntl = None

from stackcls.atomic import remove_stale_temps, replace_atomically
from stackcls.decode.ordered import in_range
from stackcls.io import es_frames, load_labels, load_stacks, save_labels
from stackcls.io.labels import _uncell, csv_cell
from stackcls.stack import CLASS_INDEX, CLASSES, Stack

Row = tuple[str, str, "int | None", int]  # (subject, phase, frame, slice)


def stacks_to_label(data, labels=None, masks=None) -> list[Stack]:
    """The stacks of `data` as the labelling UIs show them: a subject's ES frame is the one the
    labels CSV names (if it names one), else the estimate, so labels are shown on the images they
    were made on. The rows are not attached (`load_stacks(labels=)` would refuse a CSV still being
    labelled): the session reads them, keyed by frame."""
    es = es_frames(load_labels(labels)) if labels is not None and Path(labels).is_file() else {}
    return load_stacks(data, es=es or None, masks=masks)


class LabelsConflictError(ValueError):
    """The labels CSV changed on disk and cannot be merged; nothing was written."""


def file_state(path) -> tuple[int, int, str] | None:
    """(mtime_ns, size, sha256) of the file `path` names (through symlinks), None if absent."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, digest


def read_table(path) -> tuple[dict, tuple | None]:
    """The labels CSV as {(subject, phase): {(frame, slice): label}} plus the file state it was
    read at (read again if the file changed while it was read). Raises StackReadError (a
    ValueError naming the file and line) on a malformed CSV."""
    for _ in range(5):
        before = file_state(path)
        if before is None:
            return {}, None
        table: dict = {}
        for r in load_labels(path):
            table.setdefault((r.subject, r.phase), {})[(r.frame, int(r.slice))] = r.label
        if file_state(path) == before:
            return table, before
    raise LabelsConflictError(f"{path}: keeps changing while it is read; try again")


@contextlib.contextmanager
def folder_lock(path):
    """Advisory exclusive lock on the folder of the file `path` names (the CSV itself is replaced
    by a rename, so it cannot carry the lock); a no-op where flock is missing or refused."""
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(os.path.dirname(os.path.realpath(path)) or ".", os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


@dataclass
class LabelSession:
    """Stacks plus the label table, saved to `labels_path` after every change."""

    stacks: list[Stack]
    labels_path: Path
    index: int = 0
    selected: int = 0
    table: dict = field(default_factory=dict)  # (subject, phase) -> {(frame, slice): label}
    _pending: dict = field(default_factory=dict, init=False, repr=False)  # Row -> label | None
    _state: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.labels_path = Path(self.labels_path)
        if not self.stacks:
            raise ValueError("no stacks to label")
        # read_table raises with file and line on a malformed CSV; we never overwrite it.
        self.table, self._state = read_table(self.labels_path)
        # Labels already attached to the stacks (e.g. by load_stacks(labels=...)) count too.
        for s in self.stacks:
            if s.labels is not None:
                have = self.labels_of_stack(s)
                fr = self.frame_of(s)
                for sid, lab, old in zip(s.slice_ids, s.labels, have):
                    if old is None:
                        self._put((s.subject, s.phase, fr, sid), lab)
        self.index = self.first_unlabelled(start=0)
        if self.index is None:
            self.index = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def stack(self) -> Stack:
        return self.stacks[self.index]

    def frame_of(self, s: Stack) -> int | None:
        """The frame under which the stack's rows are kept: its own, else the one frame that rows
        of its (subject, phase) name, else None."""
        if s.frame is not None:
            return s.frame
        frames = {f for f, _ in self.table.get((s.subject, s.phase), {}) if f is not None}
        return frames.pop() if len(frames) == 1 else None

    def labels_of_stack(self, s: Stack) -> list[str | None]:
        grp = self.table.get((s.subject, s.phase), {})
        fr = self.frame_of(s)
        return [grp.get((fr, sid), grp.get((None, sid))) for sid in s.slice_ids]

    def labels_of(self, i: int | None = None) -> list[str | None]:
        return self.labels_of_stack(self.stacks[self.index if i is None else i])

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

    def rows(self) -> list[dict]:
        """The whole table as label rows, sorted (frameless rows first)."""
        out = [
            {"subject": sub, "frame": fr, "phase": ph, "slice": sl, "label": lab}
            for (sub, ph), grp in self.table.items() for (fr, sl), lab in grp.items()
        ]
        return sorted(out, key=lambda r: (r["subject"], r["phase"],
                                          -1 if r["frame"] is None else r["frame"], r["slice"]))

    # -- edits (each one is saved at once) ----------------------------------------------------
    def _put(self, row: Row, label: str | None) -> None:
        grp = self.table.setdefault(row[:2], {})
        if label is None:
            grp.pop(row[2:], None)
        else:
            grp[row[2:]] = label
        self._pending[row] = label

    def set_labels(self, labels: dict[int, str | None]) -> None:
        """slice position -> label (None clears) on the current stack, under its frame, saved
        once; a frameless row of the same slice is folded into it."""
        bad = sorted({str(v) for v in labels.values() if v is not None and v not in CLASS_INDEX})
        if bad:
            raise ValueError(f"unknown label(s) {bad}; expected one of {CLASSES}")
        s = self.stack
        fr = self.frame_of(s)
        grp = self.table.get((s.subject, s.phase), {})
        for k, lab in labels.items():
            sid = s.slice_ids[k]
            if fr is not None and (None, sid) in grp:
                self._put((s.subject, s.phase, None, sid), None)
            self._put((s.subject, s.phase, fr, sid), lab)
        self.save()

    def set_label(self, slice_pos: int, label: str) -> None:
        if label is None:
            raise ValueError(f"unknown label None; expected one of {CLASSES}")
        self.set_labels({slice_pos: label})

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
        self.set_labels({k: "OAP" if k < first else "IN" if k <= last else "OBS"
                          for k in range(self.stack.n_slices)})

    def clear(self) -> None:
        self.set_labels({k: None for k in range(self.stack.n_slices)})

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
        """Write the table; if another writer changed the CSV since this session last read or
        wrote it, merge first (their rows, then this session's pending edits on top)."""
        path = self.labels_path
        with folder_lock(path):
            now = file_state(path)
            if now is not None and now != self._state:
                try:
                    disk, _ = read_table(path)
                except (ValueError, OSError) as e:
                    raise LabelsConflictError(
                        f"{path} was changed by another program and cannot be read ({e}); NOT "
                        "saved and left as it is: fix or move it, your edits are kept in this "
                        "session and saved with the next change") from e
                for (sub, ph, fr, sl), lab in self._pending.items():
                    grp = disk.setdefault((sub, ph), {})
                    if lab is None:
                        grp.pop((fr, sl), None)
                    else:
                        grp[(fr, sl)] = lab
                self.table = disk
            # (a CSV deleted on disk is written again from this session's whole table)
            save_labels(self.rows(), path)
            self._state = file_state(path)  # under the lock: no other session wrote in between
            self._pending.clear()
            remove_stale_temps(path)


# ------------------------------------------------------------------------------- review queue
# The stacks a user should look at first (`stackcls predict --review-below P`): written once,
# read by `stackcls review --queue`, which walks the stacks in the file's order.

QUEUE_COLUMNS = ("order", "subject", "phase", "range_probability", "in_range_apex_to_base",
                 "coverage", "apex_end_in", "base_end_in", "alternatives", "slices", "source")


def _range_text(r) -> str:
    return "none" if r is None else f"{r[0]}..{r[1]}"


def queue_rows(preds, below: float) -> list:
    """The `predict.Prediction`s to review, least sure first: P(returned range) below `below`,
    or a coverage flag (the stack may stop short of the apex or the base)."""
    keep = [p for p in preds if p.range_probability is not None and (
        p.range_probability < below or (p.coverage or {}).get("status", "complete") != "complete")]
    return sorted(keep, key=lambda p: p.range_probability)


def write_review_queue(preds, path, below: float) -> tuple[Path, int]:
    """Write the review queue CSV (atomically); returns (path, stacks queued)."""
    rows = queue_rows(preds, below)
    path = Path(path)
    with replace_atomically(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(QUEUE_COLUMNS)
        for k, p in enumerate(rows, 1):
            cov = p.coverage or {}
            alts = "; ".join(f"{_range_text(a['in_range_apex_to_base'])} {a['probability']:.3f}"
                             for a in p.alternatives)
            w.writerow([k, csv_cell(p.subject or ""), csv_cell(p.phase or ""),
                        f"{p.range_probability:.4f}", _range_text(p.in_range_apex_to_base),
                        cov.get("status", ""), f"{cov.get('apex_end_in', float('nan')):.4f}",
                        f"{cov.get('base_end_in', float('nan')):.4f}", alts, len(p.labels),
                        csv_cell(p.sources[p.apex_to_base[0]] if p.sources else "")])
    return path, len(rows)


def read_review_queue(path) -> list[tuple[str, str]]:
    """The (subject, phase) of each queued stack, in the file's order. A malformed file raises
    ValueError naming it (and the line)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"subject", "phase"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: not a review queue (no column {', '.join(sorted(missing))}; "
                                 "write one with `stackcls predict ... --review-below P`)")
            out = []
            for row in reader:
                if not row.get("subject") or not row.get("phase"):
                    raise ValueError(f"{path}, line {reader.line_num}: subject or phase is empty")
                out.append((_uncell(row["subject"]), _uncell(row["phase"])))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the review queue ({type(e).__name__}: {e})") from None
    return out
