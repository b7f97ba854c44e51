"""`stackcls inspect PATH [--labels CSV]`: what the readers make of a folder or file. Every line
goes through `printable`: a non-UTF-8 file name prints as `bad\\xff.dcm`, never a crash."""

from __future__ import annotations

import sys
from collections import Counter

from stackcls.io import scan
from stackcls.io.errors import StackReadError, printable

_SHORT = {"OAP": "OAP", "IN": "IN", "OBS": "OBS"}


def describe(st) -> str:
    """A few lines about one stack."""
    frame = "" if st.frame is None else f" frame {st.frame}"
    h, w = st.images.shape[1:]
    lines = [f"{st.subject}  {st.phase}{frame}  {st.n_slices} slices  {h}x{w}"
             + (f"  spacing {st.spacing[0]:.2f}x{st.spacing[1]:.2f}x{st.spacing[2]:.2f} mm"
                if st.spacing is not None and all(s == s for s in st.spacing) else "")]
    src = "geometry" if st.orientation_known else "unknown/convention"
    lines.append(f"  orientation: {src}: {st.meta.get('orientation', '')}")
    if st.meta.get("es_source") and st.phase == "ES":
        lines.append(f"  ES: {st.meta['es_source']}")
    ids = " ".join(str(i) for i in st.slice_ids)
    lines.append(f"  apex->base slice ids: {ids}")
    if st.positions is not None:
        lines.append("  positions (mm): " + " ".join(f"{p:.1f}" for p in st.positions))
    if st.labels is not None:
        lines.append("  labels: " + " ".join(_SHORT[l] for l in st.labels))
    for w in st.meta.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def inspect_command(path, labels=None) -> int:
    """Print every stack found under `path` and every file skipped with its reason.
    Returns 0 when at least one stack was found, else 1."""
    try:
        res = scan(path, labels=labels)
    except StackReadError as e:
        print(printable(f"error: {e}"), file=sys.stderr)
        return 1
    for st in res.stacks:
        print(printable(describe(st)))
    n_lab = sum(st.labels is not None for st in res.stacks)
    print(f"{len(res.stacks)} stack(s) from {len({s.subject for s in res.stacks})} subject(s)"
          + (f", {n_lab} labelled" if labels is not None else ""))
    if res.ignored:
        kinds = Counter(why for _, why in res.ignored)
        print(printable("ignored: " + ", ".join(f"{n} {why}" for why, n in kinds.most_common())))
    if res.skipped:
        print(f"skipped {len(res.skipped)} file(s):")
        for p, why in res.skipped:
            print(printable(f"  {p}: {why}"))
    if not res.stacks:
        print(printable(f"error: {path}: no stack found"), file=sys.stderr)
        return 1
    return 0
