"""The model the package ships (stackcls/pretrained/default/, docs/model-card.md): its file
matches its card, it is what load_model() / predict_stack(stack) / `stackcls predict` use with no
model, its predictions on a fixed phantom stack are pinned, and a missing or damaged file stops
with an error naming it.

A new model changes the pins on purpose: `python -m experiments.default_model pins` prints them.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stackcls
from experiments.default_model import DOC, pinned_stack, pins
from stackcls import pretrained
from stackcls.predict import load as loader
from stackcls.predict import model_file
from stackcls.models.anatomy import model_inputs
from stackcls.cli import main
from stackcls.io import scan
from stackcls.io.errors import ModelFileError
from stackcls.phantom.dicom_write import write_subject
from stackcls.phantom.render import render_subject

ROOT = Path(__file__).resolve().parents[1]

# the shipped model's predictions on the pinned phantom stack; a new model: paste the output of
# `python -m experiments.default_model pins` here (stackcls-anatomy-acdc 3.2-acdc80-beyond)
PINS = dict(
    sha256='59450e0ca4bb86b51ca647d2328211bb08f475aa0e6f064aea5dd834505c5dbb',
    labels='ANNNNNNNNNNNNNN',
    probabilities=[
        [0.8906, 0.1093, 0.0001],
        [0.1365, 0.8635, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0069, 0.9878, 0.0054],
        [0.794, 0.2032, 0.0028],
        [0.9905, 0.0094, 0.0001],
        [0.9632, 0.0352, 0.0015],
    ],
    range_probability=0.2958,
)


@pytest.fixture(scope="module")
def card():
    return pretrained.verify()


@pytest.fixture(scope="module")
def model():
    return stackcls.load_model()


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    """One phantom subject (the pinned one) as DICOM: an ED and an ES stack."""
    out = tmp_path_factory.mktemp("default_model_dicom")
    write_subject(render_subject(0, 0), out, seed=0)
    return out


def test_shipped_file_matches_its_card(card):
    f = pretrained.DEFAULT_DIR / card["file"]
    assert card["sha256"] == pretrained.sha256(f)
    import hashlib                                   # independent of the helper
    assert card["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert card["bytes"] == f.stat().st_size <= 10 * 2 ** 20          # the 10 MB target
    assert "CC BY-NC-SA 4.0" in card["terms"] and card["command"].startswith("python -m ")
    for mode in ("slice_ordered", "stack"):
        m = card["metrics"][mode]
        assert 0 <= m["exact_range_rate"] <= 1 and len(m["folds"]) == card["folds"]
        assert m["fold_sd"]["exact_range_rate"] is not None
    assert card["trivial"]["f1"]["OAP"] == 0.0                         # every slice IN
    assert card["evaluation"] == "cross-validation"


def test_maintenance_command_verifies_the_shipped_file(capsys):
    """`python -m experiments.default_model verify` (its whole parser is built on every call)."""
    from experiments.default_model import main
    assert main(["verify"]) == 0
    assert "matches its card" in capsys.readouterr().out


def test_model_card_table_is_generated_from_the_card(card):
    text = DOC.read_text()
    block = text[text.index(pretrained.DOC_START) + len(pretrained.DOC_START):text.index(pretrained.DOC_END)]
    assert block.strip() == pretrained.card_table(card).strip(), \
        "docs/model-card.md disagrees with card.json: python -m experiments.default_model doc"


def test_the_format_round_trips_byte_for_byte(model, card, tmp_path):
    # saving the loaded model again gives the same bytes: nothing lost, nothing added
    f = pretrained.save(tmp_path / "again.npz", model, card["dtype"],
                        extra=dict(name=card["name"], version=card["version"]))
    assert pretrained.sha256(f) == card["sha256"]


def test_load_model_without_a_run_is_the_shipped_model_once(model):
    assert stackcls.load_model() is model and stackcls.load_model("default") is model
    assert model.card["sha256"] == pretrained.read_card()["sha256"]
    assert model.stack_head is not None and model.direction is not None


def test_pinned_predictions(model):
    got = pins(model)
    assert got["sha256"] == PINS["sha256"], "a new model file: re-pin (python -m experiments.default_model pins)"
    assert got["labels"] == PINS["labels"]
    np.testing.assert_allclose(got["probabilities"], PINS["probabilities"], atol=2e-3)
    assert got["range_probability"] == pytest.approx(PINS["range_probability"], abs=2e-3)


def test_labels_a_phantom_stack_an_array_and_a_nifti(model, dicom_dir, tmp_path):
    stacks = scan(dicom_dir).stacks
    ed = next(s for s in stacks if s.phase == "ED")
    p = stackcls.predict_stack(ed)                   # no model: the shipped one
    assert len(p.labels) == ed.n_slices and set(p.labels) <= {"OAP", "IN", "OBS"}
    assert p.orientation_source == "geometry"
    images, spacing = pinned_stack()
    # the same slices as an array, shown base first with the orientation withheld
    q = stackcls.predict_stack(images[::-1], orientation="unknown", spacing=spacing)
    assert len(q.labels) == len(images) and q.orientation_source == "data"
    np.testing.assert_allclose(p.probabilities, stackcls.predict_stack(images, model,
                               orientation="apex_to_base", spacing=spacing).probabilities, atol=1e-4)
    # a NIfTI file (no orientation in it: the data decide, the same way as for the array)
    import nibabel as nib
    f = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(images.transpose(1, 2, 0), np.float32),
                             np.diag([*spacing, 1.0])), f)            # pixdim from the affine
    n = stackcls.predict_stack(str(f))
    assert n.labels == q.labels[::-1]
    np.testing.assert_allclose(n.probabilities, q.probabilities[::-1], atol=1e-4)


def test_float16_keeps_the_predictions(model, tmp_path):
    f16 = pretrained.load(pretrained.save(tmp_path / "half.npz", model, "float16"))
    assert (tmp_path / "half.npz").stat().st_size < 0.7 * (pretrained.DEFAULT_DIR / "model.npz").stat().st_size
    images, spacing = pinned_stack()
    # one localisation, the same network inputs for both
    x, _ = model_inputs(images, spacing, model.cfg, model.localise_size, lambda a: model.run(a)["lv"])
    a, b = model.run(x), f16.run(x)
    np.testing.assert_allclose(a["probs"], b["probs"], atol=0.02)
    np.testing.assert_allclose(a["evidence"], b["evidence"], atol=0.05)


def test_cli_predicts_without_a_model(dicom_dir, tmp_path, card, model):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               # nothing may reach the network
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-m", "stackcls.cli", "predict", str(dicom_dir), "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = [l for l in r.stderr.splitlines() if l.startswith("stackcls: default model")]
    assert len(said) == 1 and card["name"] in said[0] and card["sha256"][:12] in said[0]
    blob = json.loads(out.read_text())
    assert card["sha256"] in blob["model"]
    ed = next(s for s in blob["stacks"] if s["phase"] == "ED")
    ref = stackcls.predict_stack(next(s for s in scan(dicom_dir).stacks if s.phase == "ED"), model)
    assert ed["labels"] == ref.labels
    np.testing.assert_allclose(ed["probabilities"], ref.probabilities, atol=1e-4)
    # the command ends with os._exit: what it wrote into the pipe must still all arrive
    rows = [l for l in r.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+(OAP|IN|OBS)\s", l)]
    assert len(rows) == sum(len(s["labels"]) for s in blob["stacks"]), r.stdout[-2000:]


def test_review_without_a_model_saves_figures(dicom_dir, tmp_path, model, monkeypatch):
    from stackcls.ui.label_ui import review_command
    monkeypatch.chdir(tmp_path)                      # where edits would go without --labels
    assert review_command(dicom_dir, save=tmp_path / "rv") == 0
    pngs = sorted(p.name for p in (tmp_path / "rv").glob("*.png"))
    # one figure per stack: the anatomy model has no classifier to take Grad-CAM from
    assert len(pngs) == 2 and not any("gradcam" in p for p in pngs)


@pytest.fixture
def copied(tmp_path, monkeypatch):
    """The shipped folder copied; DEFAULT_DIR pointed at the copy, the in-process cache empty."""
    d = tmp_path / "default"
    shutil.copytree(pretrained.DEFAULT_DIR, d)
    monkeypatch.setattr(loader, "DEFAULT_DIR", d)
    monkeypatch.setattr(loader, "_loaded", {})
    return d


def test_missing_file_names_it(copied, tmp_path, capsys):
    (copied / "model.npz").unlink()
    with pytest.raises(FileNotFoundError, match=f"{copied / 'model.npz'}: the model file is missing"):
        stackcls.load_model()
    assert main(["predict", str(tmp_path), "--json", str(tmp_path / "o.json")]) == 2
    assert f"{copied / 'model.npz'}: the model file is missing" in capsys.readouterr().err


def test_changed_file_names_it(copied, tmp_path, capsys):
    f = copied / "model.npz"
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    f.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match=f"{f}: sha256 .* does not match its card"):
        stackcls.load_model()
    assert main(["predict", str(tmp_path)]) == 2
    assert f"{f}: sha256" in capsys.readouterr().err


def test_damaged_file_with_a_matching_card_names_it(copied):
    f = copied / "model.npz"
    f.write_bytes(f.read_bytes()[:1000])             # truncated, and the card updated to match
    card = json.loads((copied / "card.json").read_text())
    card["sha256"] = pretrained.sha256(f)
    (copied / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match=f"{f}: not a readable stackcls model file"):
        stackcls.load_model()


# ----------------------------------------------------------------------------- training it: no test set

TINY = ["method=anatomy", "weights=none", "progress=false", "data.test_size=0",
        "protocol.synthetic_subjects.train=4", "protocol.synthetic_subjects.test=0",
        "protocol.folds=2", "protocol.anatomy.epochs=2", "protocol.anatomy.eval_every=1",
        "protocol.anatomy.size=32", "protocol.anatomy.canvas=48",
        "protocol.anatomy.widths=[4,4,4,4]", "protocol.anatomy.localise_size=64",
        "protocol.anatomy.batch_size=8", "protocol.anatomy.stack.epochs=5"]


def test_default_model_config_trains_on_every_acdc_patient():
    from hydra import compose, initialize

    import experiments.run  # noqa: F401 - registers the configs
    with initialize(version_base="1.3", config_path=None):
        cfg = compose("default_model", overrides=["protocol.anatomy.epochs=30"])
    assert cfg.method == "anatomy" and cfg.data.name == "acdc" and cfg.data.test_size == 0
    assert cfg.protocol.name == "paper" and cfg.protocol.anatomy.epochs == 30
    assert cfg.protocol.anatomy.context == 1                         # what the shipped model used
    assert cfg.protocol.anatomy.rotation == 180
    assert cfg.export.path == str(pretrained.DEFAULT_DIR) and cfg.export.doc == str(DOC)


@pytest.mark.slow
def test_no_test_set_run_reports_cv_and_exports(tmp_path, monkeypatch):
    """data.test_size=0: the whole method on every stack, the cross-validated rows with their
    spread, then the export; checked against the folds' own validation records."""
    from stackcls.study.config import compose
    from stackcls.study.run import run
    monkeypatch.setenv("STACKCLS_CACHE", str(tmp_path / "cache"))
    doc = tmp_path / "card.md"
    doc.write_text(f"before\n{pretrained.DOC_START}\nstale-table\n{pretrained.DOC_END}\nafter\n")
    res = run(compose(TINY + [f"run_dir={tmp_path / 'run'}", f"export.path={tmp_path / 'out'}",
                              f"export.doc={doc}", "export.version=t1"]))
    assert res["evaluation"] == "cv" and res["n_test"]["stacks"] == 0 and res["n_train"]["stacks"] == 8
    row = res["depths"]["anatomy"]
    cv = row["cv"]
    assert "test" not in row and set(cv) == {"slice", "slice_ordered", "stack", "every_slice_in"}
    for m in cv.values():
        assert m["n_stacks"] == 8 and len(m["folds"]) == 2
        assert m["fold_sd"]["exact_range_rate"] == pytest.approx(np.std(m["folds"], ddof=1), abs=1e-4)
    # the ordered decoding of the out-of-fold probabilities, per fold: what each fold's own
    # validation (during training) measured at the selected epoch
    epochs = sorted(int(e) for e in row["selected"]["curve"])
    j = epochs.index(row["selected"]["epochs"])
    for f in (0, 1):
        done = json.loads((tmp_path / "run" / "anatomy" / "cv" / f"fold{f}" / "done.json").read_text())
        assert cv["slice_ordered"]["folds"][f] == pytest.approx(done["val"][j], abs=1e-4)
    # every slice IN: right exactly on the stacks with no OAP or OBS slice
    from stackcls.study.data import load_data
    stacks, none = load_data(compose(TINY))
    assert none == []
    all_in = np.mean([all(l == "IN" for l in s.labels) for s in stacks])
    assert cv["every_slice_in"]["exact_range_rate"] == pytest.approx(all_in)
    assert (tmp_path / "run" / "anatomy.png").is_file()
    assert "Cross-validated" in (tmp_path / "run" / "results.md").read_text()
    # the export: the card holds the run's CV numbers; the doc got its table; the file loads
    card = pretrained.verify(tmp_path / "out")
    assert card["metrics"]["stack"] == json.loads(json.dumps(cv["stack"]))
    assert card["version"] == "t1" and card["evaluation"] == "cross-validation"
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "stale-table" not in text
    assert pretrained.card_table(card) in text
    # float32: exactly the run's weights, head, direction and temperatures
    m, ref = pretrained.load(tmp_path / "out" / "model.npz"), stackcls.load_model(tmp_path / "run")
    for a, b in ((m.ensemble, ref.ensemble), (m.stack_head.head, ref.stack_head.head)):
        fa, fb = model_file._flat(a), model_file._flat(b)
        assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    np.testing.assert_array_equal(m.direction.weights, ref.direction.weights)
    assert m.calibration.temperatures == ref.calibration.temperatures


def test_a_paper_run_refuses_no_test_set_and_export(tmp_path):
    from stackcls.study.config import compose
    from stackcls.study.run import run
    with pytest.raises(ValueError, match="method=anatomy"):
        run(compose(["progress=false", f"run_dir={tmp_path}", f"export.path={tmp_path / 'x'}"]))
