"""The one selection rule of a CV sweep, with the classifier's and the stack head's tie-breaks."""

import numpy as np
import pytest

from stackcls.train.selection import default_mode, select


def test_best_mean_score_ties_to_fewer_epochs():
    acc = np.array([[0.5, 0.8, 0.8], [0.7, 0.8, 0.9]]).mean(0)      # .6 .8 .85
    acc2 = np.array([[0.9, 0.8, 0.85], [0.8, 0.9, 0.85]]).mean(0)    # .85 .85 .85
    loss = np.ones((2, 3))
    assert select([acc, acc2], loss) == (1, 1)
    assert select([acc], loss[:1]) == (0, 3)
    # equal when rounded to 9 decimals: fewer epochs first, then the lower loss, then the first row
    assert select([[0.5, 0.5 + 1e-11]], [[0.9, 0.1]]) == (0, 1)
    assert select([[0.5], [0.5]], [[0.9], [0.4]]) == (1, 1)
    assert select([[0.5], [0.5]], [[0.4], [0.4]]) == (0, 1)


def test_stack_head_ties_go_to_the_lower_loss():
    score = np.array([[0.8, 0.9, 0.9], [0.9, 0.7, 0.9]], np.float32)
    loss = np.array([[1.0, 0.5, 0.4], [0.6, 0.1, 0.4]], np.float32)
    assert select(score, loss, ties="lower_loss") == (0, 3)        # (1, 2) has the lowest loss but not the best score
    assert select(score, np.full_like(loss, 0.3), ties="lower_loss") == (0, 2)   # then first row, fewer epochs
    assert select(score, loss, ties="fewer_epochs") == (1, 1)


def test_clear_errors():
    with pytest.raises(ValueError, match="ties"):
        select([[1.0]], [[0.0]], ties="random")
    with pytest.raises(ValueError, match="one shape"):
        select([[1.0, 0.5]], [[0.0]])


def test_default_mode_needs_more_than_one_standard_error():
    # the shipped model's CV folds: stack 0.619 against slice_ordered 0.613 is within the noise
    got = default_mode([0.625, 0.5938, 0.5938, 0.5938, 0.6875], [0.625, 0.5, 0.7188, 0.5625, 0.6562])
    d = np.array([0, 0.0938, -0.125, 0.0313, 0.0313])
    assert got["mode"] == "slice_ordered"
    assert got["mean_difference"] == pytest.approx(d.mean(), abs=1e-4)
    assert got["standard_error"] == pytest.approx(d.std(ddof=1) / np.sqrt(5), abs=1e-4)
    # a steady gain on every fold is more than one standard error
    assert default_mode([0.7, 0.72, 0.69, 0.71], [0.6, 0.61, 0.6, 0.62])["mode"] == "stack"
    assert default_mode([0.7], [0.6])["mode"] == "slice_ordered"        # one fold: no error estimate
    with pytest.raises(ValueError, match="equal-length"):
        default_mode([0.1, 0.2], [0.1])
