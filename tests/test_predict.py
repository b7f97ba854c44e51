"""predict_stack: caller order, orientation (unknown -> from data; known but contradicted -> warning),
modes, one compiled call, clear errors; DICOM / NIfTI / file-list inputs (io.inputs); the
`stackcls predict` command (cli) and its figure."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

import stackcls
from stackcls.models import backbones
from stackcls.train.checkpoint import save_model, save_stack_model
from stackcls.cli import main, predict_command
from stackcls.io import load_stacks
from stackcls.io.inputs import resolve_stack_input
from stackcls.models.classifier import build_classifier
from stackcls.phantom import cohort
from stackcls.predict.stack import OrientationWarning, Prediction, _compiled, predict_stack
from stackcls.stack import Stack, is_ordered
from stackcls.models.classifier import TrainedModel
from stackcls.models.stack_head import StackHead, StackModel, slice_features
from stackcls.train.stack_head import train_stack_model


class ToyModel:
    """Satisfies the load_model contract; a slice's class is encoded in its mean brightness (0/1/2)."""

    def __init__(self, stack_head=None):
        self.stack_head = stack_head
        self.traces = 0

    def preprocess(self, images):
        return np.asarray(images, np.float32)[..., None]

    def slice_outputs(self, x):
        self.traces += 1                                   # counts Python executions (= traces)
        m = jnp.mean(x, axis=(1, 2, 3))
        pen = jnp.stack([m, m ** 2, jnp.sin(3 * m), jnp.cos(3 * m)], 1)
        return pen, jax.nn.softmax(-(m[:, None] - jnp.arange(3.0)) ** 2 / (2 * 0.5 ** 2), axis=1)


def toy_stack(rng, S=None, a=None, c=None, noise=0.45):
    S = S or int(rng.integers(8, 17))
    a = a if a is not None else int(rng.integers(1, 4))
    c = c if c is not None else int(rng.integers(1, 4))
    y = np.array([0] * a + [1] * (S - a - c) + [2] * c)
    img = y[:, None, None] + noise * rng.normal(size=(S, 1, 1)) + 0.05 * rng.normal(size=(S, 8, 8))
    return img.astype(np.float32), y


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    toy = ToyModel()
    feats, labels, subjects = [], [], []
    for i in range(60):
        img, y = toy_stack(rng)
        pen, probs = toy.slice_outputs(toy.preprocess(img))
        feats.append(slice_features(pen, probs)); labels.append(y); subjects.append(f"t{i // 2}")
    head = train_stack_model(feats, labels, subjects, protocol=dict(hidden=8, epochs=80, folds=1,
                                                                    learning_rates=(1e-2,)), verbose=False)
    return ToyModel(head)


def test_array_apex_to_base_and_base_to_apex(model):
    img, y = toy_stack(np.random.default_rng(1), S=12, a=2, c=3, noise=0.1)
    p = predict_stack(img, model, orientation="apex_to_base")
    assert isinstance(p, Prediction)
    assert p.labels == ["OAP"] * 2 + ["IN"] * 7 + ["OBS"] * 3
    assert p.in_range == (2, 8) and p.in_range_apex_to_base == (2, 8)
    assert p.apex_to_base == list(range(12)) and p.orientation == "as_given"
    assert p.probabilities.shape == (12, 3) and np.allclose(p.probabilities.sum(1), 1, atol=1e-4)
    q = predict_stack(img[::-1], model, orientation="base_to_apex")   # caller gives base first
    assert q.labels == p.labels[::-1] and q.apex_to_base == list(range(11, -1, -1))
    assert q.in_range == (3, 9) and q.in_range_apex_to_base == (2, 8)
    np.testing.assert_allclose(q.probabilities, p.probabilities[::-1], atol=1e-5)
    assert q.orientation_warning is None and q.orientation_source == "caller"


def test_unknown_orientation_decided_from_data(model):
    rng = np.random.default_rng(2)
    right, fwd_right, acc = 0, 0, []
    for _ in range(10):
        img, y = toy_stack(rng)
        rev = predict_stack(img[::-1], model, orientation="unknown")
        right += rev.orientation == "reversed"
        acc.append(np.mean(np.array(rev.labels) == np.array([["OAP", "IN", "OBS"][k] for k in y[::-1]])))
        assert rev.apex_to_base == list(range(len(y)))[::-1] or rev.orientation != "reversed"
        assert rev.orientation_source == "data"
        fwd = predict_stack(Stack(img, [f"f{i}" for i in range(len(y))], "s", "ED"), model)  # orientation_known=False
        fwd_right += fwd.orientation == "as_given"
        assert fwd.sources[0] == "f0" and fwd.orientation_source == "data"
    assert right >= 9 and fwd_right >= 9 and np.mean(acc) > 0.85, (right, fwd_right, acc)


def test_known_orientation_contradicted_warns(model):
    img, y = toy_stack(np.random.default_rng(3), S=12, a=3, c=3, noise=0.1)
    st = Stack(img[::-1], [str(i) for i in range(12)], "s1", "ES", orientation_known=True)  # wrong geometry
    with pytest.warns(OrientationWarning, match="reversed slice order"):
        p = predict_stack(st, model)
    assert p.orientation == "as_given" and p.orientation_source == "geometry"
    assert p.orientation_warning and "s1/ES" in p.orientation_warning
    assert p.orientation_scores["reversed"] > p.orientation_scores["as_given"] + 3
    assert is_ordered(p.labels)                           # the stated order is kept, still decoded in order
    good = predict_stack(Stack(img, [str(i) for i in range(12)], "s1", "ES", orientation_known=True), model)
    assert good.orientation_warning is None


def test_modes(model):
    rng = np.random.default_rng(4)
    img, y = toy_stack(rng, S=14, a=3, c=3, noise=0.1)
    img[5] = 0.0                                          # an IN slice that looks OAP on its own
    sl = predict_stack(img, model, mode="slice", orientation="apex_to_base")
    so = predict_stack(img, model, mode="slice_ordered", orientation="apex_to_base")
    st = predict_stack(img, model, mode="stack", orientation="apex_to_base")
    assert sl.labels[5] == "OAP" and not is_ordered(sl.labels)
    assert so.labels[5] == "IN" and is_ordered(so.labels) and is_ordered(st.labels)
    np.testing.assert_allclose(sl.probabilities, so.probabilities)
    with pytest.raises(ValueError, match="no stack head"):
        predict_stack(img, ToyModel(), mode="stack", orientation="apex_to_base")


def test_sixteen_slices_one_compiled_call(model):
    rng = np.random.default_rng(5)
    m = ToyModel(model.stack_head)
    predict_stack(toy_stack(rng, S=16)[0], m, orientation="unknown")        # warm-up: traced once
    n = m.traces
    for _ in range(3):
        predict_stack(toy_stack(rng, S=16)[0], m, orientation="unknown")
    assert m.traces == n                                  # no re-tracing: the whole stack ran compiled
    (entry,) = _compiled(m, "stack").per_shape.values()
    assert entry[0]._cache_size() == 1                   # one executable for the 16-slice shape
    assert len(entry[1]) >= 1                             # the weights travel as arguments


def test_resolved_input_maps_working_to_caller_order():
    img = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 4, 4), np.float32)
    w = resolve_stack_input(img, "base_to_apex")
    assert w.known and w.source == "caller" and w.caller_index.tolist() == [4, 3, 2, 1, 0]
    assert w.images[:, 0, 0].tolist() == [4, 3, 2, 1, 0] and w.slice_ids == list(range(5))
    u = resolve_stack_input(img, "unknown")
    assert not u.known and u.source == "data" and u.caller_index.tolist() == list(range(5))
    st = Stack(img, [f"f{i}" for i in range(5)], "s", "ED", slice_ids=[9, 8, 7, 6, 5],
               orientation_known=True)
    g = resolve_stack_input(st)
    assert g.known and g.source == "geometry" and g.slice_ids == [9, 8, 7, 6, 5]
    assert resolve_stack_input(st, "unknown").source == "data"
    assert resolve_stack_input(st, "apex_to_base").source == "caller"
    with pytest.raises(ValueError, match="for a Stack"):
        resolve_stack_input(st, "base_to_apex")
    with pytest.raises(ValueError, match="orientation must be one of"):
        resolve_stack_input(img, "left_to_right")


def test_clear_errors(model):
    with pytest.raises(ValueError, match="at least 2"):
        predict_stack(np.zeros((1, 8, 8)), model, orientation="apex_to_base")
    with pytest.raises(ValueError, match="empty list"):
        predict_stack([], model)
    with pytest.raises(ValueError, match="needs orientation"):
        predict_stack(np.zeros((4, 8, 8)), model)
    with pytest.raises(ValueError, match="mode"):
        predict_stack(np.zeros((4, 8, 8)), model, mode="crf", orientation="unknown")
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        predict_stack(np.zeros((4, 8)), model, orientation="unknown")
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_stack("/nonexistent/stack.nii.gz", model)
    with pytest.raises(TypeError, match="slice_outputs"):
        predict_stack(np.zeros((4, 8, 8)), object(), orientation="unknown")


# ----------------------------------------------------------------------------- files (io + phantom)

# the toy model knows nothing of real images: the geometry check may (rightly) warn on phantom stacks
files_test = pytest.mark.filterwarnings("ignore::stackcls.predict.stack.OrientationWarning")


@pytest.fixture(scope="module")
def cohort2():
    root = cohort(2, seed=0)
    return root, load_stacks(root / "dicom", labels=root / "labels.csv")


@files_test
def test_shuffled_dicom_list_follows_caller_order(model, cohort2):
    _, stacks = cohort2
    st = stacks[0]
    files = list(st.sources)
    perm = np.random.default_rng(0).permutation(len(files))
    shuffled = [files[i] for i in perm]
    ref = predict_stack(st, model, mode="slice_ordered")
    p = predict_stack(shuffled, model, mode="slice_ordered")
    assert p.sources == shuffled
    assert [shuffled[i] for i in p.apex_to_base] == [files[i] for i in ref.apex_to_base]
    for i, f in enumerate(shuffled):
        j = files.index(f)
        assert p.labels[i] == ref.labels[j]
        np.testing.assert_allclose(p.probabilities[i], ref.probabilities[j], atol=1e-5)
    assert p.slice_ids == [st.slice_ids[files.index(f)] for f in shuffled]


@files_test
def test_classic_files_with_a_stray_per_frame_sequence(model, cohort2, tmp_path):
    """Classic single-frame MR files that an anonymiser left a one-item
    PerFrameFunctionalGroupsSequence in: each slice is named by its path, and the files read as
    a list exactly as they read as a folder."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    _, stacks = cohort2
    st = stacks[0]
    folder = tmp_path / "anonymised"
    folder.mkdir()
    files = []
    for k, f in enumerate(st.sources):
        ds = pydicom.dcmread(f)
        assert "NumberOfFrames" not in ds and ds.SOPClassUID.name == "MR Image Storage"
        item = Dataset()
        item.FrameContentSequence = Sequence([Dataset()])
        item.FrameContentSequence[0].StackID = "1"
        ds.PerFrameFunctionalGroupsSequence = Sequence([item])
        files.append(str(folder / f"{239 + k}.dcm"))
        ds.save_as(files[-1])
    [as_folder] = [s for s in load_stacks(folder) if s.phase == st.phase]
    assert sorted(as_folder.sources) == sorted(files) and as_folder.files == as_folder.sources
    np.testing.assert_array_equal(as_folder.images, st.images)
    shuffled = [files[i] for i in np.random.default_rng(1).permutation(len(files))]
    ref = predict_stack(folder, model, mode="slice_ordered", phase=st.phase)
    p = predict_stack(shuffled, model, mode="slice_ordered", phase=st.phase)
    assert p.sources == shuffled
    for i, f in enumerate(shuffled):
        j = ref.sources.index(f)
        assert p.labels[i] == ref.labels[j]
        np.testing.assert_allclose(p.probabilities[i], ref.probabilities[j], atol=1e-5)


@files_test
def test_enhanced_file_as_a_list(model, tmp_path):
    """One Enhanced MR file holding a whole stack, passed as a one-file list: its frames follow
    the file, named by frame, and the answer equals the folder's."""
    from stackcls.phantom import generate
    generate(tmp_path / "enh", 1, seed=3, enhanced=True, progress=False)
    [f] = [p for p in (tmp_path / "enh" / "dicom").rglob("*") if p.is_file()]
    ref = predict_stack(f.parent, model, mode="slice_ordered", phase="ED")
    p = predict_stack([f], model, mode="slice_ordered", phase="ED")
    assert p.sources == ref.sources and all(s.startswith(f"{f} [frame ") for s in p.sources)
    np.testing.assert_allclose(p.probabilities, ref.probabilities, atol=1e-6)
    assert p.labels == ref.labels


@files_test
def test_folder_errors_and_phase(model, cohort2, tmp_path):
    root, stacks = cohort2
    ed = [s for s in stacks if s.phase == "ED"]
    mixed = tmp_path / "two_series"
    mixed.mkdir()
    for k, s in enumerate(ed[:2]):
        for f in s.sources:
            shutil.copy(f, mixed / f"{k}_{Path(f).name}")
    with pytest.raises(ValueError, match="holds 2 stacks"):
        predict_stack(mixed, model, mode="slice", phase="ED")
    subject_dir = root / "dicom" / ed[0].subject            # a cine: ED and ES
    with pytest.raises(ValueError, match="phase="):
        predict_stack(subject_dir, model, mode="slice")
    p = predict_stack(subject_dir, model, mode="slice", phase="ES")
    assert p.phase == "ES" and len(p.labels) == ed[0].n_slices
    with pytest.raises(ValueError, match="single-slice"):                  # one DICOM file
        predict_stack([ed[0].sources[3]], model, mode="slice")


@files_test
def test_nifti_outputs_follow_file_slice_index(model, cohort2, tmp_path):
    rng = np.random.default_rng(7)
    img, y = toy_stack(rng, S=10, a=2, c=2, noise=0.1)
    data = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))     # (rows, cols, S), file order
    aff = np.diag([1.5, 1.5, 8.0, 1.0]); aff[:3, 2] = [-4.0, 4.0, 5.6]   # slice axis along (-1,1,.7) RAS
    path = tmp_path / "stack.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(path))
    st = load_stacks(path)[0]
    p = predict_stack(path, model, mode="slice")
    assert p.slice_ids == list(range(10)) and p.sources == [str(i) for i in range(10)]
    assert p.apex_to_base == st.slice_ids
    direction = "apex_to_base" if st.slice_ids[0] == 0 else "base_to_apex"
    ref = predict_stack(img, model, mode="slice", orientation=direction)
    assert p.labels == ref.labels
    np.testing.assert_allclose(p.probabilities, ref.probabilities, atol=1e-5)


@files_test
def test_predict_command(model, cohort2, tmp_path, capsys, monkeypatch):
    root, stacks = cohort2
    out_json, out_png = tmp_path / "out" / "pred.json", tmp_path / "pred.png"
    monkeypatch.setattr("stackcls.cli.FIGURE_ROWS", len(stacks) - 1)    # two figure pages
    rc = predict_command(root / "dicom", model, json_out=out_json, figure_out=out_png, mode="slice_ordered")
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("IN range") == len(stacks) and "syn0000/ED" in text
    blob = json.loads(out_json.read_text())
    assert len(blob["stacks"]) == len(stacks) and blob["mode"] == "slice_ordered"
    first = blob["stacks"][0]
    assert len(first["labels"]) == len(first["probabilities"]) == len(first["sources"])
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["pred.json"]   # no temp file left
    assert out_png.stat().st_size > 10_000 and (tmp_path / "pred-2.png").stat().st_size > 5_000
    assert predict_command(tmp_path / "missing", model) == 2
    assert predict_command(root / "dicom", ToyModel(), mode="stack") == 2       # no stack head
    assert "no stack head" in capsys.readouterr().err



# ----------------------------------------------------------------------------- checkpoint round trip

@files_test
def test_round_trip_from_run_checkpoint(cohort2, tmp_path, BB="mobilenet", SIZE=32):
    """A run directory as experiments.run writes it (depth0/final + depth0/stack), loaded by path."""
    root, stacks = cohort2
    clf = build_classifier(backbones.create(BB, weights=None, input_size=SIZE), SIZE)
    run = tmp_path / "run"
    save_model(run / "depth0" / "final", clf, dict(backbone=BB, input_size=SIZE))
    head = StackModel(StackHead(259, 8, rngs=nnx.Rngs(1)), dict(in_features=259, hidden=8, dropout=0.2))
    save_stack_model(run / "depth0" / "stack", head)
    in_memory = TrainedModel(clf, dict(backbone=BB, input_size=SIZE), head)

    loaded = stackcls.load_model(run)
    assert loaded.stack_head is not None
    st = stacks[0]
    a = stackcls.predict_stack(st, str(run), mode="stack")          # the run directory, by path
    for mode in ("stack", "slice_ordered"):
        b = stackcls.predict_stack(st, in_memory, mode=mode)
        c = stackcls.predict_stack(st, loaded, mode=mode)
        assert b.labels == c.labels and len(b.labels) == st.n_slices
        np.testing.assert_allclose(b.probabilities, c.probabilities, atol=1e-5)
        if mode == "stack":
            assert a.labels == c.labels
            np.testing.assert_allclose(a.probabilities, c.probabilities, atol=1e-5)
            assert not np.allclose(c.probabilities, 1 / 3, atol=1e-3)   # the head really ran
    out = tmp_path / "p.json"
    assert main(["predict", str(root / "dicom" / st.subject), "--model", str(run), "--json", str(out)]) == 0
    blob = json.loads(out.read_text())
    assert {s["phase"] for s in blob["stacks"]} == {"ED", "ES"} and blob["mode"] == "stack"


@pytest.mark.parametrize("mode", ["slice", "slice_ordered", "stack"])
def test_padding_to_the_compiled_length_changes_nothing(model, mode):
    """The compiled core runs on stacks padded to `padded_length`; its outputs equal the core's
    on the unpadded stack (traced at the stack's own length), whatever the length."""
    from stackcls.predict.stack import _core, padded_length
    core = jax.jit(_core(model, mode))
    rng = np.random.default_rng(5)
    for S in (7, 9, 13, 16, 21):
        img, _ = toy_stack(rng, S=S)
        assert padded_length(S) % 4 == 0 and S <= padded_length(S) < S + 4
        x = model.preprocess(img)
        ref = core(x, jnp.int32(S))                                 # no padding at all
        got = _compiled(model, mode)(x)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        for i in (2, 3):                                            # the labels, exactly
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(ref[i]))
