"""The study (`stackcls.study`, `python -m experiments.run`) end to end on a tiny synthetic cohort:
schema, resume after an interruption, metrics against scikit-learn, load_model, report tables,
the command line's composition."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose as hydra_compose, initialize
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from experiments.report import main as report
from stackcls.models import backbones
from stackcls.predict.load import load_model
from stackcls.study.config import Study, compose, register
from stackcls.study.data import make_backbone
from stackcls.study.run import RunConfigMismatch, run
from stackcls.train.sweep import SimulatedInterrupt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone=mobilenet", "weights=none", "depth=1", "protocol.image_size=32", "progress=false",
        "protocol.synthetic_subjects.train=5", "protocol.synthetic_subjects.test=2",
        "protocol.epochs=2", "protocol.views=1", "protocol.learning_rates.depth0=[0.01]",
        "protocol.learning_rates.depth1=[0.001]", "protocol.stack.epochs=10"]

METRIC_KEYS = {"n_slices", "n_stacks", "f1", "auc_weighted", "auc_micro", "accuracy", "soft_accuracy",
               "exact_range_rate", "boundary_mae", "confusion"}


def check_metrics(m):
    assert set(m) >= METRIC_KEYS
    assert set(m["f1"]) == {"OAP", "IN", "OBS"}
    assert np.asarray(m["confusion"]).shape == (3, 3)
    assert sum(map(sum, m["confusion"])) == m["n_slices"]


def without_timing(o):
    if isinstance(o, dict):
        return {k: without_timing(v) for k, v in o.items() if k not in ("timing", "total_seconds")}
    return o


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    register()
    with initialize(version_base="1.3", config_path=None):  # the config as Hydra hands it over
        cfg = hydra_compose("study", overrides=TINY + [f"run_dir={run_dir}", "fail_after_jobs=1"])
    with pytest.raises(SimulatedInterrupt):
        run(cfg)
    done = sorted((run_dir / "depth0" / "cv").glob("*.npz"))
    assert len(done) == 1 and not (run_dir / "results.json").exists()
    stamp = done[0].stat().st_mtime_ns
    results = run(compose(TINY + [f"run_dir={run_dir}"]))
    return run_dir, results, done[0], stamp


def test_schema_and_outputs(tiny_run):
    run_dir, res, _, _ = tiny_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for k in ("backbone", "data", "weights", "protocol", "seed", "depths", "timing"):
        assert k in on_disk
    assert on_disk["weights"] == "random" and on_disk["data"] == "synthetic"
    assert set(on_disk["depths"]) == {"0", "1"}
    for row in on_disk["depths"].values():
        assert set(row["selected"]) == {"learning_rate", "epochs"}
        assert 1 <= row["selected"]["epochs"] <= 2
        for mode in ("slice", "slice_ordered", "stack", "stack_orientation_withheld"):
            check_metrics(row["test"][mode])
        assert 0.0 <= row["test"]["stack_orientation_withheld"]["direction_accuracy"] <= 1.0
        assert set(row["timing"]) == {"cv_seconds", "final_seconds"}
        assert (run_dir / row["checkpoint"] / "config.json").is_file()
        for mode, c in row["test"]["calibration"].items():    # review effort beside the trivial one
            e = c["review_effort"]
            assert e["n"] == c["stacks"] and e["p_model"] == pytest.approx(c["exact"])
            assert e["p_trivial"] == pytest.approx(on_disk["trivial"]["all_in"]["exact_range_rate"])
            assert 0 <= e["model"] <= 1 and 0 <= e["trivial"] <= 1
    assert isinstance(on_disk["timing"]["total_seconds"], float)
    for f in ("results.md", "curves.png", "confusion.png", "tsne.png", "gradcam.png"):
        assert (run_dir / f).stat().st_size > 0
    assert "slice_ordered" in (run_dir / "results.md").read_text()
    assert "orientation withheld" in (run_dir / "results.md").read_text()
    assert (run_dir / "depth1" / "stack" / "direction.json").is_file()


def test_resume_reused_the_finished_job(tiny_run):
    run_dir, _, first, stamp = tiny_run
    assert first.stat().st_mtime_ns == stamp  # not retrained
    assert len(list((run_dir / "depth0" / "cv").glob("*.npz"))) == 5
    assert len(list((run_dir / "depth1" / "cv").glob("*.npz"))) == 5
    # a different configuration in the same run_dir is refused
    with pytest.raises(RunConfigMismatch):
        run(compose(TINY + [f"run_dir={run_dir}", "seed=1"]))


def test_metrics_equal_sklearn(tiny_run):
    run_dir, res, _, _ = tiny_run
    z = np.load(run_dir / "depth1" / "test_outputs.npz")
    m = res["depths"]["1"]["test"]["slice"]
    y, p = z["y"], z["probs"]
    pred = p.argmax(1)
    np.testing.assert_allclose([m["f1"][c] for c in ("OAP", "IN", "OBS")],
                               f1_score(y, pred, average=None, labels=[0, 1, 2], zero_division=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    if len(np.unique(y)) == 3:
        assert m["auc_weighted"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="weighted"))


def test_load_model_and_report(tiny_run, tmp_path):
    run_dir, _, _, _ = tiny_run
    # the run wrote each setting in the one model format, and load_model reads that file
    for s in ("depth0", "depth1"):
        assert (run_dir / s / "model.npz").is_file() and (run_dir / s / "stack" / "config.json").is_file()
    tm = load_model(run_dir)
    assert tm.path == run_dir / "depth1" / "model.npz"
    assert tm.config["setting"] == "depth1" and tm.stack_head is not None and tm.direction is not None
    x = tm.preprocess(np.random.default_rng(0).random((4, 40, 48)).astype(np.float32))
    pen, probs = tm.slice_outputs(x)
    assert pen.shape == (4, 256) and np.allclose(np.asarray(probs).sum(1), 1, atol=1e-5)
    assert report([str(run_dir), "--out", str(tmp_path)]) == 0
    t2 = (tmp_path / "table2.csv").read_text().splitlines()
    # header + 2 depths x (slice, slice_ordered, stack, stack_orientation_withheld) + every slice IN
    assert len(t2) == 1 + 8 + 1
    assert (tmp_path / "table1.md").is_file()


def test_imagenet_unavailable_falls_back_loudly(monkeypatch, capsys):
    real = backbones.create

    def create(name, weights="imagenet", **kw):
        if weights == "imagenet":
            raise OSError("offline")
        return real(name, weights=weights, **kw)

    monkeypatch.setattr(backbones, "create", create)
    with pytest.warns(UserWarning, match="unavailable"):
        _, desc = make_backbone(Study(backbone="mobilenet", weights="imagenet", seed=0), 32)
    assert desc == "random (imagenet unavailable)"
    assert "RANDOM" in capsys.readouterr().err


def test_rerun_reuses_everything_and_the_stamp_decides_the_stack_head(tiny_run):
    run_dir, res, _, _ = tiny_run
    heads = [run_dir / d / "stack" / "config.json" for d in ("depth0", "depth1")]
    stamps = [f.stat().st_mtime_ns for f in heads]
    again = run(compose(TINY + [f"run_dir={run_dir}"]))
    assert without_timing(again) == without_timing(res)
    assert [f.stat().st_mtime_ns for f in heads] == stamps          # loaded, not retrained
    # the stack head's settings are not part of the run's identity: they retrain only it
    changed = run(compose(TINY + [f"run_dir={run_dir}", "protocol.stack.epochs=3"]))
    assert all(f.stat().st_mtime_ns != t for f, t in zip(heads, stamps))
    assert json.loads((run_dir / "depth1" / "stack" / "protocol.json").read_text())["epochs"] == 3
    assert changed["depths"]["1"]["test"]["slice"] == res["depths"]["1"]["test"]["slice"]
    assert changed["depths"]["1"]["stack_head"]["selected"]["epochs"] <= 3


def test_cli_composes_overrides():
    env = dict(os.environ, STACKCLS_RUNS="/tmp/stackcls-test-runs")
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--cfg", "job", "--resolve", "backbone=vgg16",
                          "data=acdc", "data.root=/some/acdc", "protocol=paper", "seed=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backbone: vgg16" in out.stdout and "root: /some/acdc" in out.stdout
    assert "epochs: 50" in out.stdout and "vgg16_acdc_paper_d1_s3" in out.stdout
