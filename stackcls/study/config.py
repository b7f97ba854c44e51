"""The study's configuration: typed, frozen, and the one place that states its defaults.

    Study                      backbone, depth, weights, seed, run_dir, vmap, devices, ...
      data: DataConfig         synthetic (SyntheticData) | acdc | dicom      (the `data` presets)
      protocol: Protocol       paper (the dataclass defaults) | quick        (the `protocol` presets)
        learning_rates         per setting (depth0, depth1, scratch)
        stack: StackStage      the stack head (stack_model.StackHeadConfig) + enabled, inputs

`register()` puts the presets and the schema into Hydra's ConfigStore, so that command lines
(`protocol=paper data=acdc data.root=... protocol.stack.epochs=100`) are checked against these
types; `compose(overrides)` gives the same result as a `Study` without a command line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from hydra import compose as hydra_compose, initialize
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from stackcls.stack_model import StackHeadConfig


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class DataConfig:
    """A labelled DICOM/NIfTI folder: ACDC (patientXXX/patientXXX_frameYY.nii.gz + labels.csv) or
    any DICOM tree with a labels CSV (subject,frame,phase,slice,label)."""

    name: str = MISSING
    root: Optional[str] = None
    labels: Optional[str] = None        # acdc: null means ROOT/labels.csv
    keep: float = 0.6                   # centre crop: the fraction of each image axis kept
    test_size: Any = 0.5                # patients held out for the test set: a fraction or a count
    max_subjects: Optional[int] = None  # use only this many patients (seeded choice)


@dataclass(frozen=True)
class SyntheticData(DataConfig):
    """The built-in phantom cohort (stackcls.phantom.cohort), cached under $STACKCLS_CACHE; its
    subject counts come from the protocol (`protocol.synthetic_subjects`)."""

    name: str = "synthetic"
    cohort_seed: int = 0
    test_size: Any = None               # unused: protocol.synthetic_subjects.test subjects


DATA = {"synthetic": SyntheticData(),
        "acdc": DataConfig(name="acdc", root=MISSING),
        "dicom": DataConfig(name="dicom", root=MISSING, labels=MISSING)}


# ----------------------------------------------------------------------------- protocol

@dataclass(frozen=True)
class Subjects:
    train: int = 100
    test: int = 100


@dataclass(frozen=True)
class LearningRates:
    """The learning rates cross-validated for each setting (stackcls.study.settings)."""

    depth0: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    depth1: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    scratch: tuple[float, ...] = (1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class StackStage(StackHeadConfig):
    """The stack head as a stage of the study: its own settings plus whether it runs and on what.

    inputs: the training stacks' slice outputs the head learns from. "oof": each slice from the CV
    model that did not see it (honest probabilities, but five models' feature spaces); "final":
    the final model's own outputs (the feature space the head sees at test time, but in-sample,
    so more confident than on new data)."""

    enabled: bool = True
    inputs: str = "oof"

    def __post_init__(self):
        super().__post_init__()
        if self.inputs not in ("oof", "final"):
            raise ValueError(f"protocol.stack.inputs must be oof or final, got {self.inputs!r}")

    def head(self) -> StackHeadConfig:
        return StackHeadConfig(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(StackHeadConfig)})


@dataclass(frozen=True)
class Protocol:
    """Ho & Kim 2021: 5-fold patient-level CV per learning rate, 50 epochs, batch 32, SGD Nesterov
    0.9, decay 1e-6, OAP/OBS oversampled 6x, rotation +-45 degrees. Meant for a GPU."""

    name: str = "paper"
    synthetic_subjects: Subjects = Subjects()
    # null: the backbone's own input size (224; 299 for Inception/Xception); an int; or a map per
    # backbone with a fallback, e.g. {vgg16: 64, default: 96}
    image_size: Any = None
    views: int = 8                      # fixed rotated views per training slice cached for depth 0 / 1
    epochs: int = 50
    folds: int = 5
    batch_size: int = 32
    decay: float = 1e-6
    oversample: int = 6
    rotation: float = 45.0
    learning_rates: LearningRates = LearningRates()
    stack: StackStage = StackStage(epochs=300, learning_rates=(3e-3, 1e-3))


PAPER = Protocol()
# The same pipeline and outputs at a reduced scale (CPU: vgg16 < 10 min, mobilenet < 3 min);
# smaller inputs where the backbone allows (VGG16's block 5 dominates the CPU budget).
QUICK = dataclasses.replace(
    PAPER, name="quick", synthetic_subjects=Subjects(train=10, test=6),
    image_size={"default": 96, "vgg16": 64}, views=2, epochs=4,
    learning_rates=LearningRates(depth0=(1e-2, 1e-3), depth1=(1e-3,), scratch=(1e-2,)),
    stack=dataclasses.replace(PAPER.stack, epochs=60, learning_rates=(3e-3,)))
PROTOCOLS = {"paper": PAPER, "quick": QUICK}


# ----------------------------------------------------------------------------- the study

RUN_DIR = "${oc.env:STACKCLS_RUNS,runs}/${backbone}_${data.name}_${protocol.name}_d${depth}_s${seed}"


@dataclass(frozen=True)
class Study:
    backbone: str = "mobilenet"         # any name of stackcls.backbones.names(); cbr_* train from scratch
    depth: int = 1                      # 0: frozen backbone + head; 1: depth 0, then the last block too
    weights: Optional[str] = "imagenet"  # imagenet | none | PATH to a Keras weight file
    seed: int = 0
    # typed Any so that Hydra puts a whole preset here (a field typed DataConfig would be rebuilt
    # from that frozen, hence read-only, class and refuse the merge)
    data: Any = SyntheticData()
    protocol: Any = QUICK
    run_dir: str = RUN_DIR
    vmap: Any = "auto"                  # train CV jobs together: auto (head-only always, convs on GPU) | true | false
    devices: Any = "auto"               # devices to shard over: auto (all) | N (stackcls.parallel)
    progress: bool = True
    fail_after_jobs: Optional[int] = None  # tests: raise after this many CV jobs (simulates an interrupted run)


def _writable(node: DictConfig) -> DictConfig:
    """Frozen dataclasses give read-only nodes, which Hydra could not merge overrides into; the
    composed config still turns back into the frozen classes (OmegaConf.to_object)."""
    OmegaConf.set_readonly(node, False)
    for _, v in node.items_ex(resolve=False):
        if isinstance(v, DictConfig):
            _writable(v)
    return node


def _node(obj) -> DictConfig:
    return _writable(OmegaConf.structured(obj))


def register() -> None:
    """The presets (groups `data`, `protocol`) and the config `study` in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    for name, d in DATA.items():
        cs.store(group="data", name=name, node=_node(d))
    for name, p in PROTOCOLS.items():
        cs.store(group="protocol", name=name, node=_node(p))
    schema = _node(Study)
    # Study's own data and protocol are the presets chosen by default; each preset is put in
    # whole (data=acdc must not inherit the synthetic cohort's fields)
    schema.data = schema.protocol = MISSING
    cs.store(name="study_schema", node=schema)
    cs.store(name="study", node={"defaults": ["study_schema", {"data": Study.data.name},
                                              {"protocol": Study.protocol.name}, "_self_"]})


def as_study(cfg) -> Study:
    """A Study from a Study or from a config Hydra composed from `study`."""
    if isinstance(cfg, Study):
        return cfg
    obj = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else None
    if not isinstance(obj, Study):
        raise TypeError(f"want a Study or a config composed from 'study', got {type(cfg).__name__}")
    return obj


def compose(overrides=()) -> Study:
    """The Study a command line's overrides give, e.g. compose(["protocol=paper", "seed=3"])."""
    register()
    with initialize(version_base="1.3", config_path=None):
        return as_study(hydra_compose("study", overrides=list(overrides)))


def as_plain(obj) -> dict:
    """JSON's view of a (nested) config: tuples become lists, as they are read back from disk."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def identity(study: Study) -> dict:
    """The parts of a configuration that define a run's results (a resumed run must match them);
    the stack head's settings are checked where it is saved (changing them retrains only it)."""
    plain = as_plain(study)
    return dict(backbone=plain["backbone"], depth=plain["depth"], weights=plain["weights"],
                seed=plain["seed"], data=plain["data"],
                protocol={k: v for k, v in plain["protocol"].items() if k != "stack"})
