"""Evaluating a trained setting on the test stacks, one row per mode of use:

    slice                       each slice alone (argmax of the classifier's probabilities)
    slice_ordered               the exact ordered decoding (stackcls.decode.ordered) of those probabilities
    stack                       the stack head, trained on the training stacks' slice outputs, then
                                ordered decoding of its per-slice probabilities
    stack_orientation_withheld  the stack mode through predict_stack with each test stack shown in a
                                random direction as "unknown" (the direction model must find it)

and, under `calibration`, how well P(returned IN range) is calibrated for slice_ordered and
stack (`calibrate_setting`: temperatures fitted on out-of-fold training stacks, then ECE, Brier,
the wrong stacks among the 20 % least confident and the truncation test on the test stacks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from stackcls.train import calibration as cal
from stackcls.ui import figures
from stackcls.atomic import savez, write_json
from stackcls.train.checkpoint import load_stack_model, save_stack_model
from stackcls.decode.ordered import decode_many
from stackcls.models.direction import DirectionModel, fit_direction
from stackcls.models.classifier import TrainedModel
from stackcls.models.apply import predict_outputs
from stackcls.study.metrics import evaluate, stack_groups
from stackcls.predict.stack import predict_stack
from stackcls.stack import CLASS_INDEX
from stackcls.models.stack_head import PROB_FLOOR, StackModel, slice_features
from stackcls.train.stack_head import train_stack_model
from stackcls.study.config import StackStage, as_plain
from stackcls.study.settings import StageInputs


@dataclasses.dataclass
class StackOutcome:
    probs: np.ndarray              # (M, 3) the stack head's per-slice probabilities on the test stacks
    model: StackModel
    direction: DirectionModel


@dataclasses.dataclass
class Evaluated:
    """A setting's test outputs and its results.json row."""

    row: dict
    probs: np.ndarray              # (M, 3) the final model's test probabilities
    pen: np.ndarray                # (M, 256) its penultimate features
    stack_probs: np.ndarray | None
    range_outcomes: dict | None = None   # mode -> (P(returned range), right) per test stack


def ordered(log_probs: np.ndarray, stack_index: np.ndarray) -> np.ndarray:
    """Ordered decoding (stackcls.decode.ordered) of per-slice log-scores, stack by stack."""
    groups = stack_groups(stack_index)
    out = np.empty(len(log_probs), np.int32)
    for g, labels in zip(groups, decode_many([log_probs[g] for g in groups])):
        out[g] = labels
    return out


def evaluate_rows(arrays: dict, probs: np.ndarray, stack_probs: np.ndarray | None) -> dict:
    y, si, sl = arrays["y"], arrays["stack_index"], arrays["slice_index"]
    lp = np.log(np.clip(probs, 1e-6, 1.0))
    rows = dict(slice=evaluate(y, probs, si, slice_index=sl),
                slice_ordered=evaluate(y, probs, si, y_pred=ordered(lp, si), slice_index=sl),
                stack=None)
    if stack_probs is not None:
        slp = np.log(np.clip(stack_probs, 1e-12, 1.0))
        rows["stack"] = evaluate(y, stack_probs, si, y_pred=ordered(slp, si), slice_index=sl)
    return rows


def trivial_row(arrays: dict) -> dict:
    """The answer every model must beat: every slice IN (uniform probabilities, so the AUCs are
    those of a guess)."""
    y = arrays["y"]
    return evaluate(y, np.full((len(y), 3), 1 / 3), arrays["stack_index"],
                    y_pred=np.full(len(y), CLASS_INDEX["IN"]), slice_index=arrays["slice_index"])


def _probs(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(logits))


def stack_inputs(res: dict, inputs: StageInputs, stage: str, how: str):
    """The training stacks' slice outputs (penultimate, probabilities) the stack head learns from
    (protocol.stack.inputs: see config.StackStage); None when there are none to use."""
    if how == "final":
        logits, pen = predict_outputs(res["model"], inputs.clean, stage)
        probs = _probs(logits)
    else:
        pen, probs = res["oof_pen"], res["oof_probs"]
    return None if pen is None or np.isnan(probs).any() else (pen, probs)


def _stamp(stage: StackStage, seed: int, train_outputs, **more) -> dict:
    """What decides a trained stack head and its temperatures: the stage's settings, the seed and
    the width of the evidence it reads (a head on other columns, e.g. from before the basal rule,
    is trained again)."""
    width = None if train_outputs is None else int(np.shape(train_outputs[0])[1])
    return dict(as_plain(stage), seed=seed, inputs=width, **more)


def stack_head(d: Path, stage: StackStage, seed: int, tr: dict, train_outputs, te: dict | None = None,
               test_pen=None, test_probs=None) -> StackOutcome:
    """Train the stack head in `d` on the training stacks' outputs, or load it when its stamp
    (protocol.json, `_stamp`) is unchanged; apply it to the test stacks (probs None without them).
    The direction model is a sub-second fit on the same inputs: refitted on every (re)run."""
    train_pen, train_probs = train_outputs
    feats, labels, subjects = [], [], []
    for g in stack_groups(tr["stack_index"]):
        feats.append(slice_features(train_pen[g], train_probs[g]))
        labels.append(tr["y"][g])
        subjects.append(str(tr["subject"][g[0]]))
    direction = fit_direction(feats, subjects, seed=seed)
    direction.save(d)
    stamp, want = d / "protocol.json", _stamp(stage, seed, train_outputs)
    if (d / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        model = load_stack_model(d)
    else:
        model = train_stack_model(feats, labels, subjects, seed=seed, protocol=stage.head())
        save_stack_model(d, model)
        write_json(stamp, want)
    if te is None:
        return StackOutcome(None, model, direction)
    groups = stack_groups(te["stack_index"])
    lps = model.scores_many([slice_features(test_pen[g], test_probs[g]) for g in groups])
    probs = np.zeros((len(te["y"]), 3), np.float32)
    for g, lp in zip(groups, lps):
        probs[g] = np.exp(lp)
    return StackOutcome(probs, model, direction)


def orientation_withheld(test_stacks, te: dict, trained: TrainedModel, seed: int) -> dict:
    """The stack mode as a user with unoriented files gets it: each test stack is shown to
    predict_stack in a random direction with the orientation "unknown", so the direction must come
    from the images. Metrics in the true order, plus the share of stacks turned the right way."""
    rng = np.random.default_rng(seed)
    y_pred = np.empty(len(te["y"]), np.int32)
    probs = np.zeros((len(te["y"]), 3), np.float32)
    right = []
    for i, st in enumerate(test_stacks):
        g = np.flatnonzero(te["stack_index"] == i)
        flip = bool(rng.random() < 0.5)
        p = predict_stack(st.reversed() if flip else st, trained, mode="stack", orientation="unknown")
        lab = np.array([CLASS_INDEX[l] for l in p.labels], np.int32)
        y_pred[g], probs[g] = (lab[::-1], p.probabilities[::-1]) if flip else (lab, p.probabilities)
        right.append(p.orientation == ("reversed" if flip else "as_given"))
    row = evaluate(te["y"], probs, te["stack_index"], y_pred=y_pred, slice_index=te["slice_index"])
    row["direction_accuracy"] = float(np.mean(right))
    return row


def evaluate_setting(d: Path, res: dict, stage: str, inputs: StageInputs, tr: dict, te: dict,
                     test_stacks, stack: StackStage, seed: int, save_config: dict) -> Evaluated:
    """A trained setting (run_setting's result `res`, folder `d`) on the test stacks: every mode's
    metrics, the stack head's info, and test_outputs.npz in `d`."""
    logits, test_pen = predict_outputs(res["model"], inputs.test, stage)
    test_probs = _probs(logits)
    train_outputs = stack_inputs(res, inputs, stage, stack.inputs) if stack.enabled else None
    head = (None if train_outputs is None else
            stack_head(d / "stack", stack, seed, tr, train_outputs, te, test_pen, test_probs))
    stack_probs = None if head is None else head.probs
    test = evaluate_rows(te, test_probs, stack_probs)
    calibration, test["calibration"], outcomes = calibrate_setting(
        d / "stack", res, stack, seed, tr, te, train_outputs, head, test_pen, test_probs)
    if head is not None:
        trained = TrainedModel(res["model"], save_config, head.model, None, head.direction,
                               calibration)
        test["stack_orientation_withheld"] = orientation_withheld(test_stacks, te, trained, seed)
    savez(d / "test_outputs.npz", probs=test_probs, pen=test_pen, y=te["y"],
          stack_index=te["stack_index"], slice_index=te["slice_index"],
          stack_probs=stack_probs if stack_probs is not None else np.zeros((0, 3)))
    info = None if head is None else head.model.info
    row = dict(selected=res["selected"], test=test, timing=res["timing"],
               checkpoint=str(Path(d.name) / "final"),
               stack_head=info and dict(selected=info.get("selected"), timing=info.get("timing")))
    return Evaluated(row, test_probs, test_pen, stack_probs, outcomes)


# ----------------------------------------------------------------------------- calibration

def _per_stack(arrays: dict, values: np.ndarray) -> list[np.ndarray]:
    return [values[g] for g in stack_groups(arrays["stack_index"])]


def _log(probs: np.ndarray, floor: float) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, np.float64), floor, 1.0)).astype(np.float32)


def fit_calibration(folder: Path, res: dict, stage: StackStage, seed: int, tr: dict, train_outputs,
                    head: StackOutcome | None, stack_tables=None) -> cal.Calibration:
    """The temperatures of a setting (stackcls.train.calibration), fitted on out-of-fold training
    stacks, or loaded from `folder` when fitted for the same stack settings and seed.
    stack_tables: the stack head's out-of-fold log-scores when the caller has them already
    (calibration.oof_stack_tables of the same head)."""
    # tables: which runs the head's out-of-fold scores come from (temperatures fitted on the CV's
    # own runs, before they were fresh, are fitted again)
    want = _stamp(stage, seed, train_outputs, classifier=res["selected"], tables=cal.TABLES_KEY)
    try:
        old = cal.Calibration.load(folder)
        if old.info.get("stamp") == want:
            return old
    except ValueError:
        pass                                 # absent or unreadable: fit again
    truths = [cal.true_range(y) for y in _per_stack(tr, tr["y"])]
    temps, info = {}, dict(stamp=want)
    oof = res.get("oof_probs")
    if oof is not None and not np.isnan(oof).any():
        temps["slice_ordered"], info["slice_ordered"] = cal.fit_temperature(
            _per_stack(tr, _log(oof, PROB_FLOOR)), truths)
    else:
        info["slice_ordered"] = "not fitted: no out-of-fold classifier outputs (no CV)"
    if head is not None:
        pen, probs = train_outputs
        feats = [slice_features(a, b) for a, b in zip(_per_stack(tr, pen), _per_stack(tr, probs))]
        subjects = [str(s[0]) for s in _per_stack(tr, np.asarray(tr["subject"]))]
        tables = stack_tables if stack_tables is not None else \
            cal.oof_stack_tables(feats, _per_stack(tr, tr["y"]), subjects, head.model, seed)
        if tables is None:
            info["stack"] = "not fitted: the stack head was trained without CV"
        else:
            temps["stack"], info["stack"] = cal.fit_temperature(tables, truths)
    out = cal.Calibration(temps, info)
    out.save(folder)
    return out


def calibrate_setting(folder: Path, res: dict, stage: StackStage, seed: int, tr: dict, te: dict,
                      train_outputs, head: StackOutcome | None, test_pen, test_probs):
    """(Calibration, the test row's `calibration` entry, {mode: (P(returned range), right)}):
    per mode, the measures with the fitted temperature and without (T = 1), and the truncation
    test (`calibration.truncation_test`)."""
    calibration = fit_calibration(folder, res, stage, seed, tr, train_outputs, head)
    truths = [cal.true_range(y) for y in _per_stack(te, te["y"])]
    feats = [slice_features(a, b) for a, b in zip(_per_stack(te, test_pen), _per_stack(te, test_probs))]
    modes = dict(slice_ordered=(_per_stack(te, _log(test_probs, PROB_FLOOR)), cal.classifier_tables))
    if head is not None:
        modes["stack"] = (_per_stack(te, _log(head.probs, np.finfo(np.float32).tiny)),
                          head.model.scores_many)
    row, outcomes = {}, {}
    trivial = [t is not None and tuple(int(v) for v in t) == (0, len(y) - 1)
               for t, y in zip(truths, _per_stack(te, te["y"]))]     # every slice IN is right
    for mode, (tables, score) in modes.items():
        t = calibration.temperature(mode)
        p, right = cal.range_outcomes(tables, truths, t)
        outcomes[mode] = (p, right)
        row[mode] = dict(temperature=t, **cal.range_measures(p, right),
                         uncalibrated=cal.range_measures(*cal.range_outcomes(tables, truths, 1.0)),
                         truncation=[cal.truncation_test(feats, _per_stack(te, te["y"]), score, t,
                                                         margin=m) for m in (0, 1)],
                         review_effort=cal.review_effort(p, right, trivial))
    return calibration, row, outcomes


def calibration_figure(run_dir: Path, evaluated: dict) -> Path | None:
    """calibration.png: the reliability diagram of P(returned range) of every setting and mode."""
    curves = {f"{name}: {mode}": o for name, ev in evaluated.items()
              for mode, o in (ev.range_outcomes or {}).items()}
    return figures.reliability(curves, run_dir / "calibration.png") if curves else None
