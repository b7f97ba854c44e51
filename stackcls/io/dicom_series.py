"""DICOM images -> series -> Stacks ordered apex to base: grouping by subject, series, image
size, kind, echo and orientation; positions along the normal; phases by TriggerTime (InstanceNumber
only as a warned fallback); the apex end from LPS geometry (geometry.apex_to_base); ED and ES
(estimated from the stored values where it can be)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from stackcls.io import dicom_enhanced as enh
from stackcls.io.geometry import (apex_to_base, es_disk, estimate_es, estimate_es_from_counts,
                                  middle_slices, resolve_phases)
from stackcls.io.limits import max_stack_bytes, mb
from stackcls.io.dicom_pixels import PixelStore
from stackcls.io.dicom_slices import DicomSlice
from stackcls.stack import Stack



POSITION_TOL_MM = 0.1    # two images closer than this along the normal are at the same position



TRIGGER_TOL_MS = 0.5     # two images at one position closer than this in time are duplicates



ORIENT_COS_TOL = 0.9998  # ~1.1 degrees: normals closer than this belong to one stack



STACK_CHUNK = 16 << 20  # the stacks' images are cut from buffers this large (PixelStore)



MAX_COUNT_BINS = 1 << 22  # _stored_es counts values in a table this long at most (8 bytes a bin)



def _groups(slices: list[DicomSlice]) -> list[list[DicomSlice]]:
    """Split by (subject, series, image size, image kind, echo), then by slice orientation (normals
    within ~1 deg)."""
    by_key = defaultdict(list)
    for s in slices:
        by_key[(s.subject, s.study, s.group, s.shape, s.kind, s.echo)].append(s)
    out = []
    for key in sorted(by_key, key=str):
        clusters: list[tuple[np.ndarray, list]] = []
        for s in by_key[key]:
            for ref, members in clusters:
                # the same array as ref (check() shares it across a series' files) is its own
                # unit normal: always within the tolerance
                if s.normal is ref or abs(float(np.dot(ref, s.normal))) > ORIENT_COS_TOL:
                    members.append(s)
                    break
            else:
                clusters.append((s.normal, [s]))
        out.extend(m for _, m in clusters)
    return out



def _phase_order(items: list[DicomSlice], use_trigger: bool):
    """Sort the images at one position in time; returns (kept in time order, duplicates as
    (slice, kept_slice))."""
    key = (lambda s: (s.trigger, s.instance or 0, s.path, s.frame_no or 0)) if use_trigger else \
          (lambda s: (s.instance if s.instance is not None else 0, s.path, s.frame_no or 0))
    items = sorted(items, key=key)
    kept, dups = [], []
    for s in items:
        if kept:
            prev = kept[-1]
            same = (s.sop and s.sop == prev.sop) or (
                abs(s.trigger - prev.trigger) < TRIGGER_TOL_MS if use_trigger
                else s.instance == prev.instance)
            if same:
                dups.append((s, prev))
                continue
        kept.append(s)
    return kept, dups



def stacks_from_slices(slices: list[DicomSlice], phases=("ED", "ES"), es=None):
    """Group readable slices into stacks. Returns (stacks, skipped [(path, reason)], warnings)."""
    stacks, skipped, warns = [], [], []
    echoes = defaultdict(set)  # a stack names its echo only where its series has several
    for s in slices:
        echoes[(s.subject, s.study, s.group)].add(s.echo)
    # With every phase kept, the cines are the stacks' memory: taken from one buffer, which numpy
    # asks the kernel to back with huge pages (a few page faults, not one per 4 KB, which cost ~20%
    # of a scan). Full grids need exactly one value per image pixel; a cine that does not fit (a
    # grid with gaps) gets its own array. Untouched parts (skipped series) take no memory.
    arena = np.empty(sum(s.shape[0] * s.shape[1] for s in slices) if phases == "all" else 0,
                     np.float32)
    arena_used = 0
    scratch = [np.empty(0, np.intp)]  # _stored_es's
    images = PixelStore(STACK_CHUNK)  # the other stacks' images
    for group in _groups(slices):
        ser = _plan(group, echoes, skipped, warns)
        if ser is None:
            continue
        n_phases, (H, W) = ser.n_phases, ser.g0.shape
        subject_es = es.get(ser.g0.subject) if isinstance(es, dict) else es
        if subject_es is not None:
            es_t = int(subject_es)
            es_how = "given by the labels CSV" if isinstance(es, dict) else "given by the caller"
            if not 0 <= es_t < n_phases:
                warns.append(f"{ser.where}: ES frame {es_t} is outside the {n_phases} phases; ES "
                             "not loaded")
                es_t = -1
        elif phases == "all" and n_phases > 2:
            # the cine (T, S, H, W): every phase's stack; missing slices are zeros
            size = n_phases * len(ser.centers) * H * W
            if arena_used + size <= arena.size:
                ser.cine = arena[arena_used:arena_used + size].reshape(n_phases, -1, H, W)
                arena_used += size
            else:
                ser.cine = np.empty((n_phases, len(ser.centers), H, W), np.float32)
            _fill_cine(ser.cine, ser.timeline, ser.rank)
            es_t, es_how = _stored_es(ser, scratch) or estimate_es(ser.cine)
        elif "ES" in ((phases,) if isinstance(phases, (str, int)) else phases) and n_phases > 2:
            # the stacks are made from their own images: the estimate needs no cine when it can
            # count stored values, else only the middle slices it reads
            es_t, es_how = _stored_es(ser, scratch) or _middle_es(ser)
        else:
            es_t, es_how = estimate_es(np.zeros((n_phases, 1, 1, 1), np.float32))
        _add_stacks(ser, phases, es_t, es_how, stacks, skipped, images)
    return stacks, skipped, warns



@dataclasses.dataclass
class _Series:
    """One group of slices on its way to stacks: what grouping them by position and time found."""

    g0: DicomSlice
    where: str           # how messages name it
    several: bool        # its series has several echoes: stacks name theirs
    centers: np.ndarray  # slice positions along the normal, one per position cluster
    timeline: dict       # position cluster -> its images in time order
    n_phases: int
    use_trigger: bool
    meta_warn: list
    ab_pos: np.ndarray   # positions in mm, apex to base
    known: bool          # apex end known from geometry
    note: str
    rank: np.ndarray     # position cluster -> apex-to-base rank
    cine: np.ndarray | None = None  # every phase, when all are kept



def _plan(group: list[DicomSlice], echoes, skipped: list, warns: list) -> _Series | None:
    """A group's positions and phases, or None (reasons in `skipped`) when it makes no stack."""
    g0 = group[0]
    normal = g0.normal
    several = len(echoes[(g0.subject, g0.study, g0.group)]) > 1
    where = (f"series {g0.group} of {g0.subject}"
             + (f" ({g0.kind.lower()} images)" if g0.kind != enh.MAGNITUDE else "")
             + (f" ({g0.echo})" if several and g0.echo else ""))
    along = {}  # one product per position array (check() shares it across the phases)
    d = np.array([along[id(s.ipp)] if id(s.ipp) in along else
                  along.setdefault(id(s.ipp), float(s.ipp @ normal)) for s in group])
    # cluster positions along the normal: a new position where the gap to the previous image in
    # position order exceeds the tolerance
    order = np.argsort(d, kind="stable")
    d_sorted = d[order]
    new = np.empty(len(d), bool)
    new[0] = True
    new[1:] = np.diff(d_sorted) > POSITION_TOL_MM
    pos_id = np.empty(len(group), dtype=int)
    pos_id[order] = np.cumsum(new) - 1
    bounds = [*np.flatnonzero(new), len(d)]
    # each the mean of its cluster, as np.mean sums and divides it (~5x less overhead)
    centers = np.array([d_sorted[a:b].sum() / (b - a) for a, b in zip(bounds, bounds[1:])])
    if len(centers) < 2:
        for s in group:
            skipped.append((s.source, f"single-slice series: {where} has {len(group)} image(s), "
                                      f"all at one position ({centers[0]:.2f} mm along the "
                                      "normal); a stack needs at least 2 slice positions"))
        return None
    use_trigger = all(s.trigger is not None for s in group)
    at_pos = defaultdict(list)
    for s, p in zip(group, pos_id):
        at_pos[int(p)].append(s)
    timeline = {}
    for p, items in at_pos.items():
        kept, dups = _phase_order(items, use_trigger)
        for s, prev in dups:
            why = (f"trigger time {s.trigger:g} ms" if use_trigger
                   else f"{s.order_tag} {s.instance}")
            skipped.append((s.source, f"duplicate: same position ({centers[p]:.2f} mm) and {why} "
                                      f"as {prev.source} in {where}; kept that one"))
        timeline[p] = kept
    n_phases = max(len(v) for v in timeline.values())
    grid = n_phases * len(centers) * g0.shape[0] * g0.shape[1] * 4  # the (T, S, H, W) cine
    if grid > (limit := max_stack_bytes()):  # a sparse grid: few files, a huge cine
        for s in (s for items in timeline.values() for s in items):  # duplicates: said above
            skipped.append((s.source, f"{where}: {n_phases} phases x {len(centers)} positions of "
                                    f"{g0.shape[0]} x {g0.shape[1]} need {mb(grid)} as a cine, "
                                    f"over the per-stack limit of {mb(limit)} (set "
                                    "STACKCLS_MAX_STACK_MB to raise it): the series is skipped"))
        return None
    meta_warn = []
    if not g0.series:
        msg = (f"{where}: grouped by folder, SeriesNumber, SeriesDescription and orientation; "
               "two series sharing all four would be merged")
        meta_warn.append(msg)
        warns.append(msg)
    if not use_trigger and n_phases > 1:
        msg = f"{where}: TriggerTime missing, cine phases ordered by {g0.order_tag}"
        meta_warn.append(msg)
        warns.append(msg)
    counts = {len(v) for v in timeline.values()}
    if len(counts) > 1:
        msg = (f"{where}: positions have different phase counts {sorted(counts)}; phases are "
               "matched by their rank in time, some slices are missing from some phases")
        meta_warn.append(msg)
        warns.append(msg)
    ab_order, ab_pos, known, note = apex_to_base(normal, centers)
    rank = np.empty(len(centers), dtype=int)
    rank[ab_order] = np.arange(len(centers))  # position cluster -> apex-to-base rank
    return _Series(g0, where, several, centers, timeline, n_phases, use_trigger, meta_warn, ab_pos,
                   known, note, rank)



def _add_stacks(ser: "_Series", phases, es_t: int, es_how: str, stacks: list,
                skipped: list, store: PixelStore) -> None:
    """The series' stacks, the phases asked for, appended to `stacks`."""
    g0, where, timeline, rank, centers, cine = (ser.g0, ser.where, ser.timeline, ser.rank,
                                                ser.centers, ser.cine)
    n_phases, ab_pos, normal, H, W = ser.n_phases, ser.ab_pos, g0.normal, *g0.shape
    if n_phases == 1:
        es_t = -1
        es_how = "single-phase series: no ES"
    for t, name in resolve_phases(phases, n_phases, es_t):
        sl = sorted(((rank[p], items[t]) for p, items in timeline.items() if t < len(items)),
                    key=lambda x: x[0])
        if len(sl) < 2:
            for _, s in sl:
                skipped.append((s.source, f"{where}: phase {t} has a single slice"))
            continue
        ranks = [int(r) for r, _ in sl]
        ss = [s for _, s in sl]
        pos = np.array([ab_pos[r] for r in ranks])
        gaps = np.diff(ab_pos)
        spacing = (ss[0].pixel_spacing[0], ss[0].pixel_spacing[1],
                   float(np.median(gaps)) if len(gaps) else (ss[0].thickness or float("nan")))
        meta = dict(
            format="dicom", series_uid=g0.series, study_uid=g0.study,
            series_description=g0.series_description, normal=[float(x) for x in normal],
            orientation=ser.note, n_phases=n_phases, es_frame=es_t if es_t >= 0 else None,
            es_source=es_how, phase_source="TriggerTime" if ser.use_trigger else g0.order_tag,
            trigger_time=ss[0].trigger, thickness=ss[0].thickness, warnings=list(ser.meta_warn),
            image_type=g0.kind,
        )
        if ser.several:
            meta["echo"] = g0.echo
        if len(ranks) < len(centers):
            meta["warnings"].append(f"phase {t}: {len(centers) - len(ranks)} slice(s) missing")
        if cine is not None and len(ranks) == len(centers):
            images = cine[t]  # every phase kept: the stacks share the cine's memory
        else:
            images = store.empty((len(ss), H, W), np.float32)
            for i, s in enumerate(ss):
                s.image_into(images[i])
        stacks.append(Stack(
            images=images, sources=[s.source for s in ss], files=[s.path for s in ss],
            subject=g0.subject, phase=name, slice_ids=ranks, frame=t, positions=pos,
            spacing=spacing, orientation_known=ser.known, meta=meta,
        ))



def _fill_cine(cine: np.ndarray, timeline: dict, rank: np.ndarray) -> None:
    """cine[t, rank[p]] = the images at position p in time order, zeros after its last; positions
    whose rank falls outside the cine are left out."""
    S = cine.shape[1]
    for p, items in timeline.items():
        r = rank[p]
        if 0 <= r < S:
            for t, s in enumerate(items):
                s.image_into(cine[t, r])
            cine[len(items):, r] = 0



def _middle_es(ser: _Series) -> tuple[int, str]:
    """estimate_es from a cine of only the middle slices it reads."""
    S, (H, W) = len(ser.centers), ser.g0.shape
    lo, hi = middle_slices(S)
    mid = np.empty((ser.n_phases, hi - lo, H, W), np.float32)
    _fill_cine(mid, ser.timeline, ser.rank - lo)
    return estimate_es(mid, n_slices=S)



def _stored_es(ser: _Series, scratch: list) -> tuple[int, str] | None:
    """estimate_es of the series' cine, counted from the stored integer values of the disks it
    reads, nothing converted: each distinct stored value is rescaled once, as image_into rescales
    it, and a phase missing at a position counts as that many zeros, as in the cine. None where
    that does not apply: float stored values, more than one rescale among those images, a range
    of values too wide to count in a table. scratch: [a buffer reused by the scan's series], so
    that each does not fault in fresh pages (~3 us a page on a VM, most of this otherwise)."""
    S, (H, W), T = len(ser.centers), ser.g0.shape, ser.n_phases
    lo, hi = middle_slices(S)
    mid = [(ser.rank[p] - lo, items) for p, items in ser.timeline.items() if lo <= ser.rank[p] < hi]
    s0 = mid[0][1][0]
    if any(s.stored.dtype.kind not in "iu" or s.slope != s0.slope or s.intercept != s0.intercept
           for _, items in mid for s in items):
        return None
    (rows, cols), disk = es_disk(H, W)
    shape = (T, hi - lo, int(disk.sum()))
    if scratch[0].size < np.prod(shape):
        scratch[0] = np.empty(int(np.prod(shape)), np.intp)
    values_at = scratch[0][:np.prod(shape)].reshape(shape)
    missing = np.zeros((T, hi - lo), bool)
    for r, items in mid:
        for t, s in enumerate(items):
            values_at[t, r] = s.stored[rows, cols][disk]
        values_at[len(items):, r] = values_at[0, r]  # a value present, until the range is known
        missing[len(items):, r] = True
    v0 = 0 if all(s.stored.dtype.kind == "u" for _, items in mid for s in items) else \
        int(values_at.min())  # unsigned values count from 0: a pass saved, a few more bins
    if v0:
        values_at -= v0
    span = int(values_at.max()) + 1
    if (span + 1) * T > MAX_COUNT_BINS:
        return None
    if missing.any():
        values_at[missing] = span  # one more value: the zeros of the missing images
    counts = np.stack([np.bincount(values_at[t].ravel(), minlength=span + 1) for t in range(T)])
    values = np.zeros(span + 1, np.float32)
    dataclasses.replace(s0, stored=np.arange(v0, v0 + span)).image_into(values[:span])
    return estimate_es_from_counts(values, counts, S)
