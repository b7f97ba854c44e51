"""Arrays for learning: window, crop, resize, model input, stack arrays, patient folds, oversampling."""

import jax
import numpy as np
import pytest
from PIL import Image

from stackcls.preprocess.arrays import (center_crop, fold_units, oversample, patient_folds, resize, split_subjects,
                                 stack_arrays, to_model_input, window)
from stackcls.preprocess.arrays import grey_model_input
from stackcls.stack import Stack


def test_window_matches_percentiles_per_slice():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(100, 20, (20, 30)), rng.exponential(5.0, (20, 30)) * 1000]).astype(np.float32)
    out = window(x)
    assert out.shape == x.shape and out.dtype == np.float32
    for s in range(2):
        lo, hi = np.percentile(x[s], [2, 98])
        ref = np.clip((x[s] - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(out[s], ref, atol=1e-5)
        # ~2 % of pixels at each end saturate
        assert 0.01 < (out[s] == 0).mean() < 0.04 and 0.01 < (out[s] == 1).mean() < 0.04


def test_window_degenerate_slices():
    const = np.full((1, 8, 8), 7.0, np.float32)
    np.testing.assert_array_equal(window(const), 0.0)
    sparse = np.zeros((1, 10, 10), np.float32)
    sparse[0, 5, 5] = 3.0  # 2nd and 98th percentiles both 0: falls back to min..max
    out = window(sparse)
    assert out[0, 5, 5] == 1.0 and out.sum() == 1.0 and np.isfinite(out).all()
    assert window(np.zeros((4, 4))).shape == (4, 4)  # a single 2-D slice
    with pytest.raises(ValueError, match="NaN"):
        window(np.array([[[np.nan, 1.0]]]))
    with pytest.raises(ValueError, match="lo < hi"):
        window(const, lo=50, hi=10)


def test_center_crop():
    x = np.arange(2 * 10 * 20).reshape(2, 10, 20)
    c = center_crop(x, 0.6)
    assert c.shape == (2, 6, 12)
    np.testing.assert_array_equal(c, x[:, 2:8, 4:16])
    assert center_crop(x, 1.0) is x
    assert center_crop(np.zeros((5, 5)), 0.6).shape == (3, 3)
    with pytest.raises(ValueError):
        center_crop(x, 0.0)


@pytest.mark.parametrize("shape,size", [((3, 40, 52), 16), ((2, 10, 12), 25), ((1, 33, 33), (20, 7))])
def test_resize_matches_jax_antialiased_bilinear(shape, size):
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    out = resize(x, size)
    hw = (size, size) if isinstance(size, int) else size
    ref = jax.image.resize(x, (shape[0],) + hw, method="linear", antialias=True)
    assert out.shape == (shape[0],) + hw and out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(ref), atol=1e-5)


def test_resize_against_pillow_and_constants():
    # Pillow's BILINEAR also widens its triangle filter when shrinking: an independent reference.
    x = (np.random.default_rng(2).random((64, 48)) * 255).astype(np.float32)
    ours = resize(x, (24, 32))
    pil = np.asarray(Image.fromarray(x, mode="F").resize((32, 24), Image.BILINEAR))
    assert np.abs(ours - pil).mean() < 0.5  # Pillow differs only in its edge handling
    np.testing.assert_allclose(resize(np.full((2, 13, 17), 3.5), 224), 3.5, rtol=1e-6)
    np.testing.assert_array_equal(resize(x, (64, 48)), x)


def test_to_model_input():
    rng = np.random.default_rng(3)
    x = rng.random((4, 50, 60)).astype(np.float32) * 1000
    out = to_model_input(x, 32)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255 and out.max() > 200
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    ref = resize(center_crop(window(x), 0.6), 32) * 255
    np.testing.assert_allclose(out[..., 1], ref, atol=1e-3)
    # the crop really removes the border: a bright frame outside the central 60 % never shows
    y = np.zeros((1, 100, 100), np.float32)
    y[:, 30:70, 30:70] = rng.random((40, 40))
    y[:, :15, :] = 1e6
    assert to_model_input(y, 30, keep=1.0)[0, 0, 0, 0] == 255.0
    assert to_model_input(y, 30)[0, 0, 0, 0] < 255.0


def _stack(subject, phase, n, labels=True):
    rng = np.random.default_rng(n)
    lab = (["OAP"] + ["IN"] * (n - 2) + ["OBS"]) if labels else None
    return Stack(images=rng.random((n, 20, 24)), sources=[str(i) for i in range(n)],
                 subject=subject, phase=phase, labels=lab)


def test_stack_arrays():
    stacks = [_stack("p1", "ED", 4), _stack("p1", "ES", 3), _stack("p2", "ED", 5, labels=False)]
    d = stack_arrays(stacks, 16, keep=0.8)
    assert d["x"].shape == (12, 16, 16, 3) and d["x"].dtype == np.float32
    np.testing.assert_array_equal(d["y"], [0, 1, 1, 2, 0, 1, 2, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(d["stack_index"], [0] * 4 + [1] * 3 + [2] * 5)
    np.testing.assert_array_equal(d["slice_index"], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4])
    assert list(d["subject"]) == ["p1"] * 7 + ["p2"] * 5
    np.testing.assert_allclose(d["x"][4:7], to_model_input(stacks[1].images, 16, 0.8))
    with pytest.raises(ValueError, match="no stacks"):
        stack_arrays([], 16)


def test_patient_folds_group_and_cover():
    subj = np.repeat([f"s{i:02d}" for i in range(13)], 2 * 3)[::-1]  # items shuffled-ish
    folds = patient_folds(subj, k=5, seed=0)
    assert len(folds) == 5
    val_all = np.concatenate([v for _, v in folds])
    np.testing.assert_array_equal(np.sort(val_all), np.arange(len(subj)))  # each item validated once
    for tr, va in folds:
        assert set(subj[tr]).isdisjoint(subj[va])
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(subj)))
        assert len(set(subj[va])) in (2, 3)  # near-equal subject counts
    # deterministic; independent of item order; seed changes it
    again = patient_folds(list(subj), k=5, seed=0)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    perm = np.random.default_rng(0).permutation(len(subj))
    shuffled = patient_folds(subj[perm], k=5, seed=0)
    for (_, va), (_, vb) in zip(folds, shuffled):
        assert set(subj[va]) == set(subj[perm][vb])
    other = patient_folds(subj, k=5, seed=1)
    assert any(set(subj[a[1]]) != set(subj[b[1]]) for a, b in zip(folds, other))
    with pytest.raises(ValueError, match="3 subjects cannot fill 5 folds"):
        patient_folds(["a", "b", "c", "a"], k=5)


def test_fold_units_leave_one_group_out():
    """fold_by=group: patient_folds over the group ids with as many folds as groups holds each
    group out once, whole; subject units are the patient folds; a stack without the key is named."""
    groups = ["DCM", "HCM", "MINF", "NOR", "RV"]
    stacks = [Stack(np.zeros((3, 4, 4), np.float32), ["a", "b", "c"], f"p{i:03d}", phase,
                    meta={"group": groups[i % 5]}) for i in range(20) for phase in ("ED", "ES")]
    units = fold_units(stacks, "group")
    held = [sorted({str(u) for u in units[va]}) for _, va in patient_folds(units, k=5, seed=0)]
    assert sorted(h[0] for h in held) == groups and all(len(h) == 1 for h in held)
    for _, va in patient_folds(units, k=5, seed=0):
        assert len(va) == 8                                   # all 4 patients x 2 stacks of it
    subj = fold_units(stacks, "subject")
    assert [str(u) for u in subj] == [st.subject for st in stacks]
    stacks[7].meta.pop("group")
    with pytest.raises(ValueError, match="fold_by='group': 1 stack.*p003"):
        fold_units(stacks, "group")


def test_split_subjects():
    subj = np.repeat([f"s{i}" for i in range(10)], 2)
    tr, te = split_subjects(subj, test_size=0.3, seed=0)
    assert len(set(subj[te])) == 3 and len(set(subj[tr])) == 7
    assert set(subj[tr]).isdisjoint(subj[te]) and len(tr) + len(te) == 20
    tr2, te2 = split_subjects(subj, test_size=3, seed=0)
    np.testing.assert_array_equal(te, te2)
    with pytest.raises(ValueError, match="each side"):
        split_subjects(subj, test_size=10)
    with pytest.raises(ValueError):
        split_subjects(subj, test_size=1.5)


def test_oversample():
    y = np.array([0, 1, 1, 2, 1, -1])
    idx = oversample(y, factor=6, seed=0)
    counts = np.bincount(idx, minlength=len(y))
    np.testing.assert_array_equal(counts, [6, 1, 1, 6, 1, 1])
    np.testing.assert_array_equal(np.bincount(y[idx] + 1), [1, 6, 3, 6])
    np.testing.assert_array_equal(idx, oversample(y, factor=6, seed=0))
    assert not np.array_equal(idx, oversample(y, factor=6, seed=1))
    np.testing.assert_array_equal(np.sort(oversample(y, factor=1)), np.arange(6))
    with pytest.raises(ValueError):
        oversample(y, factor=0)


def test_grey_model_input_is_each_rgb_channel():
    x = np.random.default_rng(1).gamma(2.0, 100.0, (3, 40, 30)).astype(np.float32)
    rgb = to_model_input(x, 24)
    g = grey_model_input(x, 24)
    assert g.shape == (3, 24, 24) and g.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], g)
