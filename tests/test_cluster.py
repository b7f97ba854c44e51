"""Cluster sweeps: the ready SLURM launcher config composes with its documented resources, and a
tiny two-run multirun through hydra-submitit-launcher's submitit_local (jobs as local processes,
submitted and collected as on SLURM) is gathered by experiments.report into Tables 1 and 2."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [cluster] extra is not installed")

from hydra import compose, initialize  # noqa: E402

from experiments.report import main as report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY0 = ["backbone=mobilenet", "weights=none", "depth=0", "protocol.image_size=32", "progress=false",
         "protocol.synthetic_subjects.train=5", "protocol.synthetic_subjects.test=2",
         "protocol.epochs=1", "protocol.views=1", "protocol.learning_rates.depth0=[0.01]",
         "protocol.stack.enabled=false"]


def test_slurm_launcher_config():
    import experiments.run  # noqa: F401  (stores the experiments config and the launcher)

    with initialize(version_base="1.3", config_path=None):
        cfg = compose("experiments", overrides=["hydra/launcher=stackcls_slurm",
                                                "hydra.launcher.partition=gpu"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert (la.gpus_per_node, la.tasks_per_node, la.partition) == (1, 1, "gpu")
    assert la.timeout_min == 1440 and la.max_num_timeout == 3


@pytest.mark.slow
def test_submitit_local_sweep_and_report(tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ, STACKCLS_RUNS=str(runs), PYTHONPATH=str(ROOT), STACKCLS_PROGRESS="0")
    out = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "hydra/launcher=submitit_local",
                          "hydra.launcher.timeout_min=30", *TINY0, "seed=0,1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    named = sorted((runs / "multirun").glob("*/run_dir.txt"))
    assert len(named) == 2
    run_dirs = {Path(f.read_text().strip()) for f in named}
    assert run_dirs == {runs / f"mobilenet_synthetic_quick_d0_s{s}" for s in (0, 1)}
    assert all((d / "results.json").is_file() for d in run_dirs)
    assert any((runs / "multirun" / ".submitit").rglob("*_result.pkl"))   # went through submitit
    assert report([str(runs / "multirun"), "--out", str(tmp_path / "tables")]) == 0
    t1 = list(csv.DictReader(open(tmp_path / "tables" / "table1.csv")))
    t2 = list(csv.DictReader(open(tmp_path / "tables" / "table2.csv")))
    assert sorted(r["run"] for r in t1) == sorted(map(str, run_dirs))     # one row per run, depth 0
    assert {r["run"] for r in t2} == set(map(str, run_dirs)) and len(t2) >= 2
