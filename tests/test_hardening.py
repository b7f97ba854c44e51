"""Hostile names and unlucky users (issue "Hardening", items 1, 2, 7, 11): names from files never
leave their output folder, labels CSV cells cannot run as formulas, saves keep the file's mode and
symlinks, and a run refuses bad configuration before it writes anything."""

import csv
import os
import stat

import numpy as np
import pytest

from stackcls.atomic import inside, replace_atomically, safe_name
from stackcls.io import load_labels, save_labels
from stackcls.study.config import compose
from stackcls.study.run import RunConfigMismatch, run


@pytest.mark.parametrize("parts, want", [
    (("../../../../tmp/x/pwn", "ED"), "tmp_x_pwn_ED"),
    (("..", ".."), "_"),
    (("-rf", "ES"), "rf_ES"),
    (("patient001", "ES", "gradcam"), "patient001_ES_gradcam"),
    (("a\x00b/c\\d", "3"), "a_b_c_d_3"),
    ((".hidden",), "hidden"),
    (("",), "_"),
])
def test_safe_name(parts, want):
    assert safe_name(*parts) == want
    assert "/" not in want and not want.startswith((".", "-"))


def test_inside_refuses_to_leave_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert inside(out, "a.png") == out.resolve() / "a.png"
    for bad in ("../a.png", "/etc/passwd", "sub/../../a.png"):
        with pytest.raises(ValueError, match="outside"):
            inside(out, bad)
    (out / "link").symlink_to(tmp_path)              # a symlink out of the folder is refused too
    with pytest.raises(ValueError, match="outside"):
        inside(out, "link/a.png")


@pytest.mark.parametrize("subject", ["=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1)", "\tTAB", "'quoted",
                                     "plain"])
def test_labels_csv_cells_cannot_be_formulas_and_read_back_unchanged(tmp_path, subject):
    p = save_labels([(subject, 1, "ED", 0, "IN"), (subject, 1, "ED", 1, "OBS")], tmp_path / "l.csv")
    with open(p, newline="") as f:
        cells = [r[0] for r in csv.reader(f)][1:]
    for c in cells:
        assert not c.startswith(("=", "+", "-", "@", "\t", "\r"))
    back = load_labels(p)
    assert [r.subject for r in back] == [subject] * 2


def test_save_keeps_mode_and_symlink_and_leaves_no_temp_files(tmp_path):
    real = tmp_path / "data" / "labels.csv"
    real.parent.mkdir()
    save_labels([("s1", 1, "ED", 0, "IN")], real)
    os.chmod(real, 0o664)
    link = tmp_path / "labels.csv"
    link.symlink_to(real)
    save_labels([("s1", 1, "ED", 0, "OBS")], link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert stat.S_IMODE(real.stat().st_mode) == 0o664
    assert [r.label for r in load_labels(real)] == ["OBS"]
    with pytest.raises(RuntimeError):                # an interrupted save leaves the file alone
        with replace_atomically(link) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert [r.label for r in load_labels(real)] == ["OBS"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["labels.csv"]


def test_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = save_labels([("s1", None, "ED", 0, "IN")], tmp_path / "new.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_run_refuses_bad_configuration_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    bad_root = compose(["data=acdc", f"data.root={tmp_path / 'nowhere'}", f"run_dir={run_dir}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(bad_root)
    assert not (run_dir / "run.json").exists()       # so the corrected rerun is not a "mismatch"
    with pytest.raises(ValueError, match="depth"):
        run(compose(["depth=5", f"run_dir={run_dir}"]))
    assert not (run_dir / "run.json").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run(compose([f"run_dir={a_file}"]))
    # an existing run of another configuration is still refused, before any work
    run_dir.mkdir(exist_ok=True)
    (run_dir / "run.json").write_text('{"identity": {"backbone": "vgg16"}}')
    with pytest.raises(RunConfigMismatch):
        run(compose([f"run_dir={run_dir}"]))

    (run_dir / "run.json").write_text("{not json")
    with pytest.raises(RunConfigMismatch, match="run.json: not a readable run record"):
        run(compose([f"run_dir={run_dir}"]))
