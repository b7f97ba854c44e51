"""What a study trains on: the labelled stacks split by patient, and the backbone at its input size."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

from stackcls.models import backbones
from stackcls.io import load_stacks
from stackcls.phantom import cohort
from stackcls.preprocess.arrays import split_subjects
from stackcls.stack import Stack
from stackcls.study.config import Study


def _stacks(study: Study) -> tuple[list[Stack], float | int]:
    """Every labelled stack of the data, and the test set's share (a fraction or a count)."""
    d, p = study.data, study.protocol
    if d.name == "synthetic":
        n_tr, n_te = p.synthetic_subjects.train, p.synthetic_subjects.test
        root = cohort(n_tr + n_te, seed=d.cohort_seed)
        return load_stacks(root / "dicom", labels=root / "labels.csv", masks=root / "masks"), n_te
    if d.name not in ("acdc", "dicom"):
        raise ValueError(f"unknown data.name {d.name!r} (synthetic, acdc or dicom)")
    root = Path(d.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root={root}: no such folder")
    labels = d.labels or (root / "labels.csv" if d.name == "acdc" else None)
    if labels is None:
        raise ValueError("data=dicom needs data.labels=CSV (subject,frame,phase,slice,label)")
    masks = Path(d.masks).expanduser() if d.masks else None  # acdc: the _gt files beside the images
    return load_stacks(root, labels=Path(labels), masks=masks), d.test_size


def some_subjects(stacks: list[Stack], n: int, seed: int) -> list[Stack]:
    """The stacks of `n` patients drawn at random (seeded): data.max_subjects."""
    subjects = sorted({s.subject for s in stacks})
    keep = set(np.random.default_rng(seed).permutation(subjects)[:n])
    return [s for s in stacks if s.subject in keep]


def load_data(study: Study) -> tuple[list[Stack], list[Stack]]:
    """(train stacks, test stacks) split by patient; test_size 0 (data.test_size=0, or
    protocol.synthetic_subjects.test=0): every stack trains, no test set."""
    stacks, test_size = _stacks(study)
    unlabelled = [s.key for s in stacks if s.labels is None]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} stack(s) have no labels (e.g. {unlabelled[:3]}); "
                         "every stack needs labels for training and evaluation")
    if study.data.max_subjects:
        stacks = some_subjects(stacks, int(study.data.max_subjects), study.seed)
    if test_size == 0:
        return stacks, []
    tr, te = split_subjects([s.subject for s in stacks], test_size=test_size, seed=study.seed)
    return [stacks[i] for i in tr], [stacks[i] for i in te]


def make_backbone(study: Study, size: int):
    """(backbone, weights description). weights=imagenet that cannot be had: loud warning and
    random initialisation, recorded as "random (imagenet unavailable)"."""
    name, w, seed = study.backbone, study.weights, study.seed
    if not backbones.spec(name).pretrained:
        return backbones.create(name, weights=None, input_size=size, seed=seed), "scratch"
    if w is None or str(w).lower() in ("none", "random", "null"):
        return backbones.create(name, weights=None, input_size=size, seed=seed), "random"
    if str(w).lower() == "imagenet":
        try:
            return backbones.create(name, weights="imagenet", input_size=size, seed=seed), "imagenet"
        except Exception as e:  # offline, no cached file, ...: never silently
            msg = (f"\n{'!' * 78}\n!! {name}: ImageNet weights unavailable ({type(e).__name__}: {e})\n"
                   f"!! falling back to RANDOM initialisation; results.json records it.\n{'!' * 78}")
            print(msg, file=sys.stderr)
            warnings.warn(f"{name}: ImageNet weights unavailable, random initialisation", stacklevel=2)
            return (backbones.create(name, weights=None, input_size=size, seed=seed),
                    "random (imagenet unavailable)")
    path = Path(w).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={w}: no such file")
    return backbones.create(name, weights=path, input_size=size, seed=seed), f"file:{path.name}"


def input_size(study: Study) -> int:
    """The protocol's image size for this backbone (its own size when unset or below its minimum)."""
    spec = backbones.spec(study.backbone)
    want = study.protocol.image_size
    if isinstance(want, dict):  # per-backbone sizes: {vgg16: 64, default: 96}
        want = want.get(study.backbone, want.get("default"))
    if want is None:
        return int(spec.input_size)
    want = int(want)
    if want < spec.min_size:
        warnings.warn(f"{study.backbone}: image_size {want} < its minimum {spec.min_size}; "
                      f"using {spec.input_size}", stacklevel=2)
        return int(spec.input_size)
    return want
