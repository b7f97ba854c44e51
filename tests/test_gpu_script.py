"""benchmarks/gpu.sh on CPU with tiny settings: its three steps run in order and land in one
markdown report (prediction numbers, both dtypes' backbone tables, the study's Tables 1 and 2)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("keras", reason="benchmarks/backbones.py compares against Keras ([test] extra)")
ROOT = Path(__file__).resolve().parents[1]
STUDY = ("backbone=mobilenet weights=none depth=0 protocol.image_size=32 progress=false "
         "protocol.synthetic_subjects.train=5 protocol.synthetic_subjects.test=2 protocol.epochs=1 "
         "protocol.views=1 protocol.learning_rates.depth0=[0.01] protocol.stack.enabled=false")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_script_tiny_on_cpu(tmp_path):
    import sys
    env = dict(os.environ, OUT=str(tmp_path / "rep"), PYTHON=sys.executable, SUBJECTS="2",
               BACKBONES="mobilenet", SIZE="32", BATCH="2", BUDGET="900", STUDY=STUDY)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = (tmp_path / "rep" / "report.md").read_text()
    heads = ["## 1. Prediction", "## 2. Backbones, float32", "## 2. Backbones, bfloat16", "## 3. Study"]
    assert [report.index(h) for h in heads] == sorted(report.index(h) for h in heads)
    assert "failed" not in report and "not run" not in report, report
    pred = json.loads((tmp_path / "rep" / "predict.json").read_text())
    assert pred["input_size"] == 32 and pred["ratio_archive_to_per_stack"] > 0
    for path in ("per_stack", "archive"):
        assert pred[path]["stacks"] == 4 and pred[path]["stacks_per_s"] > 0
    for dtype in ("float32", "bfloat16"):
        log = (tmp_path / "rep" / f"backbones_{dtype}.log").read_text()
        assert dtype in log and "img/s" in log
    assert "Table 1" in report and "mobilenet" in report.split("## 3. Study")[1]
