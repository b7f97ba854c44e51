"""preprocess/beyond.py: real stacks extended past the apex and the base, and the training arrays
that carry those slices (study/anatomy.py, protocol.anatomy.beyond)."""

import numpy as np
import pytest

from stackcls.preprocess.beyond import beyond_slices, erase, extend, extended
from stackcls.stack import Stack


def _slice(rng, centre=(40, 40), lv=True, rv=True):
    """A 96 x 96 body of textured tissue (50-90) on air, an LV (myocardium 20, cavity 200) and an
    RV (cavity 180) at `centre`; mask values as MASK_CLASSES."""
    yy, xx = np.mgrid[:96, :96]
    img = np.zeros((96, 96), np.float32)
    body = (yy - 48) ** 2 + (xx - 48) ** 2 < 46 ** 2
    img[body] = 50 + 40 * rng.random(body.sum())
    mask = np.zeros((96, 96), np.uint8)
    r2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    if rv:
        rvm = ((yy - centre[0]) ** 2 + (xx - centre[1] - 11) ** 2 < 6 ** 2) & (r2 >= 7 ** 2)
        img[rvm], mask[rvm] = 180, 1
    if lv:
        img[r2 < 7 ** 2], mask[r2 < 7 ** 2] = 20, 2
        img[r2 < 4 ** 2], mask[r2 < 4 ** 2] = 200, 3
    return img, mask


def _stack(n=6, labels=None, seed=0, **kw):
    rng = np.random.default_rng(seed)
    pairs = [_slice(rng, **kw) for _ in range(n)]
    return Stack(images=np.stack([p[0] for p in pairs]), masks=np.stack([p[1] for p in pairs]),
                 sources=[f"s{i}" for i in range(n)], subject="p1", phase="ED",
                 positions=np.arange(n) * 10.0, spacing=(1.5, 1.5, 10.0),
                 labels=labels or ["IN"] * n)


def test_erase_replaces_the_structures_with_tissue_from_the_same_image():
    img, mask = _slice(np.random.default_rng(1))
    out, m = erase(img, mask, (2, 3), (1.5, 1.5), np.random.default_rng(0))
    assert not np.isin(m, (2, 3)).any() and (m == 1).sum() == (mask == 1).sum()
    lv = np.isin(mask, (2, 3))
    # the bright cavity and the dark myocardium are gone: tissue values (50-90, a little RV)
    assert out[mask == 3].min() > 40 and out[mask == 2].min() > 40
    # every filled pixel is a pixel of the same image, shifted (no new texture was drawn)
    d = [(dr, dc) for dr in range(-60, 61) for dc in range(-60, 61)
         if np.array_equal(out[lv], np.roll(img, (dr, dc), axis=(0, 1))[lv])]
    assert len(d) == 1 and np.hypot(*d[0]) > 10
    far = np.ones_like(lv)
    far[20:60, 20:70] = False      # well away from the LV, RV and the blended edge
    assert np.array_equal(out[far], img[far])


def test_erase_leaves_a_slice_without_the_structures_alone():
    img, mask = _slice(np.random.default_rng(2), lv=False, rv=False)
    out, m = erase(img, mask, (1, 2, 3), (1.5, 1.5), np.random.default_rng(0))
    assert np.array_equal(out, img) and np.array_equal(m, mask)


def test_extend_adds_labelled_slices_past_both_ends():
    st = _stack(6, labels=["OAP"] + ["IN"] * 5)
    e = extend(st, 2, 3, seed=4)
    assert e.n_slices == 11
    assert e.labels == ["OAP"] * 3 + ["IN"] * 5 + ["OBS"] * 3
    assert e.slice_ids == [-2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert e.sources[:2] == ["beyond the apex 2", "beyond the apex 1"] and e.sources[-1] == "beyond the base 3"
    np.testing.assert_allclose(e.positions, np.arange(-2, 9) * 10.0)
    np.testing.assert_array_equal(e.images[2:8], st.images)
    np.testing.assert_array_equal(e.masks[2:8], st.masks)
    assert not e.masks[:2].any()                                      # below the apex: no heart
    assert not np.isin(e.masks[8:], (2, 3)).any() and (e.masks[8:] == 1).any()   # above: RV goes on
    assert e.meta["beyond"] == (2, 3) and st.labels[0] == "OAP" and "beyond" not in st.meta
    np.testing.assert_array_equal(beyond_slices(e), [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    assert not beyond_slices(st).any()
    assert not np.array_equal(e.images[8], e.images[9])              # each a new cut


def test_extend_needs_masks_labels_and_spacing():
    st = _stack(3)
    for kw, word in ((dict(masks=None), "masks"), (dict(spacing=None), "spacing")):
        bad = Stack(**{**st.__dict__, **kw})
        with pytest.raises(ValueError, match=f"p1/ED.*{word}"):
            extend(bad, 1, 1)


def test_extended_draws_a_share_of_the_usable_stacks():
    stacks = [_stack(4, seed=i) for i in range(20)]
    stacks[3] = Stack(**{**stacks[3].__dict__, "masks": None})
    assert extended(stacks, 0.0) == []
    every = extended(stacks, 1.0, seed=1)
    assert [i for i, _ in every] == [i for i in range(20) if i != 3]
    for i, e in every:
        a, b = e.meta["beyond"]
        assert 1 <= a <= 3 and 1 <= b <= 3 and e.n_slices == 4 + a + b
    some = extended(stacks, 0.5, seed=1)
    assert 3 <= len(some) <= 16
    assert [i for i, _ in some] == [i for i, _ in extended(stacks, 0.5, seed=1)]


def test_training_arrays_carry_the_extra_slices_under_their_source_stack():
    from stackcls.study.anatomy import _with_beyond, training_arrays
    from stackcls.study.config import AnatomyStage
    stacks = [_stack(4, seed=i) for i in range(3)]
    cfg = AnatomyStage(canvas=64, size=32, context=1, beyond=1.0)
    base = training_arrays(stacks, cfg)
    both = _with_beyond(base, stacks, cfg, seed=0)
    ext = extended(stacks, 1.0, seed=0)
    added = sum(sum(e.meta["beyond"]) for _, e in ext)
    assert len(both["y"]) == len(base["y"]) + added
    np.testing.assert_array_equal(both["canvas"][:len(base["y"])], base["canvas"])
    tail = {k: v[len(base["y"]):] for k, v in both.items()}
    assert set(tail["y"].tolist()) == {0, 2} and tail["has_mask"].all()
    np.testing.assert_array_equal(tail["stack_index"],
                                  np.concatenate([[i] * sum(e.meta["beyond"]) for i, e in ext]))
    assert not np.isin(tail["masks"], (2, 3)).any()
    off = AnatomyStage(canvas=64, size=32, context=1)
    assert _with_beyond(base, stacks, off, seed=0) is base
