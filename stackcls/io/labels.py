"""Labels CSV: `subject,frame,phase,slice,label`, one row per slice.

`slice` is `Stack.slice_ids` (NIfTI: slice index in the file; DICOM: apex-to-base rank, 0 = most
apical); `frame` may be empty when unknown. Rows match stacks on (subject, phase), and on frame
when both the row and the stack have one.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from stackcls.atomic import replace_atomically
from stackcls.io.errors import StackReadError, os_reason
from stackcls.stack import CLASSES, Stack

COLUMNS = ("subject", "frame", "phase", "slice", "label")


class LabelRow(NamedTuple):
    subject: str
    frame: int | None
    phase: str
    slice: int
    label: str
    line: int = 0  # line in the CSV it came from (0 when built in memory)


def _check_utf8(path: Path) -> None:
    """A labels CSV is UTF-8 text (a BOM is allowed): say so, naming the line, instead of a
    UnicodeDecodeError from the middle of the csv module."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StackReadError(path, f"cannot read labels CSV: {os_reason(e)}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise StackReadError(path, "not UTF-8 text (UTF-16? it holds NUL bytes); save it as UTF-8 CSV")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StackReadError(path, f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}; "
                                   "latin-1/Windows-1252?); save it as UTF-8 CSV") from None


def load_labels(path) -> list[LabelRow]:
    """Read and validate a labels CSV (UTF-8); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise StackReadError(path, "labels CSV not found")
    _check_utf8(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise StackReadError(path, "empty labels CSV (expected header "
                                       f"{','.join(COLUMNS)})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise StackReadError(path, f"line 1: header {header} lacks column(s) {missing}; "
                                       f"expected {','.join(COLUMNS)}")
        col = {c: header.index(c) for c in COLUMNS}
        rows, seen = [], {}
        for i, rec in enumerate(reader, start=2):
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) < len(header):
                raise StackReadError(path, f"line {i}: {len(rec)} fields, header has {len(header)}")
            v = {c: rec[j].strip() for c, j in col.items()}
            v["subject"], v["phase"] = _uncell(v["subject"]), _uncell(v["phase"])
            if not v["subject"] or not v["phase"]:
                raise StackReadError(path, f"line {i}: empty subject or phase")
            try:
                sl = int(v["slice"])
                fr = int(v["frame"]) if v["frame"] else None
            except ValueError:
                raise StackReadError(path, f"line {i}: slice {v['slice']!r} and frame "
                                           f"{v['frame']!r} must be integers") from None
            if v["label"] not in CLASSES:
                raise StackReadError(path, f"line {i}: label {v['label']!r} is not one of {CLASSES}")
            key = (v["subject"], v["phase"], fr, sl)
            if key in seen:
                raise StackReadError(path, f"line {i}: slice {sl} of {v['subject']}/{v['phase']} "
                                           f"already labelled on line {seen[key]}")
            seen[key] = i
            rows.append(LabelRow(v["subject"], fr, v["phase"], sl, v["label"], i))
    return rows


def rows_of(items) -> list[LabelRow]:
    """Label rows from labelled Stacks (unlabelled ones are left out), LabelRows, dicts with the
    COLUMNS keys, or 5-tuples; every label checked."""
    rows = []
    for it in items:
        if isinstance(it, Stack):
            if it.labels is None:
                continue
            rows.extend(LabelRow(it.subject, it.frame, it.phase, sid, lab)
                        for sid, lab in zip(it.slice_ids, it.labels))
        elif isinstance(it, LabelRow):
            rows.append(it)
        elif isinstance(it, dict):
            fr = it.get("frame")
            rows.append(LabelRow(str(it["subject"]), None if fr in (None, "") else int(fr),
                                 str(it["phase"]), int(it["slice"]), str(it["label"])))
        else:
            s, fr, ph, sl, lab = it[:5]
            rows.append(LabelRow(str(s), None if fr in (None, "") else int(fr), str(ph), int(sl),
                                 str(lab)))
    for r in rows:
        if r.label not in CLASSES:
            raise ValueError(f"label {r.label!r} of {r.subject}/{r.phase} slice {r.slice} is not "
                             f"one of {CLASSES}")
    return rows


# Spreadsheets execute a cell that starts with one of these; the usual defence writes a leading
# apostrophe, which `load_labels` removes again, so names round-trip unchanged.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> str:
    v = str(value)
    return "'" + v if v.startswith(FORMULA_START) else v


def _uncell(v: str) -> str:
    return v[1:] if v.startswith("'") and v[1:].startswith(FORMULA_START) else v


def save_labels(stacks_or_rows, path) -> Path:
    """Write labelled stacks (unlabelled ones are left out) or rows (LabelRow, dicts with the
    COLUMNS keys, or 5-tuples) as a labels CSV. Atomic (`stackcls.atomic`): a temp file in the same
    folder is renamed over `path`, so a failure never leaves a half-written or emptied file."""
    path = Path(path)
    rows = rows_of(stacks_or_rows)
    with replace_atomically(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([csv_cell(r.subject), "" if r.frame is None else r.frame, csv_cell(r.phase),
                        r.slice, r.label])
    return path


def attach_labels(stacks: list[Stack], path_or_rows) -> list[Stack]:
    """Set `labels` on the stacks the rows name (in place; returns `stacks`).

    Errors (StackReadError naming the CSV and line): a subject no stack has, a slice id the stack
    lacks, a stack only partly labelled, a frame that contradicts the stack's. Rows of a loaded
    subject's phase that was not loaded are ignored; stacks without rows stay unlabelled.
    """
    if isinstance(path_or_rows, (str, os.PathLike)):
        where = str(path_or_rows)
        rows = load_labels(path_or_rows)
    else:
        where = "labels"
        rows = rows_of(path_or_rows)
    groups = defaultdict(list)
    for r in rows:
        groups[(r.subject, r.phase)].append(r)
    subjects = {s.subject for s in stacks}

    def at(r):
        return f"line {r.line}" if r.line else f"row {r.subject}/{r.phase}/{r.slice}"

    for (subject, phase), grp in groups.items():
        if subject not in subjects:
            raise StackReadError(where, f"{at(grp[0])}: subject {subject!r} matches no loaded stack "
                                        f"(loaded: {', '.join(sorted(subjects)) or 'none'})")
    taken = {}
    for st in stacks:
        grp = groups.get((st.subject, st.phase))
        if not grp:
            continue
        other = taken.setdefault((st.subject, st.phase, st.frame), st)
        if other is not st:  # e.g. two short-axis series of one patient: rows cannot tell them apart
            raise StackReadError(where, f"{at(grp[0])}: rows for {st.subject}/{st.phase} match two "
                                        f"loaded stacks ({other.meta.get('series_uid', '?')} and "
                                        f"{st.meta.get('series_uid', '?')}); load one series at a time")
        frames = {r.frame for r in grp if r.frame is not None}
        if st.frame is not None and frames:
            if st.frame not in frames:
                raise StackReadError(where, f"{at(grp[0])}: {st.subject}/{st.phase} is labelled as "
                                            f"frame {sorted(frames)} but the loaded stack is frame "
                                            f"{st.frame}")
            grp = [r for r in grp if r.frame in (None, st.frame)]
        elif len(frames) > 1:
            raise StackReadError(where, f"{at(grp[0])}: {st.subject}/{st.phase} has rows for frames "
                                        f"{sorted(frames)}; the stack's frame is unknown")
        by_id = {}
        for r in grp:
            if r.slice not in st.slice_ids:
                raise StackReadError(where, f"{at(r)}: {st.subject}/{st.phase} has no slice {r.slice} "
                                            f"(slice ids {st.slice_ids[0]}..{st.slice_ids[-1]}, "
                                            f"{st.n_slices} slices)")
            by_id[r.slice] = r.label
        missing = [i for i in st.slice_ids if i not in by_id]
        if missing:
            raise StackReadError(where, f"{at(grp[0])}: {st.subject}/{st.phase} labels {len(by_id)} of "
                                        f"{st.n_slices} slices; no label for slice id(s) {missing}")
        st.labels = [by_id[i] for i in st.slice_ids]
    return stacks


def es_frames(rows) -> dict[str, int]:
    """subject -> ES frame named by label rows (used to load the labelled ES phase)."""
    out = {}
    for r in rows:
        if r.phase == "ES" and r.frame is not None:
            out.setdefault(r.subject, r.frame)
    return out
