"""The training engine on tiny real models (mobilenet at 32 px, cbr_tiny): what each stage trains,
vmapped = sequential, and the step / validation driven by lax.scan or from Python agree."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from flax import nnx  # noqa: E402

from stackcls.models import backbones  # noqa: E402
from stackcls.train.engine import Job, Pool, Trainer, _EpochFns, job_key, split  # noqa: E402
from stackcls.models.apply import extract, predict_outputs  # noqa: E402
from stackcls.models.classifier import build_classifier  # noqa: E402
from stackcls.preprocess.arrays import patient_folds  # noqa: E402
from stackcls.train.sweep import final_job, fold_jobs  # noqa: E402


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


def test_job_key_depends_on_name_and_seed_only():
    a = job_key(0, "d0/lr0.01/fold1")
    assert np.array_equal(a, job_key(0, "d0/lr0.01/fold1"))
    assert not np.array_equal(a, job_key(1, "d0/lr0.01/fold1"))
    assert not np.array_equal(a, job_key(0, "d0/lr0.01/fold2"))


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


def test_scanned_and_python_driven_epochs_agree(mobilenet_small):
    """One step and one validation, two drivers: lax.scan (accelerators, the head-only stage) and
    a Python loop (convolutions on CPU) give the same epoch, also for a job shorter than the
    padded shape (the scan skips its extra steps)."""
    x, y, _ = toy_data(30)
    model = mobilenet_small
    pool = Pool("carry", extract(model, x, "carry", views=1), extract(model, x, "carry"), y)
    tr = Trainer(model, pool, batch_size=8, eval_chunk=8)
    job = Job("j", 0.05, np.arange(20, dtype=np.int32), np.arange(20, 30, dtype=np.int32))
    M, Kp = 29, 16                                     # padding: 4 batches in the scan, 3 real
    data = jax.tree.map(jnp.asarray, tr._job_data(job, M, Kp))
    shared = dict(views=tr.views, clean=tr.clean, y=tr.y, frozen=tr.frozen, rest=tr.rest, stats=tr.stats)
    key = job_key(0, "j")
    fns = _EpochFns(tr, n_batches=4)
    outs = []
    for epoch in (jax.jit(fns.scanned(True)), fns.host(True)):
        state = dict(trainable=jax.tree.map(jnp.copy, tr.init_trainable), opt=tr.tx.init(tr.init_trainable),
                     stats=nnx.State({}),
                     step=jnp.zeros((), jnp.int32))
        state, out = epoch(state, data, shared, key)
        outs.append((int(state["step"]), jax.device_get(out)))
    (s_scan, a), (s_host, b) = outs
    assert s_scan == s_host == 3
    for k in ("train_loss", "val_loss", "val_acc"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["val_probs"], b["val_probs"], atol=1e-5)


def test_scratch_cbr_trains_everything_with_batch_statistics():
    x, y, _ = toy_data(48, size=32)
    bb = backbones.create("cbr_tiny", weights=None, input_size=backbones.spec("cbr_tiny").min_size)
    size = bb.input_size
    x = np.asarray(jax.image.resize(x, (len(x), size, size, 3), "linear"))
    model = build_classifier(bb, size, seed=0)
    tr = Trainer(model, Pool("image", x[:, None], x, y, rotate_deg=45.0))
    r = tr.run([final_job("t", 1e-2, y, 1, 0)], 3, keep_state=True)[0]
    assert r.train_loss[-1] < r.train_loss[0]
    assert np.isnan(r.val_loss).all() and r.val_probs is None
    m = tr.apply(model, r)
    # BN statistics were updated in training mode
    s0 = jax.tree.leaves(split(model, "image")[3])
    s1 = jax.tree.leaves(split(m, "image")[3])
    assert any(not np.allclose(a, b) for a, b in zip(s0, s1))


def test_clear_errors(mobilenet_small):
    x, y, _ = toy_data(6)
    with pytest.raises(ValueError, match="unknown stage"):
        split(mobilenet_small, "pixels")
    tr = Trainer(mobilenet_small, Pool("features", np.zeros((6, 1, 256), np.float32),
                                       np.zeros((6, 256), np.float32), y))
    with pytest.raises(ValueError, match="no training samples"):
        tr.run([Job("empty", 0.1, np.zeros(0, np.int32), np.zeros(0, np.int32))], 1)
