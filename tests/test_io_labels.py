"""Labels CSV (load / atomic save / attach) and `stackcls inspect`."""

import os

import numpy as np
import pytest

from test_io_dicom import make_series, truth

import stackcls.atomic
from stackcls.cli import main
from stackcls.io import LabelRow, StackReadError, attach_labels, load_labels, load_stacks, save_labels
from stackcls.io.inspect import inspect_command
from stackcls.stack import Stack

HEADER = "subject,frame,phase,slice,label\n"


def stack(subject="s1", phase="ED", n=4, frame=None, ids=None):
    return Stack(images=np.zeros((n, 3, 3)), sources=[str(i) for i in range(n)], subject=subject,
                 phase=phase, frame=frame, slice_ids=ids)


def test_round_trip_stacks_and_rows(tmp_path):
    a = stack(frame=1, ids=[3, 2, 1, 0])
    a.labels = ["OAP", "IN", "IN", "OBS"]
    b = stack("s2", "ES", n=3)
    b.labels = ["IN", "IN", "OBS"]
    unlabelled = stack("s3")
    p = save_labels([a, b, unlabelled], tmp_path / "sub" / "labels.csv")
    text = p.read_text()
    assert text.splitlines()[0] == "subject,frame,phase,slice,label"
    assert "s1,1,ED,3,OAP" in text and "s2,,ES,0,IN" in text and "s3" not in text
    rows = load_labels(p)
    assert rows[0] == LabelRow("s1", 1, "ED", 3, "OAP", 2) and rows[4].frame is None
    fresh = [stack(frame=1, ids=[3, 2, 1, 0]), stack("s2", "ES", n=3), stack("s3")]
    attach_labels(fresh, p)
    assert fresh[0].labels == a.labels and fresh[1].labels == b.labels and fresh[2].labels is None
    # dict rows (the label UI's format) write the same file
    save_labels([dict(subject=r.subject, frame=r.frame, phase=r.phase, slice=r.slice, label=r.label)
                 for r in rows], tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_text() == text


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_atomic_save_keeps_old_file(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "labels.csv"
    p.write_text(HEADER + "old,1,ED,0,IN\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(stackcls.atomic.os, fail_at, boom)   # the writer save_labels goes through
    with pytest.raises(OSError, match="disk full"):
        save_labels([("new", 1, "ED", 0, "OBS")], p)
    assert p.read_text() == HEADER + "old,1,ED,0,IN\n"
    assert os.listdir(tmp_path) == ["labels.csv"]  # no temp file left behind


def test_save_rejects_bad_label(tmp_path):
    with pytest.raises(ValueError, match="'XX'"):
        save_labels([("s", 0, "ED", 0, "XX")], tmp_path / "l.csv")
    assert not (tmp_path / "l.csv").exists()


@pytest.mark.parametrize("body,match", [
    ("subject,phase,slice,label\ns,ED,0,IN\n", r"line 1: .*lacks column\(s\) \['frame'\]"),
    (HEADER + "s,1,ED,0,IN\ns,1,ED,1,MAYBE\n", r"line 3: label 'MAYBE'"),
    (HEADER + "s,1,ED,x,IN\n", r"line 2: slice 'x' and frame '1' must be integers"),
    (HEADER + "s,1,ED,0,IN\ns,1,ED,0,OBS\n", r"line 3: slice 0 of s/ED already labelled on line 2"),
    (HEADER + "s,1,ED\n", r"line 2: 3 fields"),
    ("", r"empty labels CSV"),
])
def test_load_errors_name_file_and_line(tmp_path, body, match):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(StackReadError, match=match) as e:
        load_labels(p)
    assert str(p) in str(e.value)


def test_attach_errors(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text(HEADER + "".join(f"s1,1,ED,{i},IN\n" for i in range(4)) + "ghost,1,ED,0,IN\n")
    with pytest.raises(StackReadError, match=r"line 6: subject 'ghost' matches no loaded stack"):
        attach_labels([stack(frame=1)], p)
    p.write_text(HEADER + "".join(f"s1,1,ED,{i},IN\n" for i in range(5)))
    with pytest.raises(StackReadError, match=r"line 6: s1/ED has no slice 4"):
        attach_labels([stack(frame=1)], p)
    p.write_text(HEADER + "".join(f"s1,1,ED,{i},IN\n" for i in range(3)))
    with pytest.raises(StackReadError, match=r"labels 3 of 4 slices; no label for slice id\(s\) \[3\]"):
        attach_labels([stack(frame=1)], p)
    p.write_text(HEADER + "".join(f"s1,7,ED,{i},IN\n" for i in range(4)))
    with pytest.raises(StackReadError, match=r"frame \[7\] but the loaded stack is frame 1"):
        attach_labels([stack(frame=1)], p)
    with pytest.raises(StackReadError, match=r"match two loaded stacks"):
        p.write_text(HEADER + "".join(f"s1,1,ED,{i},IN\n" for i in range(4)))
        attach_labels([stack(frame=1), stack(frame=1)], p)
    # rows of a phase that was not loaded are fine; the stack without rows stays unlabelled
    p.write_text(HEADER + "".join(f"s1,9,ES,{i},IN\n" for i in range(4)))
    st = stack(frame=1)
    attach_labels([st], p)
    assert st.labels is None


def test_load_stacks_with_labels_picks_labelled_es_frame(tmp_path):
    make_series(tmp_path / "d", n_slices=4, n_phases=6, patient="S9")
    rows = ([("S9", 0, "ED", i, "IN") for i in range(4)]
            + [("S9", 2, "ES", i, lab) for i, lab in enumerate(["OAP", "IN", "IN", "OBS"])])
    p = save_labels(rows, tmp_path / "labels.csv")
    ed, es = load_stacks(tmp_path / "d", labels=p)
    assert es.frame == 2 and truth(es)[1] == [2] * 4  # the estimate alone would say 3
    assert es.labels == ["OAP", "IN", "IN", "OBS"] and es.meta["es_source"] == "given by the labels CSV"
    assert ed.labels == ["IN"] * 4


def test_inspect_command(tmp_path, capsys):
    make_series(tmp_path / "d", n_slices=4, n_phases=3, patient="S9")
    (tmp_path / "d" / "junk.bin").write_bytes(b"nope" * 100)
    p = save_labels([("S9", 0, "ED", i, lab) for i, lab in enumerate(["OAP", "IN", "IN", "OBS"])],
                    tmp_path / "labels.csv")
    assert inspect_command(tmp_path / "d", labels=p) == 0
    out = capsys.readouterr().out
    assert "S9  ED frame 0  4 slices" in out and "labels: OAP IN IN OBS" in out
    assert "positions (mm):" in out and "orientation: geometry" in out
    assert "junk.bin: not a DICOM file" in out and "2 stack(s) from 1 subject(s), 1 labelled" in out
    (tmp_path / "empty").mkdir()
    assert inspect_command(tmp_path / "empty") == 1
    captured = capsys.readouterr()
    assert "empty folder" in captured.out and "no stack found" in captured.err
    assert inspect_command(tmp_path / "missing") == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_inspect_acdc(acdc_root, capsys):
    assert main(["inspect", str(acdc_root / "patient001"), "--labels",
                 str(acdc_root / "labels.csv")]) == 1  # labels name 79 subjects not loaded here
    assert "matches no loaded stack" in capsys.readouterr().err
    assert main(["inspect", str(acdc_root / "patient001")]) == 0
    out = capsys.readouterr().out
    assert "patient001  ED frame 1  10 slices" in out and "acdc convention: slice 0 basal" in out
