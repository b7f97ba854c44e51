"""Physical normalisation (stackcls.preprocess.physical): sizes in millimetres survive resampling at any pixel
spacing, masks stay labels, the intensity window, assumed spacing said out loud, and the heart's
centre from a probability map or from masks. References are hand-computed or brute force."""

import numpy as np
import pytest
from scipy import ndimage

from stackcls.preprocess import physical
from stackcls.preprocess.physical import ASSUMED_FOV_MM, SPACING_MM


def square_image(spacing_rc, side_mm, centre_rc, shape=(120, 140)):
    """1 inside a side_mm x side_mm square (in millimetres) centred on centre_rc (native pixels)."""
    r = (np.arange(shape[0]) - centre_rc[0]) * spacing_rc[0]
    c = (np.arange(shape[1]) - centre_rc[1]) * spacing_rc[1]
    inside = (np.abs(r)[:, None] < side_mm / 2) & (np.abs(c)[None, :] < side_mm / 2)
    return inside.astype(np.float32)


@pytest.mark.parametrize("spacing_rc", [(1.0, 1.0), (2.0, 2.0), (1.0, 2.0), (2.0, 0.75)])
def test_resample_keeps_millimetres_and_centres_where_asked(spacing_rc):
    side_mm, size = 30.0, 41                     # 30 mm at 1.5 mm/px: 20 output pixels
    centre = (47.0, 61.0)                        # off the image centre on purpose
    img = square_image(spacing_rc, side_mm, centre)
    out = physical.resample(img[None], spacing_rc, centre, size)[0]
    assert out.shape == (size, size) and out.dtype == np.float32
    on = out > 0.5
    rows, cols = np.nonzero(on)
    # extent: 20 px, within a pixel of bilinear edge rounding (the native side is 30 or 15 px, or
    # 40 px at 0.75 mm)
    assert abs(np.ptp(rows) + 1 - side_mm / SPACING_MM) <= 1
    assert abs(np.ptp(cols) + 1 - side_mm / SPACING_MM) <= 1
    assert abs(on.sum() - (side_mm / SPACING_MM) ** 2) <= 2 * 21 + 1
    # centred on the canvas centre (20, 20), because the canvas was centred on the square's centre
    assert abs(rows.mean() - (size - 1) / 2) <= 0.5 and abs(cols.mean() - (size - 1) / 2) <= 0.5
    assert out[(size - 1) // 2, (size - 1) // 2] == pytest.approx(1.0)
    # outside the image the canvas is 0: centre it on a corner
    corner = physical.resample(np.ones((1, 40, 40), np.float32), (1.0, 1.0), (0.0, 0.0), 21)[0]
    assert corner[:9, :].max() == 0 and corner[:, :9].max() == 0 and corner[12:, 12:].min() == 1.0


def test_resample_moves_with_the_centre():
    img = square_image((1.0, 1.0), 12.0, (60.0, 70.0))
    # centre the canvas 15 mm above and 30 mm left of the square: it appears 10 px below, 20 px right
    out = physical.resample(img[None], (1.0, 1.0), (45.0, 40.0), 61)[0]
    rows, cols = np.nonzero(out > 0.5)
    assert rows.mean() == pytest.approx(30 + 10, abs=0.5)
    assert cols.mean() == pytest.approx(30 + 20, abs=0.5)


def test_masks_resample_by_nearest_neighbour():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 50, 60), np.uint8)
    masks[:, 10:30, 10:25] = 1
    masks[:, 15:35, 30:50] = 2
    masks[:, 20:28, 36:44] = 3
    masks[1] = rng.integers(0, 4, (50, 60))      # a noisy slice: every label next to every other
    spacing, centre, size = (1.1, 0.9), (24.3, 29.6), 40
    out = physical.resample(masks, spacing, centre, size, order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1, 2, 3}
    # the brute-force reference: the native pixel nearest each canvas pixel's position
    off = (np.arange(size) - (size - 1) / 2) * SPACING_MM
    r = np.rint(centre[0] + off / spacing[0]).astype(int)
    c = np.rint(centre[1] + off / spacing[1]).astype(int)
    ok_r, ok_c = (r >= 0) & (r < 50), (c >= 0) & (c < 60)
    want = np.zeros((2, size, size), np.uint8)
    want[np.ix_([0, 1], np.nonzero(ok_r)[0], np.nonzero(ok_c)[0])] = masks[:, r[ok_r]][:, :, c[ok_c]]
    np.testing.assert_array_equal(out, want)
    # bilinear would have blended labels (non-integer values): the order matters
    assert not np.allclose(physical.resample(masks.astype(np.float32), spacing, centre, size) % 1, 0)


def test_inside_hand_computed():
    # a 40 x 60 image at 1 mm/px on a 64-pixel canvas at 1.5 mm around its centre: rows with
    # |(i - 31.5) * 1.5| <= 20 mm (+ half a native pixel) are i = 19..44 (26 rows); columns with
    # |(j - 31.5) * 1.5| <= 30 mm are j = 12..51 (40 columns)
    ins = physical.inside((40, 60), (1.0, 1.0), physical.image_centre((40, 60)), 64)
    assert ins.shape == (64, 64) and ins.dtype == bool
    rows, cols = np.nonzero(ins.any(1))[0], np.nonzero(ins.any(0))[0]
    np.testing.assert_array_equal(rows, np.arange(19, 45))
    np.testing.assert_array_equal(cols, np.arange(12, 52))
    assert ins.sum() == 26 * 40
    # agrees with where a constant image resamples to non-zero (bilinear, no prefilter)
    ones = physical.resample(np.ones((1, 40, 60), np.float32), (1.0, 1.0), (19.5, 29.5), 64)[0]
    assert np.all(ones[ins] > 0.49)


def test_intensity_is_one_window_per_stack():
    rng = np.random.default_rng(1)
    canvas = rng.gamma(2.0, 50.0, (3, 32, 32)).astype(np.float32)
    canvas[2] *= 0.3                             # a darker slice (an apical cap) stays darker
    valid = np.zeros((32, 32), bool)
    valid[4:28, 2:30] = True
    canvas[:, ~valid] = 1e6                      # outside the image: must not enter the window
    out = physical.intensity(canvas, valid)
    lo = np.percentile(canvas[:, 4:28, 2:30], 1)
    hi = np.percentile(canvas[:, 4:28, 2:30], 99)
    want = np.clip((canvas - lo) / (hi - lo) * 255, 0, 255)
    want[:, ~valid] = 0
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-3)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 255
    assert out[2][valid].mean() < 0.5 * out[0][valid].mean()


def test_intensity_degenerate_and_bad_values():
    valid = np.ones((8, 8), bool)
    np.testing.assert_array_equal(physical.intensity(np.full((2, 8, 8), 7.0, np.float32), valid), 0)
    # almost constant: the percentiles coincide, the full range is used instead
    x = np.zeros((1, 8, 8), np.float32)
    x[0, 0, 0] = 10.0
    out = physical.intensity(x, valid)
    assert out[0, 0, 0] == 255 and out.sum() == 255
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        physical.intensity(bad, valid)


@pytest.mark.parametrize("spacing", [None, (np.nan, 1.0, 10.0), (0.0, 0.0, 10.0), (1e-3, 1e-3),
                                     (50.0, 50.0, 8.0), (1.0, np.inf)])
def test_unknown_or_absurd_spacing_is_assumed_and_said(spacing):
    sp, note = physical.pixel_spacing(spacing, (200, 300))
    assert sp == (ASSUMED_FOV_MM / 300, ASSUMED_FOV_MM / 300)
    assert "unknown" in note and "assumed" in note and "1.20 mm" in note and "360 mm" in note


def test_known_spacing_is_used_as_is():
    assert physical.pixel_spacing((1.25, 0.8, 10.0), (200, 300)) == ((1.25, 0.8), None)
    assert physical.pixel_spacing(np.array([0.7, 0.7]), (10, 10)) == ((0.7, 0.7), None)


def brute_weighted_median(values, weights):
    """The value minimising sum_i w_i |values_i - v| over the candidates (L1: the median)."""
    cost = [np.sum(weights * np.abs(values - v)) for v in values]
    return values[int(np.argmin(cost))]


def test_heart_centre_is_the_weighted_median():
    rng = np.random.default_rng(2)
    n = 33
    p = rng.random((3, n, n)) ** 4               # skewed: median and mean differ
    spacing_rc, centre_rc = (1.2, 0.8), (50.0, 60.0)
    got = physical.heart_centre(p, spacing_rc, centre_rc)
    off = (np.arange(n) - (n - 1) / 2) * SPACING_MM
    dr = brute_weighted_median(off, p.sum(axis=(0, 2)))
    dc = brute_weighted_median(off, p.sum(axis=(0, 1)))
    np.testing.assert_allclose(got, [50.0 + dr / 1.2, 60.0 + dc / 0.8])


def test_heart_centre_none_without_enough_lv():
    assert physical.heart_centre(np.zeros((4, 32, 32)), (1.0, 1.0), (16.0, 16.0)) is None
    # 80 pixels x 2.25 mm^2 = 180 mm^2 < the 200 mm^2 needed
    p = np.zeros((2, 32, 32))
    p[0, :8, :10] = 1.0
    assert physical.heart_centre(p, (1.0, 1.0), (16.0, 16.0)) is None
    p[1, :2, :10] = 1.0                          # 100 pixels: 225 mm^2
    assert physical.heart_centre(p, (1.0, 1.0), (16.0, 16.0)) is not None


def test_heart_centre_ignores_a_small_far_blob():
    n = 96
    rr, cc = np.mgrid[:n, :n]
    lv = (np.hypot(rr - 50.0, cc - 40.0) <= 10).astype(float)          # the true LV, 317 px
    blob = ((np.abs(rr - 88) <= 3) & (np.abs(cc - 88) <= 3)).astype(float) # 49 px, 40 mm away
    p = np.stack([lv, lv + blob])
    spacing_rc, centre_rc = (1.5, 1.5), ((n - 1) / 2, (n - 1) / 2)     # canvas = native grid
    got = physical.heart_centre(p, spacing_rc, centre_rc)
    assert np.abs(got - [50.0, 40.0]).max() <= 1.0
    # the mean would have moved by several pixels
    w = p.sum(0)
    mean = np.array([(w * rr).sum(), (w * cc).sum()]) / w.sum()
    assert np.abs(mean - [50.0, 40.0]).max() > 3.0


def test_mask_centre():
    m = np.zeros((2, 40, 50), np.uint8)
    m[0, 10:20, 20:30] = 3                        # cavity: centre (14.5, 24.5)
    m[1, 30:40, 20:30] = 2                        # myocardium: centre (34.5, 24.5)
    m[:, 0:5, 0:5] = 1                            # RV: not the LV
    np.testing.assert_allclose(physical.mask_centre(m), [24.5, 24.5])
    only_rv = np.where(m == 1, 1, 0).astype(np.uint8)
    assert physical.mask_centre(only_rv) is None


def test_canvas_end_to_end():
    spacing = (2.0, 2.0, 10.0)                    # 2 mm native pixels
    img = np.zeros((2, 60, 80), np.float32)
    img[:, 20:35, 30:45] = 100.0                  # 30 mm square
    img[1] *= 0.5
    masks = np.zeros(img.shape, np.uint8)
    masks[:, 20:35, 30:45] = 3
    x, m, info = physical.canvas(img, spacing, 48, centre_rc=(27.0, 37.0), masks=masks)
    assert x.shape == m.shape == (2, 48, 48) and x.dtype == np.float32 and m.dtype == np.uint8
    assert 0 <= x.min() and x.max() <= 255 and set(np.unique(m)) == {0, 3}
    assert info == dict(centre=[27.0, 37.0], spacing=[2.0, 2.0], note=None)
    rows, cols = np.nonzero(m[0] == 3)
    assert abs(np.ptp(rows) + 1 - 20) <= 1 and abs(rows.mean() - 23.5) <= 0.75
    assert abs(np.ptp(cols) + 1 - 20) <= 1 and abs(cols.mean() - 23.5) <= 0.75
    # the 72 mm canvas lies inside the 120 x 160 mm image; one window for both slices
    assert x[0, 24, 24] == 255 and x[1, 24, 24] == pytest.approx(127.5, abs=1)
    # no spacing: assumed, said, and the image centre used
    x2, m2, info2 = physical.canvas(img, None, 48)
    assert m2 is None and "assumed" in info2["note"]
    assert info2["centre"] == [29.5, 39.5] and info2["spacing"] == [4.5, 4.5]
    # a small field of view on a big canvas: outside the image is 0
    x3, _, _ = physical.canvas(img, (0.5, 0.5), 96)
    ins = physical.inside((60, 80), (0.5, 0.5), physical.image_centre((60, 80)), 96)
    assert not ins.all() and np.all(x3[:, ~ins] == 0)
