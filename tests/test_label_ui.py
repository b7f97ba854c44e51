"""The labelling UI, driven headlessly with synthetic key and mouse events (Agg backend)."""

import csv

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
from matplotlib.backend_bases import KeyEvent, MouseEvent

from stackcls import backbones
from stackcls.checkpoint import save_model
from stackcls.inference import load_model
from stackcls.io import load_stacks
from stackcls.label_ui import LabelSession, StackView, review_command, stack_gradcam
from stackcls.models import build_classifier
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
