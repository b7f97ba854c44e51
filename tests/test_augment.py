"""The jitted rotation against scipy.ndimage.rotate and Keras' own apply_affine_transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as nd

from stackcls.preprocess.augment import random_rotation, rotate


def _scipy_rotate(img, angle):
    return nd.rotate(img, angle, axes=(0, 1), reshape=False, order=1, mode="nearest")


@pytest.mark.parametrize("shape", [(9, 9, 3), (7, 12, 2), (16, 16, 1)])
def test_rotate_matches_scipy(shape):
    rng = np.random.default_rng(0)
    angles = np.array([0.0, 17.0, -45.0, 90.0, 133.7, -180.0], np.float32)
    x = rng.random((len(angles),) + shape).astype(np.float32)
    out = np.asarray(jax.jit(rotate)(x, angles))
    assert out.shape == x.shape and out.dtype == np.float32
    for i, a in enumerate(angles):
        np.testing.assert_allclose(out[i], _scipy_rotate(x[i], float(a)), atol=2e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_rotate_matches_keras_image_data_generator():
    pytest.importorskip("keras")
    from keras.src.legacy.preprocessing.image import apply_affine_transform

    rng = np.random.default_rng(1)
    x = rng.random((3, 12, 12, 3)).astype(np.float32)
    angles = np.array([30.0, -41.5, 5.0], np.float32)
    out = np.asarray(rotate(x, angles))
    for i, a in enumerate(angles):
        ref = apply_affine_transform(x[i], theta=float(a), row_axis=0, col_axis=1, channel_axis=2,
                                     fill_mode="nearest", order=1)
        np.testing.assert_allclose(out[i], ref, atol=2e-5)


def test_rotate_edge_fill_is_nearest_not_zero():
    x = np.ones((1, 10, 10, 1), np.float32)
    out = np.asarray(rotate(x, np.array([45.0])))
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # corners replicate the edge, no black wedges


def test_rotate_3d_input_and_bad_angles():
    x = np.random.default_rng(2).random((2, 8, 8)).astype(np.float32)
    out = np.asarray(rotate(x, np.array([10.0, 20.0])))
    assert out.shape == (2, 8, 8)
    np.testing.assert_allclose(out[1], _scipy_rotate(x[1], 20.0), atol=2e-5)
    with pytest.raises(ValueError, match="one angle per image"):
        rotate(x, np.array([1.0]))


def test_random_rotation_jitted_deterministic_and_in_range():
    x = np.random.default_rng(3).random((64, 8, 8, 3)).astype(np.float32)
    f = jax.jit(random_rotation, static_argnames="max_degrees")
    k = jax.random.key(0)
    a, b = f(k, x), f(k, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(f(jax.random.key(1), x)), np.asarray(a))
    # The angles it used are those of jax.random.uniform on the same key: rebuild and compare.
    angles = np.asarray(jax.random.uniform(k, (64,), jnp.float32, -45.0, 45.0))
    assert np.abs(angles).max() <= 45.0 and angles.std() > 15.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(rotate(x, angles)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(f(k, x, max_degrees=0.0)), x, atol=1e-6)
