"""The direction model: antisymmetric by construction, learns apex vs base from features even when
every slice is IN, persists, and decides predict_stack's direction when the orientation is unknown."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from stackcls.models.direction import DirectionModel, fit_direction, moment
from stackcls.predict.stack import predict_stack


def all_in_stacks(n, rng, dim=6):
    """Stacks whose every slice is IN; one feature grows from apex to base (the cavity gets larger),
    the others are noise. Slice labels can not tell the direction here, features can."""
    feats, subjects = [], []
    for i in range(n):
        S = int(rng.integers(7, 15))
        f = rng.normal(size=(S, dim)).astype(np.float32)
        f[:, 2] += np.linspace(0.0, 2.0, S) + 0.5 * rng.normal()
        feats.append(f)
        subjects.append(f"s{i // 2}")
    return feats, subjects


def test_antisymmetric_and_accurate():
    rng = np.random.default_rng(0)
    feats, subjects = all_in_stacks(60, rng)
    model = fit_direction(feats, subjects)
    test, _ = all_in_stacks(100, np.random.default_rng(1))
    logits = np.array([model.logit(f) for f in test])
    rev = np.array([model.logit(f[::-1]) for f in test])
    np.testing.assert_allclose(rev, -logits, atol=1e-5)
    assert (logits > 0).mean() >= 0.95
    # by hand: the moment of a 3-slice stack weights the slices -1, 0, +1
    f = np.array([[1.0], [5.0], [3.0]], np.float32)
    assert moment(f, np.zeros(1), np.ones(1))[0] == pytest.approx((-1 + 3) / 3)
    # numpy and jax give the same logit (predict_stack evaluates it inside a jit)
    assert float(model.logit(jnp.asarray(test[0]))) == pytest.approx(float(logits[0]), abs=1e-4)


def test_save_load_and_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    feats, subjects = all_in_stacks(12, rng)
    model = fit_direction(feats, subjects)
    model.save(tmp_path)
    back = DirectionModel.load(tmp_path)
    assert back.logit(feats[0]) == pytest.approx(model.logit(feats[0]), abs=1e-5)
    assert back.info["C"] == model.info["C"]
    (tmp_path / "direction.json").write_text('{"mean": [1, 2], "std": [1], "weights": [0, 0]}')
    with pytest.raises(ValueError, match="direction.json"):
        DirectionModel.load(tmp_path)
    with pytest.raises(ValueError, match="at least 2"):
        fit_direction(feats[:1], subjects[:1])


class GradientModel:
    """predict_stack's model contract; a slice's brightness says how basal it is, and every slice is
    IN (so the ordered decoding scores both directions alike)."""

    stack_head = None

    def __init__(self, direction=None):
        self.direction = direction

    def preprocess(self, images, spacing=None):
        return np.asarray(images, np.float32)[..., None]

    def slice_outputs(self, x):
        m = jnp.mean(x, axis=(1, 2, 3))
        pen = jnp.stack([m, jnp.cos(m)], 1)
        probs = jnp.tile(jnp.array([0.02, 0.96, 0.02]), (x.shape[0], 1))
        return pen, probs


def test_predict_stack_uses_direction_model_when_orientation_unknown():
    rng = np.random.default_rng(3)
    plain = GradientModel()

    def stack(S):
        return (np.linspace(0, 1, S)[:, None, None] + 0.05 * rng.normal(size=(S, 4, 4))).astype(np.float32)

    feats = []
    for _ in range(20):
        img = stack(int(rng.integers(8, 13)))
        pen, probs = plain.slice_outputs(plain.preprocess(img))
        feats.append(np.concatenate([np.asarray(pen), np.log(np.asarray(probs))], 1))
    model = GradientModel(fit_direction(feats, [f"p{i}" for i in range(20)]))
    for S in (9, 12):
        img = stack(S)
        fwd = predict_stack(img, model, mode="slice_ordered", orientation="unknown")
        rev = predict_stack(img[::-1], model, mode="slice_ordered", orientation="unknown")
        assert fwd.orientation == "as_given" and rev.orientation == "reversed"
        assert fwd.orientation_scores["direction_logit"] > 0 > rev.orientation_scores["direction_logit"]
        assert rev.apex_to_base == list(range(S))[::-1]
        # without it the tie keeps the given order, whichever it is
        assert predict_stack(img[::-1], plain, mode="slice_ordered", orientation="unknown").orientation == "as_given"
