"""Temperature fitting, calibration measures and the truncation test, against references."""

import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from stackcls.decode.boundaries import brute_force_ranges, distribution
from stackcls.train.calibration import (Calibration, brier, classifier_tables, ece, fit_temperature,
                                  least_confident_share, oof_stack_tables, range_measures,
                                  range_outcomes, reliability, truncation_test)
from stackcls.decode.ordered import ordered_decode


def test_ece_and_brier_against_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    correct = rng.random(500) < p ** 1.5            # over-confident on purpose
    frac_pos, mean_pred = calibration_curve(correct, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.minimum((p * 10).astype(int), 9), minlength=10)
    ref = np.sum(counts[counts > 0] * np.abs(frac_pos - mean_pred)) / len(p)
    assert ece(p, correct) == pytest.approx(ref, abs=1e-12)
    assert brier(p, correct) == pytest.approx(brier_score_loss(correct, p), abs=1e-12)
    r = reliability(p, correct)
    np.testing.assert_array_equal(r["count"], counts)
    assert ece(np.full(10, 0.7), np.arange(10) < 7) == pytest.approx(0.0)
    assert ece(np.full(10, 0.9), np.arange(10) < 5) == pytest.approx(0.4)


def test_least_confident_share_by_hand():
    p = np.array([0.1, 0.2, 0.9, 0.95, 0.3, 0.8, 0.99, 0.97, 0.6, 0.85])
    ok = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 0], bool)
    # 20 % of 10 stacks: the two least confident (0.1 wrong, 0.2 right) hold 1 of the 3 wrong
    assert least_confident_share(p, ok) == pytest.approx(1 / 3)
    assert least_confident_share(p, np.ones(10, bool)) is None
    m = range_measures(p, ok)
    assert m["stacks"] == 10 and m["exact"] == pytest.approx(0.7)
    assert m["wrong_in_least_confident_20_ceiling"] == pytest.approx(2 / 3)   # 2 slots, 3 wrong


def _sample_truths(rng, tables):
    """IN ranges drawn from each table's exact distribution at T = 1 (brute-force enumeration)."""
    truths = []
    for t in tables:
        ref = brute_force_ranges(t)
        keys = list(ref)
        a, b = keys[rng.choice(len(keys), p=np.array([ref[k] for k in keys]) / sum(ref.values()))]
        truths.append(None if a == b else (a, b - 1))
    return truths


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(1)
    tables = [rng.normal(size=(int(rng.integers(6, 12)), 3)) * 1.5 for _ in range(300)]
    truths = _sample_truths(rng, tables)
    # the model reports its evidence 2.5x too strongly: the fitted T must undo it
    t, info = fit_temperature([2.5 * x for x in tables], truths)
    assert t == pytest.approx(2.5, rel=0.15)
    assert info["nll_after"] < info["nll_before"]
    t1, _ = fit_temperature(tables, truths)
    assert t1 == pytest.approx(1.0, rel=0.15)
    # calibrated, P(returned range) matches how often it is right
    p, ok = range_outcomes([2.5 * x for x in tables], truths, t)
    p_raw, _ = range_outcomes([2.5 * x for x in tables], truths, 1.0)
    assert ece(p, ok) < ece(p_raw, ok)
    assert ece(p, ok) < 0.08


def test_range_outcomes_use_the_decoders_answer():
    rng = np.random.default_rng(2)
    tables = [rng.normal(size=(8, 3)) * 2 for _ in range(20)]
    decoded = []
    for t in tables:
        o = ordered_decode(t)
        a, b = int(o["first"]), int(o["stop"])
        decoded.append(None if a == b else (a, b - 1))
    p, ok = range_outcomes(tables, decoded, 1.3)
    assert ok.all()
    for t, r, q in zip(tables, decoded, p):
        assert q == pytest.approx(distribution(t, 1.3).probability(r), abs=1e-6)


def test_calibration_file_round_trip_and_errors(tmp_path):
    c = Calibration(dict(stack=1.7, slice_ordered=0.8), dict(note="x"))
    c.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert back.temperature("stack") == 1.7
    assert back.temperature("slice") == back.temperature("slice_ordered") == 0.8
    assert Calibration({}).temperature("stack") == 1.0
    (tmp_path / "calibration.json").write_text(json.dumps(dict(temperatures=dict(stack=-1))))
    with pytest.raises(ValueError, match="calibration.json.*> 0"):
        Calibration.load(tmp_path)
    (tmp_path / "calibration.json").write_text("{")
    with pytest.raises(ValueError, match="calibration.json: not a readable"):
        Calibration.load(tmp_path)


def _confident_features(y, p_right=0.9):
    """Features whose last 3 columns are log-probabilities putting p_right on the true class."""
    lp = np.full((len(y), 3), np.log((1 - p_right) / 2))
    lp[np.arange(len(y)), y] = np.log(p_right)
    return np.concatenate([np.zeros((len(y), 2)), lp], axis=1).astype(np.float32)


def test_truncation_test_flags_cut_ends_only():
    stacks = [np.array([0, 0, 1, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 1, 2, 2]),
              np.array([1, 1, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 1])]
    feats = [_confident_features(y) for y in stacks]
    out = truncation_test(feats, stacks, classifier_tables)
    assert out["cut_apex"] == dict(stacks=3, flagged=1.0)
    assert out["cut_base"] == dict(stacks=3, flagged=1.0)
    assert out["complete"] == dict(stacks=2, flagged=0.0)
    # one IN slice further in: a stack needs margin + 2 IN slices (all four here have them)
    deeper = truncation_test(feats, stacks, classifier_tables, margin=1)
    assert deeper["cut_apex"] == dict(stacks=3, flagged=1.0) and deeper["margin"] == 1
    assert truncation_test(feats, stacks, classifier_tables, margin=3)["cut_apex"]["stacks"] == 0
    # a scorer that cannot see IN at the ends never flags them
    blind = lambda fs: [np.where(np.arange(len(f))[:, None] % (len(f) - 1) == 0,
                                 np.log([[.45, .1, .45]]), f[:, -3:]) for f in fs]
    out = truncation_test(feats, stacks, blind)
    assert out["cut_apex"]["flagged"] == 0.0 and out["cut_base"]["flagged"] == 0.0


def test_oof_stack_tables_hold_out_each_stack():
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    labels = [np.array([0] * a + [1] * 5 + [2] * b) for a, b in rng.integers(1, 3, size=(8, 2))]
    feats = [_confident_features(y, 0.7) + rng.normal(size=(len(y), 5)).astype(np.float32) * 0.1
             for y in labels]
    subjects = [f"s{i // 2}" for i in range(8)]
    # what train_stack_model records after a 2-fold CV (training one here would only cost time)
    info = dict(protocol=dict(hidden=4, epochs=50, learning_rates=[1e-2, 1e-3], folds=2),
                cv=dict(folds=2, learning_rates=[1e-2, 1e-3]), selected=dict(learning_rate=1e-3, epochs=3))
    tables = oof_stack_tables(feats, labels, subjects, SimpleNamespace(info=info))
    assert [t.shape for t in tables] == [(len(y), 3) for y in labels]
    assert all(np.allclose(np.exp(t).sum(1), 1.0, atol=1e-5) for t in tables)
    no_cv = SimpleNamespace(info=dict(info, cv=None))
    assert oof_stack_tables(feats, labels, subjects, no_cv) is None


# ----------------------------------------------------------------------------- on every prediction

class _Toy:
    """A slice's class is encoded in its mean brightness (0 / 1 / 2); no stack head."""

    stack_head = None
    calibration = None

    def preprocess(self, images):
        return np.asarray(images, np.float32)[..., None]

    def slice_outputs(self, x):
        import jax
        import jax.numpy as jnp

        m = jnp.mean(x, axis=(1, 2, 3))
        return m[:, None], jax.nn.softmax(-(m[:, None] - jnp.arange(3.0)) ** 2 / 0.5, axis=1)


def _toy_images(y, rng, noise=0.15):
    y = np.asarray(y, float)
    return (y[:, None, None] + noise * rng.normal(size=(len(y), 1, 1))
            + 0.02 * rng.normal(size=(len(y), 4, 4))).astype(np.float32)


def test_prediction_fields_follow_the_exact_distribution(tmp_path):
    from stackcls.predict.stack import predict_stack
    from stackcls.models.stack_head import PROB_FLOOR

    rng = np.random.default_rng(4)
    y = [0, 0, 1, 1, 1, 1, 1, 1, 2]
    img = _toy_images(y, rng)
    toy = _Toy()
    p = predict_stack(img, toy, mode="slice_ordered", orientation="apex_to_base")
    d = distribution(np.log(np.clip(p.probabilities.astype(np.float64), PROB_FLOOR, 1)))
    assert p.range_probability == pytest.approx(d.probability(p.in_range_apex_to_base), abs=1e-5)
    assert len(p.alternatives) == 3 and p.temperature == 1.0
    probs = [a["probability"] for a in p.alternatives]
    assert probs == sorted(probs, reverse=True)
    assert all(a["in_range_apex_to_base"] != list(p.in_range_apex_to_base) for a in p.alternatives)
    b = p.boundary_probabilities
    assert sum(b["first_in"]) + b["no_in"] == pytest.approx(1.0, abs=1e-4)
    assert p.coverage["status"] == "complete"
    first, last = p.in_range_apex_to_base
    assert [p.level[k] for k in range(first, last + 1)].count("apical") == 2
    assert p.level[0] is None and p.level[last] == "basal"
    json.dumps(p.to_dict())

    # the same stack base -> apex: the same numbers, per-slice fields in the caller's order
    r = predict_stack(img[::-1], toy, mode="slice_ordered", orientation="base_to_apex")
    assert r.range_probability == pytest.approx(p.range_probability, abs=1e-6)
    assert r.level == p.level[::-1]
    assert r.alternatives[0]["in_range_apex_to_base"] == p.alternatives[0]["in_range_apex_to_base"]
    assert r.alternatives[0]["in_range"] == [len(y) - 1 - v for v in
                                             p.alternatives[0]["in_range"][::-1]]

    # a fitted temperature changes how sure, not what is returned
    toy_t = _Toy()
    toy_t.calibration = Calibration(dict(slice_ordered=3.0))
    q = predict_stack(img, toy_t, mode="slice_ordered", orientation="apex_to_base")
    assert q.labels == p.labels and q.temperature == 3.0
    assert q.range_probability == pytest.approx(
        distribution(np.log(np.clip(p.probabilities.astype(np.float64), PROB_FLOOR, 1)), 3.0)
        .probability(p.in_range_apex_to_base), abs=1e-5)
    assert q.range_probability < p.range_probability

    # cut short of the apex (the stack starts with clear IN slices): flagged
    cut = predict_stack(img[3:], toy, mode="slice_ordered", orientation="apex_to_base")
    assert cut.coverage["status"] == "apex may be missing" and cut.coverage["apex_end_in"] > 0.5

    from stackcls.ui import figures

    out = figures.boundaries([p, cut], [img, img[3:]], tmp_path / "b.png", titles=["full", "cut"])
    rel = figures.reliability({"toy": (np.array([0.2, 0.9, 0.7]), np.array([0, 1, 1], bool))},
                              tmp_path / "r.png")
    assert out.stat().st_size > 10_000 and rel.stat().st_size > 5_000


def _pred(subject, p, status="complete"):
    from stackcls.predict.stack import Prediction

    return Prediction(labels=["IN"] * 3, probabilities=np.full((3, 3), 1 / 3), in_range=(0, 2),
                      sources=[f"/d/{subject}/a.dcm"] * 3, apex_to_base=[0, 1, 2], mode="stack",
                      orientation="as_given", orientation_source="caller", orientation_scores={},
                      in_range_apex_to_base=(0, 2), subject=subject, phase="ED",
                      range_probability=p,
                      alternatives=[dict(in_range_apex_to_base=[1, 2], in_range=[1, 2], probability=0.1)],
                      coverage=dict(status=status, apex_end_in=0.9, base_end_in=0.1))


def test_review_queue_csv(tmp_path):
    import csv

    from stackcls.ui.label_session import read_review_queue, write_review_queue

    preds = [_pred("a", 0.9), _pred("b", 0.3), _pred("=cmd", 0.5), _pred("d", 0.95, "apex may be missing"),
             _pred("e", 0.7)]
    path, n = write_review_queue(preds, tmp_path / "q.csv", below=0.6)
    assert n == 3
    rows = list(csv.DictReader(open(path, newline="")))
    assert [r["subject"] for r in rows] == ["b", "'=cmd", "d"]        # least sure first; no formula
    assert rows[2]["coverage"] == "apex may be missing" and rows[0]["alternatives"] == "1..2 0.100"
    assert read_review_queue(path) == [("b", "ED"), ("=cmd", "ED"), ("d", "ED")]
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv: not a review queue"):
        read_review_queue(tmp_path / "bad.csv")


def test_predict_review_below_then_review_queue(tmp_path, capsys):
    import csv

    import matplotlib

    matplotlib.use("Agg")
    from stackcls.models import backbones
    from stackcls.train.checkpoint import save_model
    from stackcls.cli import main
    from stackcls.ui.label_ui import review_command
    from stackcls.models.classifier import build_classifier
    from stackcls.phantom import cohort

    root = cohort(2, seed=0)
    run = tmp_path / "run"
    clf = build_classifier(backbones.create("mobilenet", weights=None, input_size=32), 32)
    save_model(run / "depth0" / "final", clf, dict(backbone="mobilenet", input_size=32))
    queue = tmp_path / "queue.csv"
    assert main(["predict", str(root / "dicom"), "--model", str(run), "--mode", "slice_ordered",
                 "--review-below", "1", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "P(this range)" in out and "coverage:" in out and "4 of 4 stacks to review" in out
    rows = list(csv.DictReader(open(queue, newline="")))
    probs = [float(r["range_probability"]) for r in rows]
    assert len(rows) == 4 and probs == sorted(probs)
    assert main(["predict", str(root / "dicom"), "--model", str(run), "--review-below", "0"]) == 2

    # review walks only the queued stacks: keep the second row of the queue
    with open(queue, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow(rows[1])
    figs = tmp_path / "figs"
    assert review_command(root / "dicom", model=run, save=figs, queue=queue) == 0
    assert sorted(p.name for p in figs.glob("*.png")) == [
        f"{rows[1]['subject']}_{rows[1]['phase']}.png", f"{rows[1]['subject']}_{rows[1]['phase']}_gradcam.png"]
    queue.write_text("subject,phase\nnobody,ED\n")
    assert review_command(root / "dicom", model=run, save=figs, queue=queue) == 2
    assert "none of its 1 stacks" in capsys.readouterr().err
