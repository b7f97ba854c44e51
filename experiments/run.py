"""The paper's protocol from the shell: `python -m experiments.run backbone=vgg16 depth=1 ...`.

Hydra command line over the typed configuration of `stackcls.study.config` (presets
`data=synthetic|acdc|dicom`, `protocol=quick|paper`; any field, e.g. `protocol.stack.epochs=100`);
`-m` runs a sweep. Each run writes into its run_dir and resumes there (see docs/experiments.md).

`--config-name default_model` trains the model the package ships (docs/model-card.md):
method=anatomy on every patient of data=acdc (data.test_size=0: no test set, the metrics are the
cross-validated ones), then exports it into stackcls/pretrained/default/ and regenerates the
numbers table of docs/model-card.md. Any override still applies (e.g. data.root=...,
protocol.anatomy.epochs=30, export.version=2).

On a SLURM cluster (pip install 'stackcls[cluster]'), `hydra/launcher=stackcls_slurm` sends each
run of a sweep to SLURM as one job of an array (docs/scaling.md); `hydra/launcher=submitit_local`
runs the same jobs as local processes. A job of a sweep leaves `run_dir.txt` in the sweep's job
folder, so `python -m experiments.report runs/multirun` finds the runs of that sweep.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from stackcls.pretrained import DEFAULT_DIR
from stackcls.study import config
from stackcls.study.run import run

config.register()
config.register_slurm()
ConfigStore.instance().store(name="experiments", node={
    "defaults": ["study", "_self_", {"override hydra/job_logging": "stdout"}],
    # Hydra writes nothing of its own; a run's files go to its run_dir, a sweep's to multirun/N
    "hydra": {"run": {"dir": "${run_dir}"},
              "sweep": {"dir": "${oc.env:STACKCLS_RUNS,runs}/multirun", "subdir": "${hydra.job.num}"},
              "output_subdir": None, "job": {"chdir": False}}})

# the shipped model: method=anatomy on all ACDC patients (protocol=paper's anatomy stage: 5 folds,
# 20 epochs, 128 px at 1.5 mm, each slice with its two neighbours, rotations of +-180 degrees, half
# of the stacks also extended past both ends), exported into the package
ConfigStore.instance().store(name="default_model", node={
    "defaults": ["experiments", {"override /data": "acdc"}, {"override /protocol": "paper"}, "_self_"],
    "method": "anatomy",
    # the 2.5-D input: the best of the ACDC ablations (docs/results.md, section A); the full circle
    # of rotations: transposed and rotated copies as public conversions write them; slices past
    # the ends made from real ones (section G)
    "protocol": {"anatomy": {"context": 1, "rotation": 180, "beyond": 0.5}},
    "data": {"root": "${oc.env:STACKCLS_ACDC,../shared/data/acdc}", "test_size": 0},
    "run_dir": "${oc.env:STACKCLS_RUNS,runs}/default_model",
    "export": {"path": str(DEFAULT_DIR),
               "doc": str(Path(__file__).resolve().parents[1] / "docs" / "model-card.md")}})


@hydra.main(config_path=None, config_name="experiments", version_base="1.3")
def main(cfg) -> None:
    for name in ("absl", "orbax", "jax"):  # Hydra's stdout logging would print their INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:         # where experiments.report finds this sweep's runs
        out = Path(hc.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_dir.txt").write_text(str(Path(cfg.run_dir).expanduser().absolute()) + "\n")
    if cfg.export.path and not cfg.export.command:     # what the card records as its command
        cfg.export.command = shlex.join(["python", "-m", "experiments.run", *sys.argv[1:]])
    run(cfg)


if __name__ == "__main__":
    main()
