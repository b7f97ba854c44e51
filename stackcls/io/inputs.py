"""Any input of `predict_stack` -> one stack in working order plus the caller's order.

    si = resolve_stack_input(source, orientation=None, phase=None)   # -> StackInput

`source`: a `Stack`; a DICOM folder holding one stack; a list of the DICOM files of one stack in
any order (the caller's order is then the list's); a NIfTI file (the caller's order is the file's
slice index); or an array (S, H, W) with orientation "apex_to_base" | "base_to_apex" | "unknown".

The working order is apex -> base as far as it is known (`known`): a reader's geometry, or the
caller's word. When it is not known the predictor decides the direction from the data.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from stackcls.io import load_stacks
from stackcls.io.nifti import is_nifti
from stackcls.stack import Stack

ORIENTATIONS = ("apex_to_base", "base_to_apex", "unknown")


@dataclasses.dataclass
class StackInput:
    """A stack in working order (putatively apex -> base) and how it maps to the caller's order."""
    images: np.ndarray          # (S, H, W) working order
    caller_index: np.ndarray    # (S,) caller index of each working slice
    sources: list[str]          # caller order
    known: bool                 # working order's apex->base direction is known
    source: str                 # where the direction comes from: "geometry" | "caller" | "data"
    subject: str | None = None
    phase: str | None = None
    slice_ids: list[int] | None = None   # caller order
    masks: np.ndarray | None = None      # (S, H, W) working order, as `images`, when the stack has them
    spacing: tuple | None = None         # (row, col, slice) mm, when the file or caller says
    spacing_used: dict | None = None     # the in-plane spacing the model used, and how it got it


def resolve_stack_input(source, orientation: str | None = None,
                        phase: str | None = None) -> StackInput:
    """One stack from any supported input (see the module docstring), with at least 2 slices.

    orientation: for arrays, required; for Stacks and files, None uses the reader's geometry
    (`orientation_known`), "unknown" leaves the direction to the data, "apex_to_base" trusts the
    stack order. phase: for DICOM/NIfTI inputs holding a cine, which phase ("ED", "ES" or an
    index), passed to `stackcls.io.load_stacks`.
    """
    if orientation is not None and orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS} or None, got {orientation!r}")
    if isinstance(source, Stack):
        w = _from_stack(source, orientation)
    elif isinstance(source, (str, os.PathLike)):
        w = _from_path(Path(source), orientation, phase)
    elif isinstance(source, (list, tuple)):
        w = _from_files(source, orientation, phase)
    else:
        w = _from_array(source, orientation)
    if w.images.shape[0] < 2:
        raise ValueError(f"predict_stack: {w.subject or 'stack'} has {w.images.shape[0]} slice(s); a stack "
                         f"needs at least 2 (boundaries and orientation are undefined for one slice)")
    return w


def _one_stack(stacks: list[Stack], where: str) -> Stack:
    if not stacks:
        raise ValueError(f"{where}: no readable stack found")
    if len(stacks) > 1:
        desc = ", ".join(f"{s.key} ({s.meta.get('series_uid', s.meta.get('series', '?'))}, {s.n_slices} slices)"
                         for s in stacks)
        raise ValueError(f"{where}: holds {len(stacks)} stacks ({desc}); predict_stack takes one stack "
                         f"(pass phase=..., a single series, or use `stackcls predict` for many)")
    return stacks[0]


def _load(source, phase: str | None) -> list[Stack]:
    if phase is not None:
        return load_stacks(source, phases=(phase,))
    return load_stacks(source)


def _from_stack(st: Stack, orientation: str | None, caller_index=None, sources=None) -> StackInput:
    S = st.n_slices
    ci = np.arange(S) if caller_index is None else np.asarray(caller_index)
    srcs = list(st.sources) if sources is None else list(sources)
    ids = [None] * S
    for w in range(S):
        ids[ci[w]] = st.slice_ids[w]
    if orientation is None:
        known, how = bool(st.orientation_known), "geometry" if st.orientation_known else "data"
    elif orientation == "unknown":
        known, how = False, "data"
    elif orientation == "apex_to_base":
        known, how = True, "caller"
    else:
        raise ValueError(f"orientation={orientation!r} for a Stack / files: use None (the reader's), "
                         f"'apex_to_base' (trust the stack order) or 'unknown'")
    return StackInput(st.images, ci, srcs, known, how, st.subject, st.phase, ids, st.masks,
                      st.spacing)


def _from_path(p: Path, orientation: str | None, phase: str | None) -> StackInput:
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    st = _one_stack(_load(p, phase), str(p))
    if not is_nifti(p):
        return _from_stack(st, orientation)
    # caller order = slice index in the file
    order = np.argsort(np.argsort(np.asarray(st.slice_ids)))
    srcs = [None] * st.n_slices
    for wi, c in enumerate(order):
        srcs[c] = st.sources[wi]
    return _from_stack(st, orientation, order, srcs)


def _from_files(files, orientation: str | None, phase: str | None) -> StackInput:
    if len(files) == 0:
        raise ValueError("predict_stack: empty list of DICOM files")
    if not all(isinstance(s, (str, os.PathLike)) for s in files):
        raise TypeError("predict_stack: a list must hold DICOM file paths")
    paths = [Path(s) for s in files]
    st = _one_stack(_load(paths, phase), f"list of {len(paths)} DICOM files")
    pos = {}
    for i, p in enumerate(paths):
        pos.setdefault(os.path.realpath(p), i)
    # by the file each slice came from (Stack.files), never by its display name; the frames of one
    # multi-frame file follow the file's place in the list, apex to base among themselves
    key = []
    for w, f in enumerate(st.files or []):
        i = pos.get(os.path.realpath(f))
        if i is None:
            raise ValueError(f"predict_stack: the reader returned a slice of {f!r}, which is not in "
                             "the list")
        key.append((i, w))
    if len(key) != st.n_slices:
        raise ValueError("predict_stack: the stack read from the list has no file per slice")
    used = {i for i, _ in key}
    if len(used) != len(paths):
        left = [str(paths[i]) for i in range(len(paths)) if i not in used]
        raise ValueError(f"predict_stack: {len(left)} of the {len(paths)} files are not slices of the "
                         f"stack read (other phase, duplicate or not an image?): {left[:5]}")
    order = np.empty(st.n_slices, np.int64)
    order[sorted(range(st.n_slices), key=key.__getitem__)] = np.arange(st.n_slices)
    srcs = [None] * st.n_slices
    for w, c in enumerate(order):
        src = st.sources[w]
        # the caller's spelling of the path, and the frame of a multi-frame file
        srcs[c] = str(paths[key[w][0]]) + src[len(st.files[w]):] if src.startswith(st.files[w]) else src
    return _from_stack(st, orientation, order, srcs)


def _from_array(images, orientation: str | None) -> StackInput:
    arr = np.asarray(images, np.float32)
    if arr.ndim != 3:
        raise ValueError(f"predict_stack: an array stack must be (S, H, W), got shape {arr.shape}")
    if orientation is None:
        raise ValueError("predict_stack: an array needs orientation='apex_to_base', 'base_to_apex' or 'unknown'")
    S = arr.shape[0]
    if orientation == "base_to_apex":
        w = StackInput(arr[::-1], np.arange(S)[::-1].copy(), [str(i) for i in range(S)], True, "caller")
    else:
        w = StackInput(arr, np.arange(S), [str(i) for i in range(S)], orientation == "apex_to_base",
                       "caller" if orientation == "apex_to_base" else "data")
    w.slice_ids = list(range(S))
    return w
