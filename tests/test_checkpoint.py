"""Saving and restoring both kinds of model: exact round trips, and a half-written folder is never
taken for a saved model."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
from flax import nnx  # noqa: E402

from stackcls.models import backbones  # noqa: E402
from stackcls.train.checkpoint import (is_saved, load_stack_model, restore_model, save_model,  # noqa: E402
                                 save_stack_model)
from stackcls.models.apply import predict_outputs  # noqa: E402
from stackcls.models.classifier import build_classifier  # noqa: E402
from stackcls.models.stack_head import StackHead, StackModel  # noqa: E402


def _perturbed(module, seed):
    """Move every variable off its initial value, so a round trip cannot pass by re-initialising."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module)
    nnx.update(module, jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(a.dtype) * 0.1
                                    if np.issubdtype(a.dtype, np.floating) else a, state))
    return module


def test_classifier_round_trip(tmp_path):
    size = backbones.spec("cbr_tiny").min_size
    model = _perturbed(build_classifier(backbones.create("cbr_tiny", weights=None, input_size=size), size), 0)
    with pytest.raises(ValueError, match="backbone"):
        save_model(tmp_path / "m", model, dict(input_size=size))
    cfg = dict(backbone="cbr_tiny", input_size=size, keep=0.6, note=np.float32(0.5))
    save_model(tmp_path / "m", model, cfg)
    back, cfg2 = restore_model(tmp_path / "m")
    assert cfg2 == dict(backbone="cbr_tiny", input_size=size, keep=0.6, note=0.5)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(1).random((5, size, size, 3)).astype(np.float32) * 255
    np.testing.assert_array_equal(predict_outputs(model, x)[0], predict_outputs(back, x)[0])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "state"]


def test_stack_model_round_trip(tmp_path):
    head = _perturbed(StackHead(7, 8, residual=True, rngs=nnx.Rngs(0)), 1)
    m = StackModel(head, dict(in_features=7, hidden=8, dropout=0.2, residual=True), dict(selected=dict(epochs=3)))
    save_stack_model(tmp_path / "head", m)
    back = load_stack_model(tmp_path / "head")
    f = np.random.default_rng(2).normal(size=(11, 7)).astype(np.float32)
    np.testing.assert_array_equal(back.scores(f), m.scores(f))
    assert back.info == m.info and back.config == m.config
    with pytest.raises(FileNotFoundError, match="not a saved stack model"):
        load_stack_model(tmp_path / "nothing")


def test_an_interrupted_save_is_not_a_saved_model(tmp_path):
    head = StackHead(4, 4, rngs=nnx.Rngs(0))
    save_stack_model(tmp_path / "h", StackModel(head, dict(in_features=4, hidden=4, dropout=0.2)))
    assert is_saved(tmp_path / "h")
    # a second save that dies after removing the old record: config.json goes first
    (tmp_path / "h" / "config.json").unlink()
    assert not is_saved(tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        restore_model(tmp_path / "h")
