"""Archive-scale prediction (stackcls.predict.archive, `stackcls predict ROOT --model RUN --out X.jsonl`):
the same predictions as predict_stack one stack at a time, resume after a cut without redoing
finished stacks, shards that cover every stack exactly once, the summary CSV, the command."""

import csv
import json
import shutil

import numpy as np
import pytest
from flax import nnx

from stackcls.models import backbones
from stackcls.predict import archive
from stackcls.predict.archive import default_workers, predict_archive
from stackcls.predict.units import in_shard, parse_shard, units
from stackcls.train.checkpoint import save_model, save_stack_model
from stackcls.cli import main
from stackcls.predict.load import load_model
from stackcls.io import load_stacks
from stackcls.models.classifier import build_classifier
from stackcls.phantom import cohort
from stackcls.predict.stack import Prediction, predict_stack
from stackcls.models.stack_head import StackHead, StackModel

pytestmark = pytest.mark.filterwarnings("ignore::stackcls.predict.stack.OrientationWarning")
SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("model")
    clf = build_classifier(backbones.create("mobilenet", weights=None, input_size=SIZE), SIZE)
    save_model(run / "depth0" / "final", clf, dict(backbone="mobilenet", input_size=SIZE))
    head = StackModel(StackHead(259, 8, rngs=nnx.Rngs(1)), dict(in_features=259, hidden=8, dropout=0.2))
    save_stack_model(run / "depth0" / "stack", head)
    return run


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Three units (two subject folders, one of them copied under a site folder), 6 stacks, and
    files that are no images."""
    src = cohort(2, seed=0) / "dicom"
    root = tmp_path_factory.mktemp("archive")
    shutil.copytree(src, root / "site1")
    subj = sorted(p.name for p in src.iterdir())[0]
    shutil.copytree(src / subj, root / "site2" / "copy" / subj)
    (root / "site2" / "notes.txt").write_text("not an image")
    return root


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def stack_lines(path):
    return [r for r in lines(path) if "stack" in r]


def test_units_and_shards(tree):
    us = list(units(tree))
    assert [u.kind for u in us] == ["dicom"] * 3
    assert [u.rel for u in us] == ["site1/syn0000", "site1/syn0001", "site2/copy/syn0000"]
    assert all(not any(f.endswith(".txt") for f in u.files) for u in us)
    for n in (1, 2, 3, 5):
        owners = [[i for i in range(n) if in_shard(u, (i, n))] for u in us]
        assert all(len(o) == 1 for o in owners)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_same_as_predict_stack_and_summary(tree, run_dir, tmp_path):
    out = tmp_path / "pred.jsonl"
    res = predict_archive(tree, run_dir, out, workers=0, batch_slices=40, progress=False)
    assert res["stacks"] == 6 and res["units"] == 3 and res["errors"] == 0
    recs = stack_lines(out)
    assert len(recs) == 6 and len({r["stack"] for r in recs}) == 6
    assert sum("done" in r for r in lines(out)) == 3
    # units are taken in walk order whatever the readers' timing: the same file every run
    again = tmp_path / "again.jsonl"
    predict_archive(tree, run_dir, again, workers=0, batch_slices=40, progress=False)
    assert again.read_text() == out.read_text()
    model = load_model(run_dir)
    by_key = {(r["unit"], r["phase"]): r for r in recs}
    for u in ("site1/syn0000", "site2/copy/syn0000", "site1/syn0001"):
        for st in load_stacks(tree / u):
            ref = predict_stack(st, model).to_dict()        # one stack at a time: the reference
            got = by_key[(u, st.phase)]
            assert got["labels"] == ref["labels"] and got["sources"] == ref["sources"]
            assert got["in_range"] == ref["in_range"] and got["orientation"] == ref["orientation"]
            np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    r0 = recs[0]
    assert len(rows) == 6 and float(rows[0]["range_probability"]) == pytest.approx(r0["range_probability"])
    assert rows[0]["subject"] == r0["subject"] and int(rows[0]["slices"]) == len(r0["labels"])
    if r0["in_range_apex_to_base"]:
        a, b = r0["in_range_apex_to_base"]
        assert (int(rows[0]["in_first"]), int(rows[0]["in_last"])) == (a, b)


def test_range_probability_reaches_the_summary(tree, run_dir, tmp_path, monkeypatch):
    to_dict = Prediction.to_dict
    monkeypatch.setattr(Prediction, "to_dict", lambda self: dict(to_dict(self), range_probability=0.25))
    out = tmp_path / "p.jsonl"
    predict_archive(tree / "site1" / "syn0001", run_dir, out, workers=0, progress=False)
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == 2 and {r["range_probability"] for r in rows} == {"0.25"}


def test_resume_after_a_cut_and_shards(tree, run_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    predict_archive(tree, run_dir, out, workers=0, progress=False)
    full = out.read_text().splitlines()
    whole = {r["stack"]: r for r in stack_lines(out)}
    # a kill: the last unit's lines lost, its first stack line cut in the middle
    keep = [i for i, x in enumerate(full) if "done" in json.loads(x)][-2] + 1
    out.write_text("\n".join(full[:keep + 1]) + "\n" + full[keep + 1][:25])
    res = predict_archive(tree, run_dir, out, workers=0, progress=False)
    assert res["resumed"] == 1 + sum("stack" in json.loads(x) for x in full[:keep])
    assert res["stacks"] == 6 - res["resumed"] and res["units"] == 1   # only the cut unit re-read
    recs = stack_lines(out)
    assert sorted(r["stack"] for r in recs) == sorted(whole)            # each stack exactly once
    for r in recs:
        np.testing.assert_allclose(r["probabilities"], whole[r["stack"]]["probabilities"], atol=1e-6)
    assert predict_archive(tree, run_dir, out, workers=0, progress=False)["units"] == 0
    # shards: three array jobs cover every stack exactly once
    keys = []
    for i in range(3):
        o = tmp_path / f"s{i}.jsonl"
        predict_archive(tree, run_dir, o, workers=0, shard=(i, 3), progress=False)
        keys += [r["stack"] for r in stack_lines(o)]
    assert sorted(keys) == sorted(whole)


def test_command_with_reader_processes(tree, run_dir, tmp_path, capsys):
    out = tmp_path / "c" / "res.jsonl"
    assert main(["predict", str(tree), "--model", str(run_dir), "--out", str(out),
                 "--workers", "2", "--mode", "slice_ordered"]) == 0
    assert "6 stacks predicted" in capsys.readouterr().out
    recs = stack_lines(out)
    assert len(recs) == 6 and {r["mode"] for r in recs} == {"slice_ordered"}
    assert (out.with_suffix(".csv")).is_file()
    assert main(["predict", str(tree), "--model", str(run_dir), "--out", str(out), "--shard", "3/2"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_the_shipped_anatomy_model_without_a_model_argument(tree, tmp_path, capsys):
    """A method=anatomy model (the shipped default: its networks run in the main process, the
    readers hand over the slices as read): the same predictions as predict_stack, and a resume."""
    import stackcls
    sub = tree / "site1" / "syn0001"
    out = tmp_path / "a.jsonl"
    assert main(["predict", str(sub), "--out", str(out)]) == 0
    assert "2 stacks predicted" in capsys.readouterr().out
    recs = {r["phase"]: r for r in stack_lines(out)}
    model = stackcls.load_model()
    for st in load_stacks(sub):
        ref = predict_stack(st, model).to_dict()
        got = recs[st.phase]
        assert got["labels"] == ref["labels"] and got["in_range"] == ref["in_range"]
        assert got["range_probability"] == pytest.approx(ref["range_probability"], abs=1e-5)
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-5)
    assert predict_archive(sub, None, out, workers=0, progress=False)["resumed"] == 2


def test_default_workers_by_core_count(monkeypatch):
    """Reader threads in this process up to 2 cores, one reader process per spare core above."""
    for cpus, want in ((1, 0), (2, 0), (3, 2), (8, 7), (64, 8)):
        monkeypatch.setattr(archive.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)), raising=False)
        assert default_workers() == want
