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

from stackcls.models.anatomy import AnatomyConfig
from stackcls.models.stack_head import StackHeadConfig


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class DataConfig:
    """A labelled DICOM/NIfTI folder: ACDC (patientXXX/patientXXX_frameYY.nii.gz + labels.csv) or
    any DICOM tree with a labels CSV (subject,frame,phase,slice,label)."""

    name: str = MISSING
    root: Optional[str] = None
    labels: Optional[str] = None        # acdc: null means ROOT/labels.csv
    masks: Optional[str] = None         # a masks folder (stackcls.io.masks); acdc reads its _gt files
    keep: float = 0.6                   # centre crop: the fraction of each image axis kept
    test_size: Any = 0.5                # patients held out for the test set: a fraction or a count;
                                        # 0: no test set (method=anatomy reports its CV metrics)
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
class AnatomyStage(AnatomyConfig):
    """method=anatomy (stackcls.models.anatomy): the network's training, its cross-validation and its
    stack head. The K fold models are kept and averaged at test time (an ensemble), so the CV that
    selects the epoch count also yields the model: no sixth training on all stacks.

    eval_every: validation (the whole test-time pipeline on the held-out fold) every so many
    epochs; the epoch count with the best mean validation exact-range rate is selected.
    stack: the stack head over the slice evidence; selected on exact range, classes weighted, so
    that "every slice IN" cannot win the selection (issue 10, item 4)."""

    eval_every: int = 5
    localise_size: int = 256            # first pass: the whole image at SPACING_MM, to find the heart
    # sim-to-real: pretrain on this many subjects of the built-in cohort (with its masks), then
    # every fold model starts from those weights; 0: from ImageNet directly
    pretrain_subjects: int = 0
    pretrain_epochs: int = 10
    # this share of the training stacks also trains on 1-3 slices past either end, made from its
    # own end slices (preprocess/beyond.py); 0: off
    beyond: float = 0.0
    stack: StackStage = StackStage(epochs=300, learning_rates=(3e-3, 1e-3), select="exact",
                                   class_weight="sqrt", residual=True)

    def net(self) -> AnatomyConfig:
        return AnatomyConfig(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(AnatomyConfig)})


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
    # what a fold keeps together: "subject" (patients), or a stack meta key such as "group" (ACDC's
    # pathology group; with folds equal to the number of groups, leave-one-group-out; method=anatomy)
    fold_by: str = "subject"
    batch_size: int = 32
    decay: float = 1e-6
    oversample: int = 6
    rotation: float = 45.0
    learning_rates: LearningRates = LearningRates()
    stack: StackStage = StackStage(epochs=300, learning_rates=(3e-3, 1e-3))
    anatomy: AnatomyStage = AnatomyStage()


PAPER = Protocol()
# The same pipeline and outputs at a reduced scale (CPU: vgg16 < 10 min, mobilenet < 3 min);
# smaller inputs where the backbone allows (VGG16's block 5 dominates the CPU budget).
QUICK = dataclasses.replace(
    PAPER, name="quick", synthetic_subjects=Subjects(train=10, test=6),
    image_size={"default": 96, "vgg16": 64}, views=2, epochs=4,
    learning_rates=LearningRates(depth0=(1e-2, 1e-3), depth1=(1e-3,), scratch=(1e-2,)),
    stack=dataclasses.replace(PAPER.stack, epochs=60, learning_rates=(3e-3,)),
    anatomy=dataclasses.replace(PAPER.anatomy, size=64, canvas=96, epochs=4, eval_every=2,
                                widths=(8, 12, 16, 24), localise_size=128,
                                stack=dataclasses.replace(PAPER.anatomy.stack, epochs=60,
                                                          learning_rates=(3e-3,))))
PROTOCOLS = {"paper": PAPER, "quick": QUICK}


# ----------------------------------------------------------------------------- export

@dataclass(frozen=True)
class Export:
    """After a method=anatomy run: its model in the shipped one-file format (stackcls.pretrained)
    in folder `path` (model.npz + card.json), and the card's numbers table in `doc` (a markdown
    file with card-table markers, e.g. docs/model-card.md). command: what the card records as the
    command that made the model (experiments.run fills in its own command line)."""

    path: Optional[str] = None          # null: no export
    name: str = "stackcls-anatomy-acdc"
    version: str = "1"
    dtype: str = "float32"              # of the ensemble's weights: float32 | float16
    stand_in: bool = False              # the card says the model is a stand-in, not a release
    doc: Optional[str] = None
    command: Optional[str] = None


# ----------------------------------------------------------------------------- the study

METHODS = ("paper", "anatomy")
RUN_DIR = ("${oc.env:STACKCLS_RUNS,runs}/${backbone}_${data.name}_${protocol.name}"
           "${stackcls_method_tag:${method}}_d${depth}_s${seed}")


@dataclass(frozen=True)
class Study:
    backbone: str = "mobilenet"         # any name of stackcls.models.backbones.names(); cbr_* train from scratch
    method: str = "paper"               # paper: Ho & Kim's single-slice protocol (the benchmark);
                                        # anatomy: mask-supervised encoder-decoder (stackcls.models.anatomy)
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
    export: Export = Export()           # method=anatomy: write the model in the shipped format


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


def _method_tag(method: str) -> str:
    """The run folder's name says the method unless it is the paper's (whose names stay as they were)."""
    return "" if method == "paper" else f"_{method}"


def register() -> None:
    """The presets (groups `data`, `protocol`) and the config `study` in Hydra's ConfigStore."""
    if not OmegaConf.has_resolver("stackcls_method_tag"):
        OmegaConf.register_new_resolver("stackcls_method_tag", _method_tag)
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
    data = plain["data"]
    if data.get("masks") is None:  # runs recorded before data.masks existed still resume
        data.pop("masks", None)
    ident = dict(backbone=plain["backbone"], depth=plain["depth"], weights=plain["weights"],
                 seed=plain["seed"], data=data,
                 protocol={k: v for k, v in plain["protocol"].items() if k not in ("stack", "anatomy")})
    if study.method != "paper":   # the paper's runs keep the identity they always had
        ident["method"] = study.method
        ident["anatomy"] = {k: v for k, v in plain["protocol"]["anatomy"].items() if k != "stack"}
    return ident


def register_slurm() -> None:
    """hydra/launcher=stackcls_slurm, when the [cluster] extra (hydra-submitit-launcher) is
    installed. One GPU per run, sized for the paper's protocol (Table 1: 154-746 GPU-minutes per
    backbone on a Quadro P5000 for depth 1's CV alone). A run that reaches the time limit is
    requeued (max_num_timeout) and resumes from its run_dir; override any field on the command
    line, e.g. hydra.launcher.partition=gpu hydra.launcher.timeout_min=720."""
    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:       # no SLURM launcher to configure
        return
    ConfigStore.instance().store(group="hydra/launcher", name="stackcls_slurm", node=SlurmQueueConf(
        timeout_min=24 * 60, max_num_timeout=3, nodes=1, tasks_per_node=1, gpus_per_node=1,
        cpus_per_task=8, mem_gb=64, array_parallelism=18, signal_delay_s=300,
        submitit_folder="${hydra.sweep.dir}/.submitit/%j"))
