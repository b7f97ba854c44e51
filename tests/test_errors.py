"""Issue 13, items 9 and 10: non-UTF-8 file names under a strict UTF-8 terminal (`inspect`,
`predict`, its JSON); one-line errors naming the file for a labels CSV that is not UTF-8, a
malformed run directory (`predict`, `review`), unreadable files and folders (permission denied,
symlink loop, FIFO) and folders a scan does not read (listed, with the reason)."""

import builtins
import io
import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

from stackcls.models import backbones
from stackcls.train.checkpoint import save_model
from stackcls.cli import main
from stackcls.predict.load import load_model
from stackcls.io import load_labels, scan
from stackcls.io.errors import ModelFileError, StackReadError, printable
from stackcls.io.inspect import inspect_command
from stackcls.models.classifier import build_classifier

HEADER = "subject,frame,phase,slice,label\n"

# orbax leaves an unawaited read behind when a restore fails: noise, not a failure of these tests
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning",
                                        "ignore:coroutine:RuntimeWarning")


def nifti(path, slices=6, seed=0):
    vol = (np.random.default_rng(seed).random((24, 24, slices)) * 200).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return path


def bad_name(folder, name=b"bad\xff.nii.gz"):
    """A NIfTI file whose name is not UTF-8 (Python holds it as 'bad\\udcff.nii.gz')."""
    nifti(folder / "tmp.nii.gz")
    target = os.path.join(os.fsencode(folder), name)
    os.rename(os.fsencode(folder / "tmp.nii.gz"), target)
    return os.fsdecode(target)


def strict_streams(monkeypatch):
    """stdout and stderr as a terminal that accepts only valid UTF-8."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)

    def text(stream):
        stream.flush()
        return stream.buffer.getvalue().decode("utf-8")
    return lambda: (text(out), text(err))


def tiny_run(tmp_path, size=32):
    """A run directory as experiments.run writes it, with an untrained mobilenet classifier."""
    clf = build_classifier(backbones.create("mobilenet", weights=None, input_size=size), size)
    run = tmp_path / "run"
    save_model(run / "depth0" / "final", clf, dict(backbone="mobilenet", input_size=size))
    return run


def only_open_fails(monkeypatch, suffix, exc):
    """builtins.open raises `exc` for paths ending in `suffix` (tests run as root, which chmod
    cannot lock out)."""
    real = builtins.open

    def guarded(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file).endswith(suffix):
            raise exc
        return real(file, *a, **k)
    monkeypatch.setattr(builtins, "open", guarded)


# ----------------------------------------------------------------------------- item 9: file names

def test_printable():
    assert printable("bad\udcff.nii.gz") == "bad\\xff.nii.gz"
    assert printable("héllo ü") == "héllo ü"                 # real UTF-8 names are unchanged
    assert printable("x\ud800") == "x\\ud800"                  # a surrogate no file name can hold


def test_inspect_non_utf8_name_strict_terminal(tmp_path, monkeypatch):
    bad_name(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    os.rename(os.fsencode(tmp_path / "junk.dcm"), os.path.join(os.fsencode(tmp_path), b"junk\xfe.dcm"))
    read = strict_streams(monkeypatch)
    assert inspect_command(tmp_path) == 0          # its own lines, without main's safety net
    out, _ = read()
    assert "bad\\xff" in out and "junk\\xfe.dcm" in out
    assert main(["inspect", str(tmp_path)]) == 0
    assert read()[0].count("bad\\xff") == 2


def test_predict_non_utf8_name_strict_terminal_and_json(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    bad_name(data)
    run = tiny_run(tmp_path)
    out_json = tmp_path / "pred.json"
    read = strict_streams(monkeypatch)
    assert main(["predict", str(data), "--model", str(run), "--mode", "slice_ordered",
                 "--json", str(out_json)]) == 0
    out, _ = read()
    assert "bad\\xff/" in out and "wrote" in out
    raw = out_json.read_bytes().decode("utf-8")              # strict: the file is UTF-8
    blob = json.loads(raw)
    (st,) = blob["stacks"]
    assert st["subject"] == "bad\\xff"
    strings = [s for s in json.dumps(blob, ensure_ascii=False)]
    assert not any("\ud800" <= c <= "\udfff" for c in strings)    # no lone surrogate anywhere


# ----------------------------------------------------------------------------- item 10: labels CSV

def test_labels_csv_not_utf8(tmp_path):
    text = HEADER + "pétient,,ED,0,OAP\n"
    for enc, why in (("utf-16", "UTF-16"), ("latin-1", "line 2: not UTF-8 text (byte 0xe9")):
        f = tmp_path / f"{enc}.csv"
        f.write_bytes(text.encode(enc))
        with pytest.raises(StackReadError, match="save it as UTF-8") as e:
            load_labels(f)
        assert str(e.value).startswith(str(f)) and why in str(e.value)
    ok = tmp_path / "ok.csv"
    ok.write_bytes(("\ufeff" + text).encode("utf-8"))        # UTF-8 (with a BOM) reads as before
    assert load_labels(ok)[0].subject == "pétient"


def test_inspect_with_latin1_labels_one_line(tmp_path, capsys):
    nifti(tmp_path / "case01.nii.gz")
    lab = tmp_path / "labels.csv"
    lab.write_bytes((HEADER + "cäse01,,ED,0,OAP\n").encode("latin-1"))
    assert main(["inspect", str(tmp_path), "--labels", str(lab)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {lab}: line 2: not UTF-8")


def test_labels_csv_permission_denied(tmp_path, monkeypatch):
    lab = tmp_path / "labels.csv"
    lab.write_text(HEADER)
    monkeypatch.setattr("pathlib.Path.read_bytes",
                        lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(StackReadError, match="permission denied"):
        load_labels(lab)


# ----------------------------------------------------------------------------- item 10: run directory

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("errors"))


def copy_run(run_dir, to):
    shutil.copytree(run_dir, to)
    return to


def broken_copy(run_dir, tmp_path, rel, content):
    run = copy_run(run_dir, tmp_path / "run")
    (run / rel).write_text(content)
    return run


@pytest.mark.parametrize("content, why", [
    ("{bad json", "config.json: not valid JSON (line 1"),
    ('["a list"]', "config.json: expected a JSON object"),
    ('{"input_size": 32}', "config.json: does not describe a classifier (KeyError"),
    ('{"backbone": "mobilenet", "input_size": 32, "options": 3}', "does not describe a classifier"),
    ('{"backbone": "mobilenet", "input_size": 32, "options": {"alpha": 0.5}}',
     "state: checkpoint does not restore"),
])
def test_malformed_config_json(run_dir, tmp_path, capsys, content, why):
    run = broken_copy(run_dir, tmp_path, "depth0/final/config.json", content)
    with pytest.raises(ModelFileError, match=why.replace("(", r"\(")) as e:
        load_model(run)
    assert str(e.value).startswith(str(run / "depth0" / "final"))
    data = nifti(tmp_path / "case01.nii.gz")
    for argv in (["predict", str(data), "--model", str(run), "--mode", "slice"],
                 ["review", str(data), "--model", str(run), "--save", str(tmp_path / "rv")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"error: {run}/depth0/final/") and why in err


def test_malformed_checkpoint_metadata_and_heads(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "a")
    garbled = 0
    for f in (run / "depth0" / "final" / "state").rglob("*"):   # orbax's metadata files, garbled
        if f.is_file() and "METADATA" in f.name.upper():
            f.write_text("{garbage")
            garbled += 1
    assert garbled
    with pytest.raises(ModelFileError, match="state: checkpoint does not restore"):
        load_model(run)
    run = copy_run(run_dir, tmp_path / "b")
    stack = run / "depth0" / "stack"
    (stack / "state").mkdir(parents=True)
    (stack / "config.json").write_text('{"config": {"in_features": 259}}')
    with pytest.raises(ModelFileError, match="stack/config.json: does not describe a stack head"):
        load_model(run)
    (stack / "config.json").unlink()
    (stack / "direction.json").write_text("[1, 2")
    with pytest.raises(ModelFileError, match="direction.json: not a readable direction model"):
        load_model(run)


# ----------------------------------------------------------------------------- item 10: unreadable

def test_unreadable_file_is_permission_denied_not_corrupt(tmp_path, monkeypatch):
    nifti(tmp_path / "ok.nii.gz")
    nifti(tmp_path / "locked.nii.gz", seed=1)
    (tmp_path / "locked.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    only_open_fails(monkeypatch, "locked.nii.gz", PermissionError(13, "Permission denied"))
    res = scan(tmp_path)
    assert [s.subject for s in res.stacks] == ["ok"]
    why = dict(res.skipped)
    assert why[str(tmp_path / "locked.nii.gz")] == "permission denied"
    only_open_fails(monkeypatch, "locked.dcm", PermissionError(13, "Permission denied"))
    assert dict(scan(tmp_path).skipped)[str(tmp_path / "locked.dcm")] == "permission denied"
    res = scan([str(tmp_path / "locked.dcm"), str(tmp_path / "ok.nii.gz")])  # a list of files
    assert dict(res.skipped)[str(tmp_path / "locked.dcm")] == "permission denied"


def test_unlistable_folder_is_reported(tmp_path, monkeypatch):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    nifti(tmp_path / "a" / "ok.nii.gz")
    nifti(tmp_path / "b" / "unlisted.nii.gz")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("/b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    res = scan(tmp_path)
    assert [s.subject for s in res.stacks] == ["ok"]
    assert (str(tmp_path / "b"), "folder not read: permission denied") in res.skipped


def test_symlink_loops_fifo_hidden_and_linked_folders(tmp_path):
    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    (study / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    nifti(study / "sub" / "case01.nii.gz")
    nifti(elsewhere / "case02.nii.gz", seed=2)
    (study / "sub" / "loop").symlink_to("..")                  # a folder loop
    (study / "l1").symlink_to("l2")                            # a file loop
    (study / "l2").symlink_to("l1")
    (study / "linked").symlink_to(elsewhere)                   # followed, read once
    (study / "again").symlink_to(elsewhere)
    os.mkfifo(study / "pipe.dcm")                              # never opened (would block)
    (study / ".cache").mkdir()
    nifti(study / ".cache" / "case03.nii.gz", seed=3)
    res = scan(study)
    assert sorted(s.subject for s in res.stacks) == ["case01", "case02"]
    why = dict(res.skipped)
    for loop in ("l1", "l2", "sub/loop"):
        assert why[str(study / loop)].startswith("symlink loop")
    assert why[str(study / "pipe.dcm")].startswith("not a regular file")
    assert not any("corrupt" in r for r in why.values())
    ign = dict(res.ignored)
    assert ign[str(study / ".cache")].startswith("hidden folder")
    assert ign[str(study / "linked")].startswith("same folder as")


def test_symlink_loop_as_the_source(tmp_path):
    (tmp_path / "x.dcm").symlink_to("x.dcm")
    with pytest.raises(StackReadError, match="symlink loop"):
        scan(tmp_path / "x.dcm")
