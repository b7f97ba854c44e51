"""method=anatomy (stackcls.models.anatomy and its study stage): the encoder's feature pyramid, the slice
evidence read off hand-made probability maps, the augmentation's geometry against scipy, a tiny
training run, saving and restoring the ensemble, predict_stack with physical spacing, and the
study end to end on the built-in cohort (slow)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from stackcls.models import backbones
from stackcls.models import anatomy
from stackcls.train import anatomy as anatomy_training
from stackcls.models.anatomy import (EVIDENCE, N_MASK, AnatomyConfig, AnatomyModel, AnatomyNet, Ensemble,
                              build_net, model_inputs)
from stackcls.train.checkpoint import ModelFileError, restore_anatomy_model, save_anatomy_model
from stackcls.preprocess.physical import SPACING_MM
from stackcls.study.config import as_plain

SMALL = AnatomyConfig(size=64, canvas=96, widths=(8, 8, 8, 8), epochs=2, batch_size=4)
TRAIN = dataclasses.replace(SMALL, epochs=4)    # 16 steps of 4 slices
EV = {name: i for i, name in enumerate(EVIDENCE)}


# ----------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("size", [64, 128])
def test_mobilenet_pyramid_strides_and_channels(size):
    bb = backbones.create("mobilenet", weights=None)
    shapes = jax.eval_shape(lambda: bb.pyramid(jnp.zeros((2, size, size, 3))))
    # MobileNet v1 at alpha 0.25: 64, 128, 256, 512, 1024 channels x 0.25 at strides 2 ... 32
    assert [s.shape for s in shapes] == [(2, size // st, size // st, ch) for st, ch in
                                         zip((2, 4, 8, 16, 32), (16, 32, 64, 128, 256))]


def test_anatomy_net_wants_a_pyramid():
    with pytest.raises(ValueError, match="feature pyramid.*object"):
        AnatomyNet(object(), SMALL, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- evidence

N = 96
RR, CC = np.mgrid[:N, :N].astype(np.float64)


def disk(r0, c0, radius):
    return (np.hypot(RR - r0, CC - c0) <= radius).astype(np.float32)


def annulus(r0, c0, inner, outer):
    d = np.hypot(RR - r0, CC - c0)
    return ((d >= inner) & (d <= outer)).astype(np.float32)


def prob_map(cavity=None, myocardium=None, rv=None):
    p = np.zeros((N, N, N_MASK), np.float32)
    for k, m in ((1, rv), (2, myocardium), (3, cavity)):
        if m is not None:
            p[..., k] = m
    p[..., 0] = 1.0 - p[..., 1:].sum(-1)
    assert p.min() >= 0
    return p


def evidence_of(*maps):
    return np.asarray(anatomy.evidence(jnp.asarray(np.stack(maps))))


def brute_border_enclosed(cav, myo) -> float:
    """The basal rule on hard masks, pixel by pixel: border = cavity pixels with a non-cavity
    pixel among their 8 neighbours (inside the image); the share of them with myocardium there."""
    n, border, enclosed = cav.shape[0], 0, 0
    for r, c in zip(*np.nonzero(cav)):
        nb = [(r + a, c + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if 0 <= r + a < n and 0 <= c + b < n]
        if min(cav[q] for q in nb) == 0:
            border += 1
            enclosed += max(myo[q] for q in nb) > 0
    return enclosed / border if border else 0.0


def test_border_enclosed_is_the_basal_rule_by_brute_force():
    from stackcls.models.evidence import border_enclosed
    cav = disk(48, 48, 12)
    ring = disk(48, 48, 18) * (1 - cav)            # myocardium all round, touching the cavity
    half = ring * (CC >= 48)                        # myocardium on one side: an opened base
    rng = np.random.default_rng(0)
    blobs = [(disk(*rng.integers(30, 66, 2), rng.integers(4, 15)),
              annulus(*rng.integers(30, 66, 2), 10, 20) * (rng.random((N, N)) < 0.7)) for _ in range(4)]
    cases = [(cav, ring), (cav, half), (cav, np.zeros_like(cav)), (np.zeros_like(cav), ring)]
    cases += [(c, m * (1 - c)) for c, m in blobs]
    got = np.asarray(border_enclosed(jnp.asarray(np.stack(
        [prob_map(cavity=c, myocardium=m) for c, m in cases]))))
    want = [brute_border_enclosed(c, m) for c, m in cases]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0] == 1.0 and 0.4 < got[1] < 0.65 and got[2] == 0.0 and got[3] == 0.0


def test_evidence_areas_in_square_centimetres():
    ev = evidence_of(prob_map(cavity=disk(48, 48, 12)), prob_map(rv=disk(30, 30, 6)),
                     prob_map(myocardium=annulus(48, 48, 13, 18)), prob_map())
    px_cm2 = (SPACING_MM / 10) ** 2                              # 0.0225 cm^2 per pixel
    # pi r^2 pixels, give or take a pixel of radius along the edge
    for row, col, radius in ((0, "lv_cavity_area", 12), (1, "rv_cavity_area", 6)):
        lo, hi = math.pi * (radius - 0.5) ** 2 * px_cm2, math.pi * (radius + 0.5) ** 2 * px_cm2
        assert math.log1p(lo) < ev[row, EV[col]] < math.log1p(hi)
    ring = math.pi * (18.5 ** 2 - 12.5 ** 2) * px_cm2, math.pi * (17.5 ** 2 - 13.5 ** 2) * px_cm2
    assert math.log1p(ring[1]) < ev[2, EV["lv_myocardium_area"]] < math.log1p(ring[0])
    # a 12-pixel disk is 10.2 cm^2: log1p gives 2.41 (hand-computed), the cavity's own columns only
    assert ev[0, EV["lv_cavity_area"]] == pytest.approx(math.log1p(math.pi * 144 * px_cm2), abs=0.03)
    assert ev[0, EV["lv_myocardium_area"]] == 0 and ev[0, EV["rv_cavity_area"]] == 0
    assert ev[0, EV["lv_cavity_peak"]] == pytest.approx(1.0)
    np.testing.assert_allclose(ev[3], 0, atol=1e-6)             # nothing seen: all zero


def test_evidence_ring_closure_and_cavity_inside_ring():
    cav = disk(48, 48, 12)
    ring = annulus(48, 48, 13, 18)
    ev = evidence_of(prob_map(cav, ring),                       # a cut through the ventricle
                     prob_map(cav, ring * (CC > 48)),           # half the ring: a crescent
                     prob_map(disk(48, 75, 10), annulus(48, 35, 8, 13)),   # cavity beside the ring
                     prob_map(disk(48, 70, 10), annulus(48, 40, 13, 18) * (CC < 40)))
    closure, inside = ev[:, EV["ring_closure"]], ev[:, EV["cavity_inside_ring"]]
    assert closure[0] >= 0.95                                   # 16 of 16 sectors
    assert 0.4 <= closure[1] <= 0.6                             # 8 of 16, a sector either way
    assert closure[2] <= 0.5 and closure[3] <= 0.5
    assert inside[0] >= 0.95
    assert inside[2] <= 0.1 and inside[3] <= 0.1                # the outflow tract / atrium case
    assert inside[1] > inside[3] + 0.2                          # half enclosed beats beside


# ----------------------------------------------------------------------------- augmentation

def test_warp_equals_scipy_bilinear():
    rng = np.random.default_rng(0)
    img = rng.random((20, 24, 3)).astype(np.float32)
    # inside, on the edges and beyond them (outside: 0, blended in as scipy's grid-constant does)
    coords = np.stack([rng.uniform(-2, 22, (15, 17)), rng.uniform(-2, 26, (15, 17))]).astype(np.float32)
    got = np.asarray(anatomy_training._warp(jnp.asarray(img), jnp.asarray(coords)))
    want = np.stack([ndimage.map_coordinates(img[..., k], coords, order=1, mode="grid-constant",
                                             cval=0.0, prefilter=False) for k in range(3)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_augment_without_geometry_is_the_centre_crop(monkeypatch):
    rng = np.random.default_rng(1)
    C, cfg = 48, AnatomyConfig(size=32, canvas=48, rotation=0.0, scale=0.0, shift_mm=0.0)
    canvas = rng.uniform(0, 255, (C, C)).astype(np.float32)
    masks = rng.integers(0, N_MASK, (C, C))
    onehot = jax.nn.one_hot(masks, N_MASK)
    monkeypatch.setattr(jax.random, "bernoulli", lambda key, *a, **k: jnp.bool_(False))
    x, target = anatomy_training.augment(jax.random.PRNGKey(3), jnp.asarray(canvas), onehot, cfg)
    crop = anatomy.centre_crop(canvas[None], 32)[0]
    np.testing.assert_array_equal(np.asarray(target).argmax(-1),
                                  anatomy.centre_crop(masks[None], 32)[0])
    np.testing.assert_allclose(np.asarray(target).sum(-1), 1.0, atol=1e-6)
    x = np.asarray(x)
    assert x.shape == (32, 32, 3) and np.array_equal(x[..., 0], x[..., 2])
    # the intensity is the crop under one random gamma: x/255 = (crop/255)^g for every pixel
    ok = (crop > 5) & (crop < 250)
    g = np.log(x[..., 0][ok] / 255) / np.log(crop[ok] / 255)
    assert np.ptp(g) < 1e-3 and math.exp(-0.35) <= g.mean() <= math.exp(0.35)


def test_with_context_by_hand():
    x = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), np.float32)   # slice k = k
    np.testing.assert_array_equal(anatomy.with_context(x, 0)[:, 0, 0], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    # the two neighbours, brighter first; each end stands in for its missing neighbour
    np.testing.assert_array_equal(anatomy.with_context(x, 1)[:, 0, 0], [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    np.testing.assert_array_equal(anatomy.with_context(x[:1], 1)[:, 0, 0], [[0, 0, 0]])
    # a stack and its reverse give each slice the same input, whatever its pattern
    r = np.random.default_rng(0).random((5, 4, 4)).astype(np.float32)
    for s in (x, r):
        np.testing.assert_array_equal(anatomy.with_context(s[::-1], 1)[::-1], anatomy.with_context(s, 1))
    np.testing.assert_array_equal(np.sort(anatomy.with_context(r, 1)[1:-1, ..., ::2], -1),
                                  np.sort(np.stack([r[:-2], r[2:]], -1), -1))
    with pytest.raises(ValueError, match="context"):
        AnatomyConfig(context=2)


def test_end_slices_and_weighted_epochs():
    si = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(anatomy_training.end_slices(si, 1), [1, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(anatomy_training.end_slices(si, 2), [1, 1, 0, 1, 1, 1, 1, 1])
    rng = np.random.default_rng(0)
    # unweighted: every slice once per epoch (a second permutation tops up the last batch)
    np.testing.assert_array_equal(np.sort(anatomy_training._epoch_order(rng, 5, 5, None)), np.arange(5))
    # weight 3 on slice 0: it fills 3 of 7 pool places, the epoch has the asked size
    counts = np.zeros(5)
    for _ in range(2000):
        counts += np.bincount(anatomy_training._epoch_order(rng, 5, 5, np.array([3.0, 1, 1, 1, 1])), minlength=5)
    np.testing.assert_allclose(counts / counts.sum(), [3 / 7] + [1 / 7] * 4, atol=0.01)
    # the same default-config draw as before the weights existed
    a = anatomy_training._epoch_order(np.random.default_rng(4), 7, 8, None)
    r = np.random.default_rng(4)
    np.testing.assert_array_equal(a, np.concatenate([r.permutation(7), r.permutation(7)])[:8])


def test_augment_swaps_neighbours_half_the_time():
    # no geometry: the sample is the centre crop, its neighbour channels in either order
    C, cfg = 40, AnatomyConfig(size=32, canvas=40, rotation=0.0, scale=0.0, shift_mm=0.0)
    canvas = np.stack([np.full((C, C), v, np.float32) for v in (50.0, 128.0, 200.0)], -1)
    onehot = jax.nn.one_hot(np.zeros((C, C), int), N_MASK)
    fn = jax.jit(jax.vmap(lambda k: anatomy_training.augment(k, jnp.asarray(canvas), onehot, cfg)[0]))
    x = np.asarray(fn(jax.random.split(jax.random.PRNGKey(0), 64)))[:, 16, 16]   # (64, 3)
    first_low = x[:, 0] < x[:, 2]
    assert np.all(x[:, 1] > np.minimum(x[:, 0], x[:, 2])) and np.all(x[:, 1] < np.maximum(x[:, 0], x[:, 2]))
    assert 16 <= first_low.sum() <= 48


def test_augmented_targets_stay_distributions():
    rng = np.random.default_rng(2)
    C, cfg = 48, AnatomyConfig(size=32, canvas=48, shift_mm=24.0, rotation=45.0, scale=0.1)
    canvas = jnp.asarray(rng.uniform(0, 255, (C, C)), jnp.float32)
    onehot = jax.nn.one_hot(rng.integers(0, N_MASK, (C, C)), N_MASK)
    fn = jax.jit(jax.vmap(lambda k: anatomy_training.augment(k, canvas, onehot, cfg)))
    x, t = fn(jax.random.split(jax.random.PRNGKey(0), 16))
    t = np.asarray(t)
    assert t.min() >= -1e-6 and np.allclose(t.sum(-1), 1.0, atol=1e-5)
    # large shifts take pixels from beyond the canvas: those are background, not nothing
    assert (t[..., 0] > 0.999).any()
    assert 0 <= float(x.min()) and float(x.max()) <= 255


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, field", [(dict(size=48), "size"), (dict(size=16), "size"),
                                       (dict(canvas=100), "canvas"), (dict(widths=(8, 8, 8)), "widths"),
                                       (dict(widths=(8, 0, 8, 8)), "widths"), (dict(epochs=0), "epochs"),
                                       (dict(learning_rate=0.0), "learning_rate"),
                                       (dict(batch_size=0), "batch_size"),
                                       (dict(class_weight="inverse"), "class_weight")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"anatomy config: .*{field}="):
        AnatomyConfig(**dict(dict(size=128, canvas=128), **kw))


def test_config_errors_are_listed_together():
    with pytest.raises(ValueError) as e:
        AnatomyConfig(size=40, epochs=0, class_weight="x")
    assert all(f"{k}=" in str(e.value) for k in ("size", "epochs", "class_weight"))
    assert AnatomyConfig(widths=[4, 5, 6, 7]).widths == (4, 5, 6, 7)   # lists from JSON: a tuple


# ----------------------------------------------------------------------------- training

def toy_data(n=12, C=96, seed=0):
    """Canvases with a bright LV cavity, a grey myocardial ring and a dim RV, and their masks."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:C, :C]
    canvas = rng.normal(40, 10, (n, C, C)).astype(np.float32)
    masks = np.zeros((n, C, C), np.uint8)
    for i in range(n):
        r0, c0, rad = rng.uniform(40, 56), rng.uniform(40, 56), rng.uniform(6, 14)
        d = np.hypot(rr - r0, cc - c0)
        masks[i][np.hypot(rr - r0, cc - c0 + 2 * rad + 6) < rad] = 1
        masks[i][(d >= rad) & (d < rad + 4)] = 2
        masks[i][d < rad] = 3
    canvas += np.array([0, 60, 90, 180], np.float32)[masks]
    y = np.array([0, 1, 1, 2] * (n // 4), np.int32)
    return dict(canvas=np.clip(canvas, 0, 255), masks=masks, has_mask=np.arange(n) != 1, y=y)


@pytest.fixture(scope="module")
def trained():
    net = build_net("mobilenet", SMALL, weights=None, seed=0)
    before = jax.tree.map(np.array, nnx.state(net, nnx.BatchStat))
    evals = []
    hist = anatomy_training.train(net, toy_data(16), TRAIN, seed=0, eval_every=2,
                         on_eval=lambda n, e: evals.append(e))
    return net, hist, before, evals


def test_train_lowers_the_loss(trained):
    _, hist, _, evals = trained
    loss = np.array(hist["loss"])                 # per epoch: total, mask, slice
    assert loss.shape == (4, 3) and np.isfinite(loss).all()
    assert loss[-1, 0] < loss[0, 0] and loss[-1, 1] < loss[0, 1], loss
    assert evals == [2, 4]
    assert hist["seconds"] > 0


def test_precise_bn_leaves_finite_changed_statistics(trained):
    net, _, before, _ = trained
    after = jax.tree.map(np.array, nnx.state(net, nnx.BatchStat))
    leaves_b, leaves_a = jax.tree.leaves(before), jax.tree.leaves(after)
    assert len(leaves_a) == len(leaves_b) > 0
    assert all(np.isfinite(a).all() for a in leaves_a)
    assert sum(not np.allclose(a, b) for a, b in zip(leaves_a, leaves_b)) >= len(leaves_a) // 2
    # the statistics are used at inference: the trained net's outputs are finite
    out = anatomy.outputs(net, anatomy.centre_crop(toy_data(4, seed=5)["canvas"], SMALL.size))
    assert out["probs"].shape == (4, 3) and out["evidence"].shape == (4, len(EVIDENCE))
    assert out["lv"].shape == (4, 64, 64) and all(np.isfinite(v).all() for v in out.values())


def test_class_weights():
    y = np.array([0] * 1 + [1] * 16 + [2] * 4)
    np.testing.assert_allclose(anatomy_training._class_weights(y, "balanced"), [16, 1, 4], rtol=1e-6)
    np.testing.assert_allclose(anatomy_training._class_weights(y, "sqrt"), [4, 1, 2], rtol=1e-6)
    np.testing.assert_array_equal(anatomy_training._class_weights(y, "none"), [1, 1, 1])
    # an absent class gets no weight (never a division by zero)
    np.testing.assert_allclose(anatomy_training._class_weights(np.array([1, 1, 2]), "balanced"), [0, 1, 2])


# ----------------------------------------------------------------------------- saved ensemble

def small_config(cfg=SMALL, **extra):
    return dict(backbone="mobilenet", folds=2, anatomy=as_plain(cfg), localise_size=128,
                method="anatomy", **extra)


@pytest.fixture(scope="module")
def ensemble():
    return Ensemble([build_net("mobilenet", SMALL, seed=s) for s in (0, 1)])


@pytest.fixture(scope="module")
def model(ensemble):
    from stackcls.models.stack_head import StackHead, StackModel
    head = StackModel(StackHead(len(EVIDENCE) + 3, 8, residual=True, rngs=nnx.Rngs(0)),
                      dict(in_features=len(EVIDENCE) + 3))
    return AnatomyModel(ensemble, small_config(evidence=list(EVIDENCE)), stack_head=head)


def test_model_files_read_the_evidence_columns_they_list(model, ensemble):
    # files written before the basal rule list no evidence, or six columns: they get those six,
    # equal to the first six of a newer model's; a column this stackcls lacks is a clear error
    full = model.preprocess(heart_stack(), spacing=(1.5, 1.5, 10.0))
    old = AnatomyModel(ensemble, small_config(), weights=model.weights)
    six = old.preprocess(heart_stack(), spacing=(1.5, 1.5, 10.0))
    assert len(EVIDENCE) == 7 and six.shape == (6, 6 + 3)
    np.testing.assert_allclose(six, np.delete(full, EVIDENCE.index("border_enclosed"), axis=1), atol=1e-6)
    ev, probs = old.slice_outputs(six)
    assert ev.shape == (6, 6) and probs.shape == (6, 3)
    with pytest.raises(ValueError, match=r"evidence \['wall_motion'\].*newer stackcls"):
        AnatomyModel(ensemble, small_config(evidence=["lv_cavity_area", "wall_motion"]))


def test_save_and_restore_give_identical_outputs(ensemble, model, tmp_path):
    from stackcls.predict.load import load_model
    save_anatomy_model(tmp_path / "final", ensemble, small_config())
    ens2, config = restore_anatomy_model(tmp_path / "final")
    assert config == json.loads(json.dumps(small_config()))
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64)).astype(np.float32)
    a = model.run(x)
    b = AnatomyModel(ens2, config).run(x)
    for k in ("probs", "pen", "evidence", "lv"):
        np.testing.assert_array_equal(a[k], b[k])
    # the ensemble is the mean of its members, not one of them
    # (untrained heads give 1/3 everywhere: compare the decoders' LV maps)
    one = anatomy.outputs(ensemble.nets[0], x)["lv"]
    two = anatomy.outputs(ensemble.nets[1], x)["lv"]
    np.testing.assert_allclose(a["lv"], (one + two) / 2, atol=1e-5)
    assert np.abs(one - two).max() > 1e-3
    # a saved folder loads as itself
    loaded = load_model(tmp_path / "final")
    assert isinstance(loaded, AnatomyModel) and loaded.stack_head is None
    np.testing.assert_array_equal(loaded.run(x)["probs"], a["probs"])


def test_saving_needs_the_config(ensemble, tmp_path):
    with pytest.raises(ValueError, match="lacks 'folds'"):
        save_anatomy_model(tmp_path / "m", ensemble, dict(backbone="mobilenet", anatomy={}))


def test_damaged_config_names_the_file(ensemble, tmp_path):
    d = save_anatomy_model(tmp_path / "final", ensemble, small_config())
    f = d / "config.json"
    f.write_text('{"backbone": "mobilenet", "folds": 2, "anat')
    with pytest.raises(ModelFileError, match=f"{f}: not valid JSON"):
        restore_anatomy_model(d)
    f.write_text(json.dumps(dict(small_config(), anatomy=dict(as_plain(SMALL), size=50))))
    with pytest.raises(ModelFileError, match=f"{f}: does not describe an anatomy model.*size=50"):
        restore_anatomy_model(d)
    # the architecture config.json describes differs from the checkpoint's
    f.write_text(json.dumps(small_config(dataclasses.replace(SMALL, widths=(8, 8, 8, 16)))))
    with pytest.raises(ModelFileError, match="state: checkpoint does not restore"):
        restore_anatomy_model(d)
    with pytest.raises(FileNotFoundError, match="not a saved anatomy model"):
        restore_anatomy_model(tmp_path / "nothing")


# ----------------------------------------------------------------------------- prediction

def heart_stack(shape=(6, 100, 120), spacing_mm=1.5):
    """A stack whose bright disk (the 'cavity') sits off the image centre."""
    rr, cc = np.mgrid[:shape[1], :shape[2]]
    disk = (np.hypot(rr - 40, cc - 70) < 20 / spacing_mm).astype(np.float32)
    rng = np.random.default_rng(0)
    return (200 * disk[None] + rng.normal(50, 5, shape)).astype(np.float32)


def test_preprocess_and_slice_outputs(model):
    # preprocess runs the networks (host side of predict_stack): per slice, evidence + probs
    x = model.preprocess(heart_stack(), spacing=(1.5, 1.5, 10.0))
    assert x.shape == (6, len(EVIDENCE) + 3) and x.dtype == np.float32
    ev, probs = model.slice_outputs(jnp.asarray(x))
    assert ev.shape == (6, len(EVIDENCE)) and probs.shape == (6, 3)
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, atol=1e-5)
    # the same as the ensemble's outputs on the model inputs of the stack, located by the first
    # fold's net alone
    xin, _ = model_inputs(heart_stack(), (1.5, 1.5, 10.0), model.cfg, model.localise_size,
                          lambda a: anatomy.outputs(model.ensemble.nets[0], a)["lv"])
    assert xin.shape == (6, 64, 64, 3) and 0 <= xin.min() and xin.max() <= 255
    o = model.run(xin)
    np.testing.assert_allclose(x, np.concatenate([o["evidence"], o["probs"]], 1), rtol=1e-5, atol=1e-5)
    # the physical scale reaches the model: at twice the pixel size the stack covers twice the mm,
    # so the same pixels make a different input
    x2 = model.preprocess(heart_stack(), spacing=(3.0, 3.0, 10.0))
    assert not np.allclose(x, x2)


def test_predict_stack_passes_spacing(model, monkeypatch):
    from stackcls.predict.stack import predict_stack
    seen = []
    real = AnatomyModel.preprocess
    monkeypatch.setattr(AnatomyModel, "preprocess",
                        lambda self, images, spacing=None: seen.append(spacing) or real(self, images, spacing))
    stack = heart_stack()
    for mode in ("stack", "slice_ordered", "slice"):
        pred = predict_stack(stack, model, mode=mode, orientation="unknown", spacing=(1.5, 1.5, 10))
        assert len(pred.labels) == 6 and set(pred.labels) <= {"OAP", "IN", "OBS"}
        assert pred.probabilities.shape == (6, 3) and pred.orientation_source == "data"
        np.testing.assert_allclose(pred.probabilities.sum(1), 1.0, atol=1e-5)
        assert sorted(pred.apex_to_base) == list(range(6))
    assert seen == [(1.5, 1.5, 10.0)] * 3


# ----------------------------------------------------------------------------- the study, end to end

ANATOMY_STUDY = ["method=anatomy", "weights=none", "progress=false",
                 "protocol.synthetic_subjects.train=4", "protocol.synthetic_subjects.test=2",
                 "protocol.folds=2", "protocol.anatomy.epochs=2", "protocol.anatomy.eval_every=1",
                 "protocol.anatomy.size=32", "protocol.anatomy.canvas=48",
                 "protocol.anatomy.widths=[4,4,4,4]", "protocol.anatomy.localise_size=64",
                 "protocol.anatomy.batch_size=8", "protocol.anatomy.stack.epochs=5"]
MODES = ("slice", "slice_ordered", "stack", "stack_orientation_withheld")


def without_timing(o):
    if isinstance(o, dict):
        return {k: without_timing(v) for k, v in o.items() if k not in ("timing", "total_seconds")}
    return o


@pytest.fixture(scope="module")
def anatomy_study(tmp_path_factory):
    from stackcls.study.config import compose
    from stackcls.study.run import run
    mp = pytest.MonkeyPatch()           # the phantom cohort is rendered into a folder of its own
    mp.setenv("STACKCLS_CACHE", str(tmp_path_factory.mktemp("cache")))
    run_dir = tmp_path_factory.mktemp("anatomy_run")
    study = compose(ANATOMY_STUDY + [f"run_dir={run_dir}"])
    try:
        yield study, run_dir, run(study)
    finally:
        mp.undo()


@pytest.mark.slow
def test_study_writes_the_anatomy_rows(anatomy_study):
    _, run_dir, res = anatomy_study
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["method"] == "anatomy" and list(on_disk["depths"]) == ["anatomy"]
    row = on_disk["depths"]["anatomy"]
    assert set(row["test"]) == set(MODES) | {"calibration"}
    assert set(row["test"]["calibration"]) == {"slice_ordered", "stack"}
    assert on_disk["trivial"]["all_in"]["f1"]["OAP"] == 0.0
    assert (run_dir / "calibration.png").is_file() and (run_dir / "anatomy.png").is_file()
    n = on_disk["n_test"]["slices"]
    assert on_disk["n_train"]["with_masks"] == on_disk["n_train"]["stacks"] == 8
    for mode in MODES:
        m = row["test"][mode]
        assert m["n_slices"] == n and sum(map(sum, m["confusion"])) == n
        assert set(m["f1"]) == {"OAP", "IN", "OBS"} and 0 <= m["exact_range_rate"] <= 1
    assert 0 <= row["test"]["stack_orientation_withheld"]["direction_accuracy"] <= 1
    assert row["selected"]["epochs"] in (1, 2) and set(row["selected"]["curve"]) == {"1", "2"}
    for f in (0, 1):
        done = json.loads((run_dir / "anatomy" / "cv" / f"fold{f}" / "done.json").read_text())
        assert len(done["val"]) == len(done["loss"]) == 2
    assert json.loads((run_dir / "anatomy" / "final" / "config.json").read_text())["epoch"] == \
        row["selected"]["epochs"]
    assert "anatomy" in (run_dir / "results.md").read_text()


@pytest.mark.slow
def test_study_model_loads_and_predicts_what_was_measured(anatomy_study):
    from stackcls.predict.load import load_model
    from stackcls.predict.stack import predict_stack
    from stackcls.study.data import load_data
    study, run_dir, _ = anatomy_study
    model = load_model(run_dir)
    assert isinstance(model, AnatomyModel) and model.stack_head is not None
    assert model.direction is not None and len(model.ensemble.nets) == 2
    _, test_stacks = load_data(study)
    z = np.load(run_dir / "anatomy" / "test_outputs.npz")
    st = test_stacks[0]
    g = z["stack_index"] == 0
    # the reloaded ensemble and head reproduce the study's own test outputs for this stack
    pred = predict_stack(st, model, mode="stack")
    assert len(pred.labels) == st.n_slices and pred.orientation_source == "geometry"
    np.testing.assert_allclose(pred.probabilities, z["stack_probs"][g], atol=1e-4)


@pytest.mark.slow
def test_study_rerun_resumes_without_training(anatomy_study, monkeypatch):
    from stackcls.study import anatomy as stage
    from stackcls.study.run import run
    study, run_dir, res = anatomy_study
    done = sorted((run_dir / "anatomy" / "cv").glob("fold*/done.json"))
    stamps = [f.stat().st_mtime_ns for f in done]

    def no_training(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(stage, "train", no_training)
    again = run(study)
    assert without_timing(again) == without_timing(res)
    assert [f.stat().st_mtime_ns for f in done] == stamps and len(done) == 2


@pytest.mark.slow
def test_a_run_saved_before_the_basal_rule_resumes_with_it(anatomy_study, tmp_path, monkeypatch):
    # a copy of the run as stackcls wrote it before border_enclosed: six evidence columns in every
    # fold's outputs and in the final model's config, head stamps without their input width
    import shutil
    from stackcls.study import anatomy as stage
    from stackcls.study.config import compose
    from stackcls.study.run import run
    _, run_dir, res = anatomy_study
    old = tmp_path / "run"
    shutil.copytree(run_dir, old)
    vals = sorted(old.glob("anatomy/cv/fold*/epoch*/val.npz"))
    full = [dict(np.load(v)) for v in vals]
    for v, z in zip(vals, full):
        np.savez(v, **{k: (a[:, :6] if k.startswith("evidence") else a) for k, a in z.items()})
    cfg = old / "anatomy" / "final" / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), evidence=list(EVIDENCE[:6]))))
    for stamp in old.glob("anatomy/**/protocol.json"):
        stamp.write_text(json.dumps({k: v for k, v in json.loads(stamp.read_text()).items() if k != "inputs"}))

    def no_training(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(stage, "train", no_training)
    again = run(compose(ANATOMY_STUDY + [f"run_dir={old}"]))
    # the folds' outputs are computed again with every column, as the run first had them; the
    # final model lists them, and the head trained on them gives the run's own test rows
    for v, z in zip(vals, full):
        np.testing.assert_allclose(np.load(v)["evidence0"], z["evidence0"], atol=1e-5)
    assert json.loads(cfg.read_text())["evidence"] == list(EVIDENCE)
    assert again["depths"]["anatomy"]["test"] == res["depths"]["anatomy"]["test"]


@pytest.mark.slow
def test_epochs_tool_reproduces_the_selected_epochs_test_row(anatomy_study):
    from experiments.epochs import RunConfigMismatch, epoch_rows
    _, run_dir, _ = anatomy_study
    on_disk = json.loads((run_dir / "results.json").read_text())
    row = on_disk["depths"]["anatomy"]
    rows = epoch_rows(run_dir, ANATOMY_STUDY + [f"run_dir={run_dir}"])
    assert [r["epochs"] for r in rows] == [1, 2, "every slice IN"]
    chosen = next(r for r in rows if r["epochs"] == row["selected"]["epochs"])
    # the study's own test evaluation of the ensemble it selected is the reference
    assert chosen["test_exact"] == pytest.approx(row["test"]["slice_ordered"]["exact_range_rate"])
    assert chosen["val_exact"] == pytest.approx(row["selected"]["curve"][str(chosen["epochs"])], abs=1e-4)
    assert rows[-1]["test_exact"] == pytest.approx(on_disk["trivial"]["all_in"]["exact_range_rate"])
    with pytest.raises(RunConfigMismatch):       # another split is not this run's
        epoch_rows(run_dir, ANATOMY_STUDY + ["protocol.synthetic_subjects.test=3", f"run_dir={run_dir}"])
