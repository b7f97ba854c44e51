"""The archive's units of work (stackcls.predict.archive): the lazy walk of a tree into read
units, shards, reading one unit into preprocessed stacks, the set of units and stacks already done
(resume), and the summary CSV rewritten from the JSONL."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import resource
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from stackcls.atomic import replace_atomically
from stackcls.io import _NOT_IMAGES as NOT_IMAGES
from stackcls.io.errors import printable
from stackcls.io.nifti import is_nifti


SUMMARY_COLUMNS = ("unit", "subject", "phase", "slices", "in_first", "in_last", "in_slices",
                   "range_probability", "orientation", "warnings")



@dataclasses.dataclass(frozen=True)
class Unit:
    """What one worker reads at once. rel: its path relative to the root ("." for the root
    itself), its identity in the output and for sharding."""

    rel: str
    kind: str                        # "dicom" (files of one folder) | "nifti" | "acdc"
    files: tuple[str, ...] = ()      # dicom: file names inside the folder



def units(root) -> Iterator[Unit]:
    """The read units under `root` in a fixed order (sorted names), found while walking; hidden
    files and folders and files that are no images (by extension) are passed over."""
    root = Path(root)
    if root.is_file():
        yield Unit(".", "nifti" if is_nifti(root.name) else "dicom",
                   () if is_nifti(root.name) else ("",))
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        if "Info.cfg" in filenames and any(is_nifti(f) for f in filenames):
            dirnames[:] = []                 # an ACDC patient folder holds no further images
            yield Unit(rel, "acdc")
            continue
        dicom = []
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            if is_nifti(f):
                yield Unit(os.path.normpath(os.path.join(rel, f)), "nifti")
            elif Path(f).suffix.lower() not in NOT_IMAGES | {".jsonl"}:
                dicom.append(f)
        if dicom:
            yield Unit(rel, "dicom", tuple(dicom))



def in_shard(unit: Unit, shard: tuple[int, int]) -> bool:
    i, n = shard
    return zlib.crc32(unit.rel.encode("utf-8", "surrogateescape")) % n == i



def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n



def read_unit(root: str, unit: Unit, size: int | None, keep: float) -> dict:
    """Read and preprocess one unit (runs in a reader thread or process; imports no JAX).
    size None: the slices are left as read (a model whose preprocessing runs networks).

    Returns dict(unit, stacks=[(key, StackInput with images (S, size, size) preprocessed)],
    errors=[(key, reason)], skipped=[(path, reason)], files, read_s, preprocess_s, rss_mb: the
    reading process's peak resident memory so far)."""
    from stackcls.io import scan
    from stackcls.io.inputs import resolve_stack_input
    from stackcls.preprocess.arrays import grey_model_input

    t0 = time.perf_counter()
    path = Path(root) / unit.rel
    if unit.kind == "dicom":
        source = [str(path / f) if f else str(path) for f in unit.files]
    else:
        source = path
    res = scan(source, progress=False)
    t1 = time.perf_counter()
    stacks, errors, seen = [], [], defaultdict(int)
    for st in res.stacks:
        key = f"{unit.rel}|{st.key}"
        seen[key] += 1
        if seen[key] > 1:                    # several series of one subject and phase
            key += f"|{seen[key]}"
        try:
            w = resolve_stack_input(st)
        except ValueError as e:
            errors.append((key, str(e)))
            continue
        if size is not None:
            w.images = grey_model_input(w.images, size, keep)   # RGB is grey x 3: made on the device
        stacks.append((key, w))
    n_files = (len(unit.files) if unit.kind == "dicom" else 1 if unit.kind == "nifti"
               else sum(1 for f in os.listdir(path) if is_nifti(f)))
    return dict(unit=unit, stacks=stacks, errors=errors, files=n_files,
                skipped=[(printable(str(p)), str(r)) for p, r in res.skipped],
                read_s=t1 - t0, preprocess_s=time.perf_counter() - t1,
                rss_mb=peak_rss_mb())



def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM, since ru_maxrss keeps across exec the
    peak of the parent a spawned worker was forked from; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)



def _load_done(out: Path) -> tuple[set, set]:
    """(units with a "done" line, stack keys with a line) of an existing output; a last line
    cut short by a kill is removed."""
    units_done, stacks_done = set(), set()
    if not out.exists():
        return units_done, stacks_done
    with open(out, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{out}: line {n} is not JSON; not an output of `stackcls predict "
                             "--out` (choose another --out)") from None
        if "done" in rec:
            units_done.add(rec["unit"])
        elif "stack" in rec:
            stacks_done.add(rec["stack"])
    return units_done, stacks_done



def write_summary(jsonl, csv_path) -> int:
    """One CSV row per stack line of `jsonl` (streamed; atomically written). Returns the rows."""
    n = 0
    with open(jsonl) as src, replace_atomically(csv_path, newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for line in src:
            rec = json.loads(line)
            if "stack" not in rec:
                continue
            rng = rec.get("in_range_apex_to_base")
            warn = [v for v in (rec.get("orientation_warning"), rec.get("error")) if v]
            prob = rec.get("range_probability")
            w.writerow([rec["unit"], rec.get("subject"), rec.get("phase"),
                        len(rec.get("labels") or []) or "",
                        "" if not rng else rng[0], "" if not rng else rng[1],
                        "" if not rng else rng[1] - rng[0] + 1,
                        "" if prob is None else prob, rec.get("orientation", ""), "; ".join(warn)])
            n += 1
    return n
