"""The labelling UI, driven headlessly with synthetic key and mouse events (Agg backend)."""

import csv
import os
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
from matplotlib.backend_bases import KeyEvent, MouseEvent

from stackcls.models import backbones
from stackcls.train.checkpoint import save_model
from stackcls.predict.load import load_model
from stackcls.ui import label_ui
from stackcls.io import load_labels, load_stacks
from stackcls.ui.label_session import LabelsConflictError, LabelSession
from stackcls.ui.label_ui import StackView, label_command, review_command, stack_gradcam
from stackcls.models.classifier import build_classifier
from stackcls.stack import Stack
from test_io_dicom import make_series   # the DICOM series writer of the reader's tests


def make_stacks(n_stacks=3, n_slices=6, size=24):
    rng = np.random.default_rng(0)
    return [
        Stack(images=rng.random((n_slices, size, size), dtype=np.float32),
              sources=[f"s{i}_{k}" for k in range(n_slices)], subject=f"subj{i:02d}",
              phase="ED", frame=0)
        for i in range(n_stacks)
    ]


def key(view, k):
    view.fig.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", view.fig.canvas, key=k))


def click(view, slice_pos, button=1):
    ax = view.axes[slice_pos]
    view.fig.canvas.draw()
    x, y = ax.transAxes.transform((0.5, 0.5))
    ev = MouseEvent("button_press_event", view.fig.canvas, x, y, button=button)
    view.fig.canvas.callbacks.process("button_press_event", ev)


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["subject"], r["phase"], int(r["slice"])): r["label"] for r in csv.DictReader(f)}


@pytest.fixture
def view(tmp_path):
    session = LabelSession(make_stacks(), tmp_path / "labels.csv")
    v = StackView(session, figure=plt.figure())
    yield v
    plt.close(v.fig)


def test_keys_label_one_slice_and_save_at_once(view, tmp_path):
    key(view, "right")
    key(view, "right")
    key(view, "b")
    assert view.session.labels_of()[2] == "OBS"
    assert read_csv(tmp_path / "labels.csv") == {("subj00", "ED", 2): "OBS"}
    key(view, "1")
    assert read_csv(tmp_path / "labels.csv")[("subj00", "ED", 2)] == "OAP"


def test_clicks_set_both_boundaries(view, tmp_path):
    click(view, 1, button=1)   # first IN
    click(view, 4, button=3)   # last IN
    assert view.session.labels_of() == ["OAP", "IN", "IN", "IN", "IN", "OBS"]
    saved = read_csv(tmp_path / "labels.csv")
    assert [saved[("subj00", "ED", k)] for k in range(6)] == ["OAP", "IN", "IN", "IN", "IN", "OBS"]
    # Moving the apical boundary keeps the basal one.
    click(view, 2, button=1)
    assert view.session.labels_of() == ["OAP", "OAP", "IN", "IN", "IN", "OBS"]
    assert view.session.progress() == (1, 3)


def test_navigation_and_jump_to_unlabelled(view):
    view.session.set_range(0, 5)
    key(view, "n")
    assert view.session.index == 1
    view.session.set_range(1, 4)
    key(view, "p")
    assert view.session.index == 0
    key(view, "u")
    assert view.session.index == 2
    key(view, "h")
    assert view.show_help
    texts = " ".join(t.get_text() for t in view.fig.texts)
    assert "next unlabelled" in texts and "labelled 2/3" in view.fig._suptitle.get_text()


def test_interrupted_session_resumes_without_loss(tmp_path):
    stacks = make_stacks()
    path = tmp_path / "labels.csv"
    s1 = LabelSession(stacks, path)
    s1.set_range(1, 3)          # stack 0 fully labelled
    s1.go(1)
    s1.set_label(0, "OAP")      # stack 1 partly labelled; then the process "dies"
    del s1
    s2 = LabelSession(stacks, path)
    assert s2.index == 1        # the first stack that is not fully labelled
    assert s2.labels_of(0) == ["OAP", "IN", "IN", "IN", "OBS", "OBS"]
    assert s2.labels_of(1)[0] == "OAP" and s2.labels_of(1)[1] is None


def test_rows_of_other_subjects_and_hand_edits_are_kept(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("subject,frame,phase,slice,label\nother,0,ES,0,IN\nsubj00,0,ED,3,OBS\n")
    s = LabelSession(make_stacks(), path)
    assert s.labels_of(0)[3] == "OBS"    # a label added by hand is respected
    s.set_label(0, "OAP")
    saved = read_csv(path)
    assert saved[("other", "ES", 0)] == "IN" and saved[("subj00", "ED", 3)] == "OBS"


def test_unreadable_csv_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "labels.csv"
    garbage = "subject;frame\n\x00\x01 not a labels file\n"
    path.write_text(garbage)
    with pytest.raises(ValueError, match="labels.csv"):
        LabelSession(make_stacks(), path)
    assert path.read_text() == garbage


# ------------------------------------------------------ frames, two writers, stale temp files

HEADER = "subject,frame,phase,slice,label\n"


def rows_csv(subject, frame, phase, labels):
    return "".join(f"{subject},{'' if frame is None else frame},{phase},{k},{lab}\n"
                   for k, lab in enumerate(labels))


def csv_rows(path):
    return {(r.subject, r.frame, r.phase, r.slice, r.label) for r in load_labels(path)}


def test_es_rows_of_two_frames_survive_a_save_unchanged(tmp_path):
    path = tmp_path / "labels.csv"
    f5 = ["OAP", "IN", "IN", "IN", "OBS", "OBS"]
    f7 = ["OAP", "OAP", "IN", "IN", "IN", "OBS"]
    path.write_text(HEADER + rows_csv("subj00", 5, "ES", f5) + rows_csv("subj00", 7, "ES", f7))
    before = csv_rows(path)
    es = make_stacks(1)[0]
    es.phase, es.frame = "ES", 7
    s = LabelSession([make_stacks(1)[0], es], path)
    assert s.labels_of(1) == f7                    # the stack's own frame, not frame 5
    s.set_label(0, "OAP")                          # an edit of the ED stack
    assert csv_rows(path) == before | {("subj00", 0, "ED", 0, "OAP")}
    s.go(1)
    s.set_label(0, "IN")                           # an edit of frame 7 leaves frame 5 alone
    assert {r for r in csv_rows(path) if r[1] == 5} == {r for r in before if r[1] == 5}
    assert ("subj00", 7, "ES", 0, "IN") in csv_rows(path)


def test_label_shows_the_labels_on_the_es_frame_the_csv_names(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    cine = (rng.random((20, 20, 5, 8)) * 100).astype(np.float32)
    cine += np.arange(8, dtype=np.float32)[None, None, None, :] * 1000   # frames tell themselves apart
    nii = tmp_path / "case07.nii.gz"
    nib.save(nib.Nifti1Image(cine, np.eye(4)), nii)
    estimated = next(s.frame for s in load_stacks(nii) if s.phase == "ES")
    named = 3 if estimated != 3 else 5
    es_labels = ["OAP", "IN", "IN", "OBS", "OBS"]
    path = tmp_path / "labels.csv"
    path.write_text(HEADER + rows_csv("case07", named, "ES", es_labels))
    seen = {}
    monkeypatch.setattr(label_ui, "StackView", lambda session: seen.setdefault("s", session))
    monkeypatch.setattr(plt, "show", lambda: None)
    assert label_command(nii, path) == 0
    sess = seen["s"]
    i = next(k for k, st in enumerate(sess.stacks) if st.phase == "ES")
    es = sess.stacks[i]
    assert es.frame == named and es.images.min() >= named * 1000 and es.images.max() < (named + 1) * 1000
    assert sess.labels_of(i) == es_labels
    sess.go(i)
    sess.set_label(4, "IN")                        # the next save keeps the CSV loadable
    es2 = next(s for s in load_stacks(nii, labels=path) if s.phase == "ES")
    assert es2.frame == named and es2.labels == es_labels[:4] + ["IN"]


def test_two_sessions_on_one_csv_keep_every_row_of_both(tmp_path):
    path = tmp_path / "labels.csv"
    a = LabelSession(make_stacks(), path)
    b = LabelSession(make_stacks(), path)
    a.set_range(1, 3)                              # a: stack 0
    b.go(1)
    b.set_range(2, 4)                              # b: stack 1; a's rows must survive
    a.go(2)
    a.set_label(0, "OAP")                          # then both on stack 2, different slices
    b.go(2)
    b.set_label(5, "OBS")
    a.set_label(1, "IN")
    saved = read_csv(path)
    assert [saved[("subj00", "ED", k)] for k in range(6)] == ["OAP", "IN", "IN", "IN", "OBS", "OBS"]
    assert [saved[("subj01", "ED", k)] for k in range(6)] == ["OAP", "OAP", "IN", "IN", "IN", "OBS"]
    assert {k: saved[("subj02", "ED", k)] for k in (0, 1, 5)} == {0: "OAP", 1: "IN", 5: "OBS"}
    assert len(saved) == 15
    assert a.labels_of(1) == b.labels_of(1)        # a now sees b's stack too
    b.clear()                                      # b's own stack: b wins, a's slices 0/1 were there
    assert not any(k[0] == "subj02" for k in read_csv(path)) and len(read_csv(path)) == 12


def test_a_changed_csv_that_cannot_be_read_is_never_overwritten(tmp_path):
    path = tmp_path / "labels.csv"
    s = LabelSession(make_stacks(), path)
    s.set_label(0, "OAP")
    good = path.read_text()
    garbage = "subject;frame\n\x00 written by someone else\n"
    path.write_text(garbage)
    with pytest.raises(LabelsConflictError, match="labels.csv.*NOT saved"):
        s.set_label(1, "IN")
    assert path.read_text() == garbage
    v = StackView(s, figure=plt.figure())
    key(v, "b")                                    # the window says so instead of crashing
    assert "NOT SAVED" in v.message and path.read_text() == garbage
    plt.close(v.fig)
    path.write_text(good)                          # fixed by hand: the next save has every edit
    s.set_label(2, "IN")
    assert read_csv(path) == {("subj00", "ED", 0): "OBS", ("subj00", "ED", 1): "IN",
                              ("subj00", "ED", 2): "IN"}


def test_a_save_removes_stale_temp_files_of_its_csv(tmp_path):
    path = tmp_path / "labels.csv"
    stale, fresh = tmp_path / ".labels.csv.k2j4_x9a.tmp", tmp_path / ".labels.csv.q7w8e9r0.tmp"
    others = [tmp_path / ".other.csv.k2j4_x9a.tmp", tmp_path / ".labels.csv.notmine.tmp",
              tmp_path / "labels.csv.k2j4_x9a.tmp"]
    for f in [stale, fresh, *others]:
        f.write_text("half a save")
    old = time.time() - 120
    for f in [stale, *others]:
        os.utime(f, (old, old))
    s = LabelSession(make_stacks(), path)
    s.set_label(0, "IN")
    assert not stale.exists()
    assert fresh.exists() and all(f.exists() for f in others)   # a save in progress; not ours


# ----------------------------------------------------------------------------- review mode

def tiny_run(tmp_path, size=32):
    """A run directory as experiments.run writes it, with an untrained mobilenet classifier."""
    clf = build_classifier(backbones.create("mobilenet", weights=None, input_size=size), size)
    run = tmp_path / "run"
    save_model(run / "depth0" / "final", clf, dict(backbone="mobilenet", input_size=size))
    return run


def test_review_figures_render_headless_with_gradcam(tmp_path):
    rng = np.random.default_rng(1)
    vol = (rng.random((40, 36, 6)) * 200).astype(np.float32)
    vol[12:28, 10:26, :] += 300.0            # something for the CAM to look at
    nii = tmp_path / "case01.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), nii)
    run = tiny_run(tmp_path)

    model = load_model(run)
    stack = load_stacks(nii)[0]
    cams = stack_gradcam(model, stack, np.ones(stack.n_slices, int))
    assert cams.shape == stack.images.shape and 0.0 <= cams.min() and cams.max() <= 1.0
    # Outside the centre crop the model saw nothing, so the map is zero there.
    assert cams[:, :3, :].max() == 0.0 and cams[:, :, :3].max() == 0.0

    labels = tmp_path / "labels.csv"
    labels.write_text("subject,frame,phase,slice,label\n"
                      + "".join(f"{stack.subject},,ED,{k},OBS\n" for k in range(6)))
    before = labels.read_text()
    out = tmp_path / "review"
    assert review_command(nii, model=run, labels=labels, save=out) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{stack.subject}_ED.png", f"{stack.subject}_ED_gradcam.png"]
    plain = plt.imread(out / pngs[0])
    cam = plt.imread(out / pngs[1])
    assert plain.shape == cam.shape and np.abs(plain - cam).max() > 0.1
    assert labels.read_text() == before      # reviewing never rewrites the user's labels


def test_review_with_a_hostile_patient_id_writes_only_inside_the_output_folder(tmp_path):
    make_series(tmp_path / "study", n_slices=5, patient="../../../escaped/pwn")
    out = tmp_path / "a" / "b" / "review"
    assert review_command(tmp_path / "study", model=tiny_run(tmp_path), save=out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["escaped_pwn_ED.png", "escaped_pwn_ED_gradcam.png"]
    assert not list(tmp_path.rglob("escaped"))            # no folder made from the name, anywhere
