"""Frozen-backbone inference: extraction keys and chunking, pooled features from cached trunk
outputs, predict_outputs per stage, and load_model on a run directory."""

import shutil

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from stackcls import load_model as top_level_load_model  # noqa: E402
from stackcls.models import backbones  # noqa: E402
from stackcls.train.checkpoint import save_model, save_stack_model  # noqa: E402
from stackcls.models.direction import DirectionModel  # noqa: E402
from stackcls.models.apply import extract, pooled_features, predict_outputs  # noqa: E402
from stackcls.models.classifier import TrainedModel  # noqa: E402
from stackcls.predict.load import load_model, setting_dirs  # noqa: E402
from stackcls.models.classifier import build_classifier  # noqa: E402
from stackcls.models.stack_head import StackHead, StackModel  # noqa: E402


def close(a, b, rtol=1e-5):
    """allclose relative to the arrays' scale (random-weight activations are tiny)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    return build_classifier(backbones.create("mobilenet", weights=None, input_size=32), 32, seed=0)


@pytest.fixture(scope="module")
def images():
    return (np.random.default_rng(0).random((21, 32, 32, 3)) * 255).astype(np.float32)


def test_extract_views_and_chunks(model, images):
    clean = extract(model, images, "features")
    assert clean.shape == (21, 256)
    assert close(extract(model, images, "features", chunk=8), clean)
    views = extract(model, images, "features", views=2, seed=0, chunk=8)
    assert views.shape == (21, 2, 256)
    assert not close(views[:, 0], views[:, 1], 1e-2)                     # two different rotations
    np.testing.assert_array_equal(extract(model, images, "features", views=2, seed=0, chunk=8), views)
    assert not close(extract(model, images, "features", views=2, seed=1, chunk=8), views, 1e-2)
    # view v of chunk c: its key is fold_in(fold_in(PRNGKey(seed), v), c)
    second_chunk = extract(model, images[8:16], "features", views=2, seed=0, chunk=8)
    assert not close(second_chunk, views[8:16], 1e-2)
    np.testing.assert_array_equal(extract(model, images[:8], "features", views=2, seed=0, chunk=8), views[:8])


def test_pooled_features_from_trunk_outputs(model, images):
    carry = extract(model, images, "carry")
    assert close(pooled_features(model, carry), extract(model, images, "features"))
    carry_views = extract(model, images, "carry", views=2, seed=3)
    pooled = pooled_features(model, carry_views, views=True)
    assert pooled.shape == (21, 2, 256)
    assert close(pooled[:, 1], pooled_features(model, jax.tree.map(lambda a: a[:, 1], carry_views)))


def test_predict_outputs_same_for_every_stage(model, images):
    lo, pen = predict_outputs(model, images, "image", chunk=8)
    assert lo.shape == (21, 3) and pen.shape == (21, 256) and isinstance(lo, np.ndarray)
    for stage, inputs in (("carry", extract(model, images, "carry")), ("features", extract(model, images, "features"))):
        lo2, pen2 = predict_outputs(model, inputs, stage)
        assert close(lo2, lo, 1e-4) and close(pen2, pen, 1e-4)
    tm = TrainedModel(model, dict(input_size=32))
    p_pen, probs = tm.slice_outputs(images)
    assert close(probs, jax.nn.softmax(jnp.asarray(lo)), 1e-4) and close(p_pen, pen, 1e-4)
    assert close(tm.logits(images), lo, 1e-4)


def test_load_model_from_a_run_directory(model, images, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no trained model"):
        load_model(run)
    for s in ("depth0", "scratch"):
        save_model(run / s / "final", model, dict(backbone="mobilenet", input_size=32, keep=0.5))
    head = StackModel(StackHead(259, 8, rngs=nnx.Rngs(1)), dict(in_features=259, hidden=8, dropout=0.2))
    save_stack_model(run / "depth0" / "stack", head)
    DirectionModel(np.zeros(259), np.ones(259), np.ones(259)).save(run / "depth0" / "stack")
    assert list(setting_dirs(run)) == ["scratch", "depth0"]
    tm = top_level_load_model(run)                                      # the deepest setting
    # a run written before the model format: converted once into depth0/model.npz
    assert tm.path == run / "depth0" / "model.npz" and tm.input_size == 32 and tm.preprocess(images[:2, ..., 0]).shape == (2, 32, 32, 3)
    assert isinstance(tm.stack_head, StackModel) and isinstance(tm.direction, DirectionModel)
    np.testing.assert_array_equal(np.asarray(tm.slice_outputs(images)[1]),
                                  np.asarray(TrainedModel(model, {}).slice_outputs(images)[1]))
    assert load_model(run, stack=False).stack_head is None
    plain = load_model(run, "scratch")
    assert plain.stack_head is None and plain.direction is None
    assert load_model(run / "scratch" / "final").path == run / "scratch" / "final" / "model.npz"
    # from now on the model file alone is read: the checkpoints can go
    shutil.rmtree(run / "depth0" / "final" / "state")
    again = load_model(run)
    assert again.path == run / "depth0" / "model.npz" and isinstance(again.direction, DirectionModel)
    np.testing.assert_array_equal(np.asarray(again.slice_outputs(images)[1]),
                                  np.asarray(tm.slice_outputs(images)[1]))
    assert load_model(run / "depth0").path == run / "depth0" / "model.npz"       # a model folder
    assert load_model(run / "depth0" / "model.npz").stack_head is not None       # a model file
    with pytest.raises(FileNotFoundError, match="depth1"):
        load_model(run, "depth1")
