"""Training loop, selection, checkpoints and Grad-CAM on tiny real models (cbr_tiny, mobilenet)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from stackcls import backbones  # noqa: E402
from stackcls.models import build_classifier  # noqa: E402
from stackcls.preprocess import patient_folds  # noqa: E402
from stackcls.train import (Pool, Trainer, extract, final_job, fold_jobs, predict_outputs,  # noqa: E402
                            select, split)


def toy_data(n=60, size=32, seed=0):
    """Three classes that differ in brightness and a bright disc: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)
    x = rng.random((n, size, size)).astype(np.float32) * 40 + 50 * y[:, None, None] + 80 * disc * (y == 1)[:, None, None]
    x = np.repeat(np.clip(x, 0, 255)[..., None], 3, -1)
    return x.astype(np.float32), y.astype(np.int32), np.arange(n) // 6


def _paths(state):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]


@pytest.fixture(scope="module")
def mobilenet_small():
    bb = backbones.create("mobilenet", weights=None, input_size=32)
    return build_classifier(bb, 32, seed=0)


def test_select_best_mean_accuracy_ties_to_fewer_epochs():
    curves = {1e-2: np.array([[0.5, 0.8, 0.8], [0.7, 0.8, 0.9]]),   # mean .6 .8 .85
              1e-3: np.array([[0.9, 0.8, 0.85], [0.8, 0.9, 0.85]])}  # mean .85 .85 .85
    assert select(curves) == (1e-3, 1)
    losses = {1e-2: np.ones((2, 3)), 1e-3: np.ones((2, 3))}
    assert select({1e-2: curves[1e-2]}, losses) == (1e-2, 3)
    # a tie in accuracy and epochs goes to the lower validation loss
    c = {1e-2: np.array([[0.5]]), 1e-3: np.array([[0.5]])}
    assert select(c, {1e-2: np.array([[0.9]]), 1e-3: np.array([[0.4]])}) == (1e-3, 1)


def test_depth0_loss_falls_and_vmap_equals_sequential(mobilenet_small):
    x, y, subj = toy_data()
    model = mobilenet_small
    views = extract(model, x, "features", views=2, seed=0)
    clean = extract(model, x, "features")
    assert views.shape == (60, 2, clean.shape[1])
    pool = Pool("features", views, clean, y)
    folds = patient_folds(subj, k=3, seed=0)
    jobs = fold_jobs("t", [1e-1, 1e-2], folds, y, 6, 0)
    tr = Trainer(model, pool)
    res = tr.run(jobs, 6, vmapped=True)
    assert res[0].train_loss[-1] < res[0].train_loss[0]
    assert res[0].val_probs.shape == (6, len(folds[0][1]), 3)
    np.testing.assert_allclose(res[0].val_probs.sum(-1), 1, atol=1e-5)
    seq = tr.run(jobs[:2], 6, vmapped=False, _shape=(max(len(j.items) for j in jobs),
                                                     max(len(j.val) for j in jobs)))
    for a, b in zip(seq, res[:2]):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4)
        np.testing.assert_allclose(a.val_acc, b.val_acc)
    # the backbone did not move: only head parameters are trainable at depth 0
    _, trainable, frozen, _, _ = split(model, "features")
    assert all("head" in p for p in _paths(trainable))


def test_depth1_trains_last_block_only(mobilenet_small):
    x, y, subj = toy_data(36)
    model = mobilenet_small
    pool = Pool("carry", extract(model, x, "carry", views=1), extract(model, x, "carry"), y)
    tr = Trainer(model, pool)
    r = tr.run([final_job("t", 1e-2, y, 1, 0)], 2, keep_state=True)[0]
    m1 = tr.apply(model, r)
    paths = _paths(r.trainable)
    assert any("block_last" in p for p in paths) and any("head" in p for p in paths)
    assert not any("block_last" not in p and "head" not in p for p in paths)
    # trunk weights unchanged, last block changed
    before = dict(jax.tree_util.tree_leaves_with_path(split(model, "carry")[2]))
    after = dict(jax.tree_util.tree_leaves_with_path(split(m1, "carry")[2]))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    lo_img, _ = predict_outputs(m1, x[:8], "image")
    lo_carry, _ = predict_outputs(m1, jax.tree.map(lambda a: a[:8], pool.clean), "carry")
    np.testing.assert_allclose(lo_img, lo_carry, rtol=1e-4, atol=1e-4)


def test_scratch_cbr_loss_falls_and_checkpoint_restores(tmp_path):
    from stackcls.checkpoint import load_model, restore_model, save_model

    x, y, _ = toy_data(48, size=32)
    bb = backbones.create("cbr_tiny", weights=None, input_size=backbones.spec("cbr_tiny").min_size)
    size = bb.input_size
    x = np.asarray(jax.image.resize(x, (len(x), size, size, 3), "linear"))
    model = build_classifier(bb, size, seed=0)
    tr = Trainer(model, Pool("image", x[:, None], x, y, rotate_deg=45.0))
    r = tr.run([final_job("t", 1e-2, y, 1, 0)], 3, keep_state=True)[0]
    assert r.train_loss[-1] < r.train_loss[0]
    m = tr.apply(model, r)
    # BN statistics were updated in training mode
    s0 = jax.tree.leaves(split(model, "image")[3])
    s1 = jax.tree.leaves(split(m, "image")[3])
    assert any(not np.allclose(a, b) for a, b in zip(s0, s1))
    save_model(tmp_path / "final", m, dict(backbone="cbr_tiny", input_size=size, keep=0.6))
    m2, cfg = restore_model(tmp_path / "final")
    a, _ = predict_outputs(m, x[:10], "image")
    b, _ = predict_outputs(m2, x[:10], "image")
    np.testing.assert_array_equal(a, b)
    tm = load_model(tmp_path / "final")
    pen, probs = tm.slice_outputs(x[:10])
    np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(jnp.asarray(a))), rtol=1e-5, atol=1e-6)
    assert pen.shape == (10, 256)


def test_gradcam_matches_pooled_gradient_reference():
    """With GAP before the head, d score / d A[h, w, c] = (d score / d f_c) / (h w): Grad-CAM must
    equal ReLU(sum_c g_c A_c) (then upsampled and scaled to [0, 1]), g taken w.r.t. the pooled
    features, an independent route to the same map."""
    from stackcls.explain import gradcam, tsne
    from stackcls.models import gap

    bb = backbones.create("cbr_tiny", weights=None, input_size=backbones.spec("cbr_tiny").min_size)
    size = bb.input_size
    model = build_classifier(bb, size, seed=0)
    x = np.random.default_rng(0).random((3, size, size, 3)).astype(np.float32) * 255
    cls = np.array([0, 1, 2])
    cams = gradcam(model, x, classes=cls)
    assert cams.shape == (3, size, size)
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    A = model.feature_map(jnp.asarray(x))
    for i in range(3):
        g = jax.grad(lambda f: model.head(f[None])[0, cls[i]])(gap(A[i:i + 1])[0])
        ref = jax.nn.relu((A[i] * g).sum(-1))
        ref = jax.image.resize(ref, (size, size), "linear")
        ref = np.asarray(ref / ref.max()) if float(ref.max()) > 0 else np.zeros((size, size))
        np.testing.assert_allclose(cams[i], ref, atol=1e-4)
    e = tsne(np.random.default_rng(0).random((20, 5)))
    assert e.shape == (20, 2)
