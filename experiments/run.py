"""The paper's protocol from the shell: `python -m experiments.run backbone=vgg16 depth=1 ...`.

Hydra command line over the typed configuration of `stackcls.study.config` (presets
`data=synthetic|acdc|dicom`, `protocol=quick|paper`; any field, e.g. `protocol.stack.epochs=100`);
`-m` runs a sweep. Each run writes into its run_dir and resumes there (see docs/experiments.md).
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.config_store import ConfigStore

from stackcls.study import config
from stackcls.study.run import run

config.register()
ConfigStore.instance().store(name="experiments", node={
    "defaults": ["study", "_self_", {"override hydra/job_logging": "stdout"}],
    # Hydra writes nothing of its own; a run's files go to its run_dir, a sweep's to multirun/N
    "hydra": {"run": {"dir": "${run_dir}"},
              "sweep": {"dir": "${oc.env:STACKCLS_RUNS,runs}/multirun", "subdir": "${hydra.job.num}"},
              "output_subdir": None, "job": {"chdir": False}}})


@hydra.main(config_path=None, config_name="experiments", version_base="1.3")
def main(cfg) -> None:
    for name in ("absl", "orbax", "jax"):  # Hydra's stdout logging would print their INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    run(cfg)


if __name__ == "__main__":
    main()
