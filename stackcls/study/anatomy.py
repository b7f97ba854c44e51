"""method=anatomy in the study: the mask-supervised encoder-decoder (stackcls.models.anatomy), cross-
validated by patient, its fold models kept as the final ensemble, then the stack head over the
slice evidence.

    training stacks -> canvases at SPACING_MM around the heart (masks' LV centre; image centre
                       without masks) -> K folds: train, and every `eval_every` epochs run the
                       test-time pipeline (localise, crop, evidence) on the held-out fold
    -> select the epoch count: mean validation exact-range rate of the ordered decoding of the
       slice probabilities (ties: lower validation loss); "every slice IN" cannot win it
    -> fold models at that epoch = the ensemble; their out-of-fold evidence trains the stack head
       (selected on exact range too) and the direction model
    -> test stacks through AnatomyModel: the same rows as the paper's settings; without test
       stacks (data.test_size=0, the shipped model) the cross-validated rows instead

Resuming: each fold's models at every evaluated epoch and its validation outputs are saved in
anatomy/cv/fold<k>/ as they finish; a rerun loads them instead of training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx

from stackcls.models.anatomy import (EVIDENCE, AnatomyModel, Ensemble, batch_inputs, build_net,
                                     outputs, with_context)
from stackcls.train.anatomy import train
from stackcls.atomic import savez, write_json
from stackcls.train.checkpoint import is_saved, restore_into, save_anatomy_model, save_module
from stackcls.decode.ordered import decode_many
from stackcls.study.metrics import stack_groups
from stackcls.preprocess.beyond import beyond_slices, extended
from stackcls.preprocess.physical import canvas, mask_centre
from stackcls.preprocess.arrays import fold_units, patient_folds
from stackcls.train.selection import default_mode, select
from stackcls.stack import CLASSES
from stackcls.models.stack_head import slice_features
from stackcls.study.config import AnatomyStage, as_plain
from stackcls.study.evaluation import (Evaluated, calibrate_setting, evaluate_rows, fit_calibration,
                                      orientation_withheld, stack_head, trivial_row)

NAME = "anatomy"


def training_arrays(stacks, cfg: AnatomyStage) -> dict:
    """Canvases of every training slice, centred on the stack's LV (from its masks; the image
    centre for a stack without masks, whose slices then train the classifier only)."""
    xs, ms, has, ys, si = [], [], [], [], []
    for i, st in enumerate(stacks):
        m = getattr(st, "masks", None)
        centre = mask_centre(m) if m is not None else None
        x, mm, _ = canvas(st.images, st.spacing, cfg.canvas, centre, m)
        xs.append(with_context(x, cfg.context))
        ms.append(mm if mm is not None else np.zeros(x.shape, np.uint8))
        has.append(np.full(len(x), m is not None))
        ys.append(st.label_indices())
        si.append(np.full(len(x), i))
    return dict(canvas=np.concatenate(xs), masks=np.concatenate(ms), has_mask=np.concatenate(has),
                y=np.concatenate(ys).astype(np.int32), stack_index=np.concatenate(si))


def stack_outputs(stacks, cfg: AnatomyStage, run, lv_map=None) -> list[dict]:
    """The test-time pipeline of one model (run: model inputs -> outputs dict) on whole stacks;
    lv_map: the localisation's LV maps (run's own by default; AnatomyModel.lv_map for the ensemble)."""
    xs, infos = batch_inputs([(st.images, st.spacing) for st in stacks], cfg.net(),
                             cfg.localise_size, lv_map or (lambda a: run(a)["lv"]))
    o = run(np.concatenate(xs))
    cut = np.cumsum([0] + [len(x) for x in xs])
    return [dict({k: v[cut[i]:cut[i + 1]] for k, v in o.items()}, x=xs[i],
                 localised=infos[i]["localised"]) for i in range(len(xs))]


def _exact(outs: list[dict], stacks) -> tuple[float, float]:
    """(exact-range rate of the ordered decoding of the slice probabilities, mean slice CE)."""
    lps = [np.log(np.clip(o["probs"], 1e-6, 1.0)) for o in outs]
    labels = decode_many(lps)
    ex = np.mean([np.array_equal(l, st.label_indices()) for l, st in zip(labels, stacks)])
    ce = np.mean(np.concatenate([-lp[np.arange(len(lp)), st.label_indices()]
                                 for lp, st in zip(lps, stacks)]))
    return float(ex), float(ce)


def _fold_dir(run_dir: Path, f: int) -> Path:
    return run_dir / NAME / "cv" / f"fold{f}"


def pretrained(cfg: AnatomyStage, backbone: str, weights, seed: int, run_dir: Path):
    """Sim-to-real: a net trained on the built-in cohort's stacks and masks (saved in
    anatomy/pretrain/, reused on a rerun), or None when cfg.pretrain_subjects is 0."""
    if not cfg.pretrain_subjects:
        return None
    d = run_dir / NAME / "pretrain"
    if is_saved(d):
        return _restore_net(d, backbone, cfg)
    from stackcls.io import load_stacks
    from stackcls.phantom import cohort
    root = cohort(int(cfg.pretrain_subjects), seed=seed + 1000)   # subjects no synthetic test holds
    stacks = load_stacks(root / "dicom", labels=root / "labels.csv", masks=root / "masks")
    net = build_net(backbone, cfg.net(), weights, seed)
    t0 = time.perf_counter()
    train(net, training_arrays(stacks, cfg), dataclasses.replace(cfg.net(), epochs=cfg.pretrain_epochs),
          seed=seed, desc="anatomy pretrain (built-in cohort)")
    print(f"[anatomy] pretrained on {len(stacks)} synthetic stacks "
          f"({(time.perf_counter() - t0) / 60:.1f} min)")
    save_module(d, net, dict(subjects=int(cfg.pretrain_subjects), epochs=int(cfg.pretrain_epochs)))
    return net


def _with_beyond(arrays: dict, stacks, cfg: AnatomyStage, seed: int) -> dict:
    """`arrays` and, after them, the slices past the ends of extended copies of cfg.beyond of the
    stacks, each under its source stack's index (so that it trains in that stack's folds only)."""
    ext = extended(stacks, cfg.beyond, seed) if cfg.beyond else []
    if not ext:
        return arrays
    more = training_arrays([e for _, e in ext], cfg)
    keep = np.concatenate([beyond_slices(e) for _, e in ext])
    more["stack_index"] = np.concatenate([np.full(e.n_slices, i) for i, e in ext])
    return {k: np.concatenate([arrays[k], more[k][keep]]) for k in arrays}


def cross_validate(stacks, cfg: AnatomyStage, folds: int, backbone: str, weights, seed: int,
                   run_dir: Path, fold_by: str = "subject") -> dict:
    """Train the K fold models; per fold and evaluated epoch: the weights and the held-out stacks'
    outputs. Returns dict(epochs, val (K, epochs) exact, loss, models {epoch: [K nets]},
    oof {epoch: [per-stack outputs]})."""
    splits = patient_folds(fold_units(stacks, fold_by), k=folds, seed=seed)
    eval_epochs = sorted({e for e in range(cfg.eval_every, cfg.epochs + 1, cfg.eval_every)}
                         | {cfg.epochs})
    arrays = None
    start = None
    models = {e: [None] * folds for e in eval_epochs}
    oof = {e: [None] * len(stacks) for e in eval_epochs}
    val = np.zeros((folds, len(eval_epochs)))
    loss = np.zeros((folds, len(eval_epochs)))
    seconds = 0.0
    for f, (tr_idx, va_idx) in enumerate(splits):
        d = _fold_dir(run_dir, f)
        va_stacks = [stacks[i] for i in va_idx]
        done = d / "done.json"
        if done.is_file():
            rec = json.loads(done.read_text())
            for j, e in enumerate(eval_epochs):
                net = _restore_net(d / f"epoch{e}", backbone, cfg)
                models[e][f] = net
                z = dict(np.load(d / f"epoch{e}" / "val.npz"))
                if z["evidence0"].shape[1] != len(EVIDENCE):   # saved before a column was added
                    outs = stack_outputs(va_stacks, cfg, lambda x, net=net: outputs(net, x))
                    z = {f"{n}{k}": o[n] for k, o in enumerate(outs) for n in ("probs", "evidence")}
                    savez(d / f"epoch{e}" / "val.npz", **z)
                for k, i in enumerate(va_idx):
                    oof[e][i] = {n: z[f"{n}{k}"] for n in ("probs", "evidence")}
                val[f, j], loss[f, j] = rec["val"][j], rec["loss"][j]
            seconds += rec["seconds"]
            continue
        if arrays is None:
            arrays = _with_beyond(training_arrays(stacks, cfg), stacks, cfg, seed)
        keep = np.isin(arrays["stack_index"], tr_idx)
        data = {k: v[keep] for k, v in arrays.items()}
        if start is None and cfg.pretrain_subjects:
            start = pretrained(cfg, backbone, weights, seed, run_dir)
        net = nnx.clone(start) if start is not None else build_net(backbone, cfg.net(), weights, seed)

        def on_eval(net, epoch, f=f, d=d, va_idx=va_idx, va_stacks=va_stacks):
            j = eval_epochs.index(epoch)
            outs = stack_outputs(va_stacks, cfg, lambda x: outputs(net, x))
            val[f, j], loss[f, j] = _exact(outs, va_stacks)
            save_module(d / f"epoch{epoch}", net, dict(epoch=epoch))
            savez(d / f"epoch{epoch}" / "val.npz",
                  **{f"{n}{k}": o[n] for k, o in enumerate(outs) for n in ("probs", "evidence")})
            models[epoch][f] = nnx.clone(net)
            for i, o in zip(va_idx, outs):
                oof[epoch][i] = o

        t0 = time.perf_counter()
        train(net, data, cfg.net(), seed=seed + f, desc=f"anatomy fold {f + 1}/{folds}",
              eval_every=cfg.eval_every, on_eval=on_eval)
        dt = time.perf_counter() - t0
        seconds += dt
        write_json(done, dict(val=val[f].tolist(), loss=loss[f].tolist(), seconds=round(dt, 1)))
        print(f"[anatomy] fold {f + 1}/{folds}: validation exact range by epoch "
              f"{dict(zip(eval_epochs, np.round(val[f], 3).tolist()))} ({dt / 60:.1f} min)")
    return dict(epochs=eval_epochs, val=val, loss=loss, models=models, oof=oof, seconds=seconds)


def _restore_net(path: Path, backbone: str, cfg: AnatomyStage):
    return restore_into(path, build_net(backbone, cfg.net()))


def run_anatomy(study, train_stacks, test_stacks, run_dir: Path, weights) -> tuple[dict, Evaluated, dict]:
    """The whole method on one split: (results.json row, Evaluated, the test arrays). Without test
    stacks (data.test_size=0: the shipped model, trained on every patient) the row holds the
    cross-validated metrics instead (`cv_metrics`) and the arrays are the training stacks'."""
    p = study.protocol
    cfg: AnatomyStage = p.anatomy
    d = run_dir / NAME
    t0 = time.perf_counter()
    cv = cross_validate(train_stacks, cfg, p.folds, study.backbone, weights, study.seed, run_dir,
                        p.fold_by)
    # the evaluated epochs are the columns; ties go to the lower validation loss
    _, j = select(cv["val"].mean(0)[None], cv["loss"].mean(0)[None], ties="lower_loss")
    epoch = cv["epochs"][j - 1]
    ensemble = Ensemble(cv["models"][epoch])
    config = dict(backbone=study.backbone, folds=p.folds, anatomy=as_plain(cfg.net()),
                  localise_size=cfg.localise_size, epoch=epoch, weights=str(weights),
                  evidence=list(EVIDENCE), classes=list(CLASSES), method=NAME,
                  **({} if p.fold_by == "subject" else dict(fold_by=p.fold_by)),
                  **({} if not cfg.beyond else dict(beyond=cfg.beyond)))
    final, plain = d / "final", json.loads(json.dumps(config))
    # saved again when a resumed run was saved with another config (fewer evidence columns)
    if not is_saved(final) or json.loads((final / "config.json").read_text()) != plain:
        save_anatomy_model(final, ensemble, config)
    cv_seconds = cv["seconds"]

    # the stack head and the direction model on out-of-fold evidence (arrays as the paper's)
    oof = cv["oof"][epoch]
    tr = _arrays(train_stacks)
    train_pen = np.concatenate([o["evidence"] for o in oof])
    train_probs = np.concatenate([o["probs"] for o in oof])
    model = AnatomyModel(ensemble, config, path=d / "final")
    t1 = time.perf_counter()
    if not test_stacks:
        return _run_cv_only(study, train_stacks, cv, epoch, tr, (train_pen, train_probs), run_dir,
                            t0, t1)
    te = _arrays(test_stacks)
    test_out = stack_outputs(test_stacks, cfg, model.run, model.lv_map)
    test_pen = np.concatenate([o["evidence"] for o in test_out])
    test_probs = np.concatenate([o["probs"] for o in test_out])
    head = stack_head(d / "stack", cfg.stack, study.seed, tr, (train_pen, train_probs), te,
                      test_pen, test_probs)
    model.stack_head, model.direction = head.model, head.direction
    test = evaluate_rows(te, test_probs, head.probs)
    # temperatures of the range probabilities, fitted on the out-of-fold stacks (issue 11)
    res = dict(oof_probs=train_probs, selected=dict(epochs=epoch))
    model.calibration, test["calibration"], outcomes = calibrate_setting(
        d / "stack", res, cfg.stack, study.seed, tr, te, (train_pen, train_probs), head,
        test_pen, test_probs)
    test["stack_orientation_withheld"] = orientation_withheld(test_stacks, te, model, study.seed)
    final_seconds = time.perf_counter() - t1
    savez(d / "test_outputs.npz", probs=test_probs, evidence=test_pen, y=te["y"],
          stack_index=te["stack_index"], slice_index=te["slice_index"], stack_probs=head.probs)
    row = dict(method=NAME, selected=_selected(cfg, cv, epoch), test=test,
               checkpoint=str(Path(NAME) / "final"),
               localised=float(np.mean([o["localised"] for o in test_out])),
               timing=dict(cv_seconds=round(cv_seconds, 1), final_seconds=round(final_seconds, 1),
                           total_seconds=round(time.perf_counter() - t0, 1)),
               stack_head=dict(selected=head.model.info.get("selected"),
                               timing=head.model.info.get("timing")))
    write_figures(run_dir, test_stacks, test_out, te, test_probs, head.probs)
    return row, Evaluated(row, test_probs, test_pen, head.probs, outcomes), te


def _selected(cfg: AnatomyStage, cv: dict, epoch: int) -> dict:
    return dict(learning_rate=cfg.learning_rate, epochs=epoch, criterion=
                "mean validation exact-range rate (ordered decoding of the slice probabilities "
                "over the held-out fold's stacks)",
                curve={str(e): round(float(v), 4) for e, v in zip(cv["epochs"], cv["val"].mean(0))})


def _run_cv_only(study, stacks, cv: dict, epoch: int, tr: dict, train_outputs, run_dir: Path,
                 t0: float, t1: float) -> tuple[dict, Evaluated, dict]:
    """No test set: the stack head, direction model and temperatures from every stack's
    out-of-fold outputs, and the cross-validated metrics (`cv_metrics`) as the row."""
    p = study.protocol
    cfg: AnatomyStage = p.anatomy
    d = run_dir / NAME
    head = stack_head(d / "stack", cfg.stack, study.seed, tr, train_outputs)
    units = fold_units(stacks, p.fold_by)
    splits = patient_folds(units, k=p.folds, seed=study.seed)
    cv_row, tables, oof_stack = cv_metrics(tr, train_outputs, head.model, splits, study.seed, units)
    res = dict(oof_probs=train_outputs[1], selected=dict(epochs=epoch))
    fit_calibration(d / "stack", res, cfg.stack, study.seed, tr, train_outputs, head, tables)
    row = dict(method=NAME, selected=_selected(cfg, cv, epoch), cv=cv_row,
               checkpoint=str(Path(NAME) / "final"),
               timing=dict(cv_seconds=round(cv["seconds"], 1),
                           final_seconds=round(time.perf_counter() - t1, 1),
                           total_seconds=round(time.perf_counter() - t0, 1)),
               stack_head=dict(selected=head.model.info.get("selected"),
                               timing=head.model.info.get("timing")),
               direction=head.direction.info,
               default_mode=_default_mode(cv_row))
    nets = cv["models"][epoch]
    fold_of = {int(i): f for f, (_, va) in enumerate(splits) for i in va}
    write_figures(run_dir, stacks, _LazyOutputs(stacks, cfg, nets, fold_of), tr,
                  train_outputs[1], oof_stack if oof_stack is not None else train_outputs[1],
                  which="out-of-fold stacks (each through the fold model that did not train on it)")
    return row, Evaluated(row, train_outputs[1], train_outputs[0], oof_stack), tr


def cv_metrics(tr: dict, train_outputs, head_model, splits, seed: int, units=None):
    """(the cross-validated rows of a run without a test set, the stack head's out-of-fold
    log-scores per stack, the same as per-slice probabilities (M, 3); both None for a head
    trained without CV).

    slice and slice_ordered: each stack through the fold model that did not train on it (the
    out-of-fold outputs); stack: a K-fold CV of the stack head over those outputs (its own folds,
    the same patients' folds when protocol.anatomy.stack.folds equals protocol.folds; fresh runs
    at the learning rate and epoch count its CV selected; calibration.oof_stack_tables). Each mode and
    the trivial "every slice IN" row carry `fold_sd`: the standard deviation of every metric over
    the K patient folds of the anatomy CV, and `folds`: the per-fold exact-range rates. Both
    selections (the epoch count, the head's settings) were made on these same folds, so the
    numbers lean optimistic by the selection's share."""
    from stackcls.train import calibration as cal
    pen, probs = train_outputs
    groups = stack_groups(tr["stack_index"])
    feats = [slice_features(pen[g], probs[g]) for g in groups]
    # the stack head's folds keep the same units together as the anatomy CV's (units: one per stack)
    units = [str(tr["subject"][g[0]]) for g in groups] if units is None else list(units)
    tables = cal.oof_stack_tables(feats, [tr["y"][g] for g in groups], units, head_model, seed)
    stack_probs = None
    if tables is not None:
        stack_probs = np.zeros((len(tr["y"]), 3), np.float32)
        for g, lp in zip(groups, tables):
            stack_probs[g] = np.exp(lp)
    rows = evaluate_rows(tr, probs, stack_probs)
    rows["every_slice_in"] = trivial_row(tr)
    per_fold = []
    for _, va in splits:
        keep = np.isin(tr["stack_index"], va)
        sub = {k: v[keep] for k, v in tr.items()}
        r = evaluate_rows(sub, probs[keep], None if stack_probs is None else stack_probs[keep])
        r["every_slice_in"] = trivial_row(sub)
        per_fold.append(r)
    for mode, m in rows.items():
        if m is None:
            continue
        m["fold_sd"] = _spread([f[mode] for f in per_fold])
        m["folds"] = [round(f[mode]["exact_range_rate"], 4) for f in per_fold]
    return rows, tables, stack_probs


def _default_mode(cv_row: dict) -> dict:
    """The mode the model predicts in by default, from the per-fold exact ranges of the CV rows
    (train.selection.default_mode); slice_ordered when the stack head had no CV."""
    stack, ordered = cv_row.get("stack"), cv_row.get("slice_ordered")
    if not stack or not ordered:
        return dict(mode="slice_ordered", rule="no cross-validated stack head")
    return default_mode(stack["folds"], ordered["folds"])


def _spread(rows: list[dict]) -> dict:
    """The sample standard deviation of every numeric metric over the folds (nested like the rows;
    None where fewer than two folds have a value)."""
    out = {}
    for k, v in rows[0].items():
        if isinstance(v, dict):
            out[k] = _spread([r[k] for r in rows])
        elif isinstance(v, (int, float)) and k not in ("n_slices", "n_stacks"):
            vals = [r[k] for r in rows if r[k] is not None and np.isfinite(r[k])]
            out[k] = round(float(np.std(vals, ddof=1)), 4) if len(vals) >= 2 else None
    return out


class _LazyOutputs:
    """The out-of-fold outputs of a stack (model input and mask included) computed when a figure
    asks for them: each stack through the fold model that held it out."""

    def __init__(self, stacks, cfg, nets, fold_of):
        self.stacks, self.cfg, self.nets, self.fold_of = stacks, cfg, nets, fold_of

    def __getitem__(self, i):
        net = self.nets[self.fold_of[i]]
        return stack_outputs([self.stacks[i]], self.cfg, lambda x: outputs(net, x))[0]


def write_figures(run_dir: Path, stacks, outs: list[dict], te: dict, probs, stack_probs,
                  which: str = "test stacks") -> None:
    """confusion.png (slice and stack modes) and anatomy.png: the model's view and masks of the
    `which` stacks with out-of-range slices, wrongly labelled ones first (at most 6)."""
    from stackcls.ui import figures
    from stackcls.study.metrics import confusion_matrix
    from stackcls.study.evaluation import ordered
    pred = ordered(np.log(np.clip(stack_probs, 1e-12, 1.0)), te["stack_index"])
    figures.confusion({"anatomy: slice": confusion_matrix(te["y"], probs.argmax(1)),
                       "anatomy: stack": confusion_matrix(te["y"], pred)}, run_dir / "confusion.png")
    groups = stack_groups(te["stack_index"])
    wrong = [i for i, g in enumerate(groups) if not np.array_equal(pred[g], te["y"][g])]
    edge = [i for i, g in enumerate(groups) if (te["y"][g] != 1).any() and i not in wrong]
    pick = (wrong + edge)[:6] or list(range(min(3, len(groups))))
    rows = [dict(key=stacks[i].key, x=outs[i]["x"][..., 1], mask=outs[i]["mask"],
                 truth=[CLASSES[v] for v in te["y"][groups[i]]],
                 pred=[CLASSES[v] for v in pred[groups[i]]]) for i in pick]
    figures.anatomy(rows, run_dir / "anatomy.png", title=f"method=anatomy on {which}")


def _arrays(stacks) -> dict:
    """The label and index arrays evaluate_rows and the stack head read (no images)."""
    y, si, sl, subj = [], [], [], []
    for i, st in enumerate(stacks):
        n = st.n_slices
        y.append(st.label_indices())
        si.append(np.full(n, i, np.int32))
        sl.append(np.arange(n, dtype=np.int32))
        subj += [st.subject] * n
    return dict(y=np.concatenate(y).astype(np.int32), stack_index=np.concatenate(si),
                slice_index=np.concatenate(sl), subject=np.array(subj))
