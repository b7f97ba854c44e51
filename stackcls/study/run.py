"""The paper's protocol end to end for one configuration (`python -m experiments.run` is its
command line):

    data (synthetic cohort | ACDC folder | DICOM tree + labels)  -> patient-level train/test split
    -> preprocess (window, centre crop, resize)  -> per setting (depth0, depth1 | scratch):
       5-fold CV per learning rate -> select (lr, epochs) -> final model -> test metrics
       -> stack-aware head (on out-of-fold outputs of the training stacks) -> slice_ordered/stack rows
    -> results.json, results.md, curves/confusion/tsne/gradcam PNGs, checkpoints, terminal table

Rerunning with the same run_dir resumes: finished CV jobs, final models and stack heads are loaded,
not retrained (run.json must match). See docs/experiments.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from stackcls import parallel
from stackcls.ui import figures
from stackcls.atomic import write_json
from stackcls.predict.load import write_run_models
from stackcls.ui.explain import gradcam, gradcam_cells, tsne
from stackcls.study.metrics import confusion_matrix
from stackcls.models.classifier import build_classifier
from stackcls.preprocess.arrays import stack_arrays
from stackcls.progress import set_enabled as set_progress
from stackcls.stack import CLASSES
from stackcls.study.anatomy import run_anatomy
from stackcls.study.config import METHODS, Study, as_plain, as_study, identity
from stackcls.study.data import input_size, load_data, make_backbone
from stackcls.study.evaluation import (Evaluated, calibration_figure, evaluate_setting, ordered,
                                      trivial_row)
from stackcls.study.report import results_markdown, summary_table
from stackcls.study.settings import plan, stage_inputs, vmapped
from stackcls.train.sweep import run_setting

SCHEMA_VERSION = 1


class RunConfigMismatch(ValueError):
    pass


def check_run_dir(run_dir: Path, study: Study) -> None:
    """An existing run_dir must hold the same configuration (run.json). Checked before any work;
    run.json itself is written by `start_run_dir` once the data has loaded, so a run that fails
    on a wrong data.root leaves nothing that would refuse the corrected rerun."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir={run_dir} is a file, not a folder")
    f = run_dir / "run.json"
    if not f.is_file():
        return
    ident = identity(study)
    try:
        old = json.loads(f.read_text()).get("identity")
    except (OSError, ValueError, AttributeError) as e:
        raise RunConfigMismatch(f"{f}: not a readable run record ({type(e).__name__}: {e}); choose "
                                "another run_dir (or delete that one) to start afresh") from None
    if old != ident:
        raise RunConfigMismatch(
            f"{run_dir} holds a run with a different configuration:\n  there: {old}\n  now:   "
            f"{ident}\nchoose another run_dir (or delete that one) to start afresh")


def start_run_dir(run_dir: Path, study: Study) -> None:
    f = run_dir / "run.json"
    if not f.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(f, dict(identity=identity(study), config=as_plain(study)))


def _counts(stacks: list, arrays: dict) -> str:
    return f"{len(stacks)} stacks / {len(arrays['y'])} slices ({len(set(arrays['subject']))} subjects)"


def run(cfg) -> dict:
    """Run (or resume) the protocol for one configuration (a Study, or the DictConfig Hydra
    composed from `study`); returns results.json's dict."""
    study = as_study(cfg)
    t_start = time.perf_counter()
    if not study.progress:
        set_progress(False)
    run_dir = Path(study.run_dir).expanduser().absolute()
    check_run_dir(run_dir, study)
    parallel.initialize()               # a SLURM job step of several tasks joins them; else nothing
    parallel.activate(study.devices)
    p, seed = study.protocol, study.seed
    if study.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {study.method!r}")
    if study.method == "anatomy":
        return run_anatomy_study(study, run_dir, t_start)
    if study.export.path:
        raise ValueError("export.path: the shipped model format holds method=anatomy models only")
    settings = plan(study.backbone, study.depth)      # a bad backbone or depth fails here, at once
    size = input_size(study)
    print(f"[run] {study.backbone} depth={study.depth} data={study.data.name} protocol={p.name} "
          f"seed={seed} -> {run_dir}")

    train_stacks, test_stacks = load_data(study)
    if not test_stacks:
        raise ValueError("no test set (data.test_size=0): method=paper reports test metrics; only "
                         "method=anatomy runs without one (it reports its cross-validated metrics)")
    tr = stack_arrays(train_stacks, size, study.data.keep)
    te = stack_arrays(test_stacks, size, study.data.keep)
    start_run_dir(run_dir, study)
    print(f"[data] train {_counts(train_stacks, tr)}, test {_counts(test_stacks, te)}; class counts train "
          f"{np.bincount(tr['y'], minlength=3).tolist()} test {np.bincount(te['y'], minlength=3).tolist()}")

    backbone, weights = make_backbone(study, size)
    model = build_classifier(backbone, size, seed)
    save_config = dict(backbone=study.backbone, input_size=size, keep=study.data.keep, weights=weights,
                       options={}, preprocess=model.preprocess_mode, classes=list(CLASSES))
    inputs = stage_inputs(model, tr, te, p, seed, {s.stage for s in settings})

    trained: dict[str, dict] = {}
    evaluated: dict[str, Evaluated] = {}
    for s in settings:
        start = s.start(model, trained, seed, study.vmap)
        trained[s.name] = run_setting(
            s.name, start.model, s.pool(inputs[s.stage], tr["y"], p), tr["subject"],
            lrs=getattr(p.learning_rates, s.name), epochs=p.epochs, folds=p.folds,
            oversample_factor=p.oversample, seed=seed, out_dir=run_dir / s.name,
            vmapped=vmapped(s.conv, study.vmap), batch_size=p.batch_size, decay=p.decay,
            fold_init=start.fold_init, final_init=start.final_init, save_config=save_config,
            fail_after_jobs=study.fail_after_jobs)
        evaluated[s.name] = evaluate_setting(run_dir / s.name, trained[s.name], s.stage,
                                             inputs[s.stage], tr, te, test_stacks, p.stack, seed,
                                             save_config)

    results = dict(schema=SCHEMA_VERSION, backbone=study.backbone, data=study.data.name,
                   weights=weights, protocol=p.name, seed=seed, input_size=size,
                   depths={s.key: evaluated[s.name].row for s in settings},
                   trivial=dict(all_in=trivial_row(te)),
                   n_train=dict(stacks=len(train_stacks), slices=int(len(tr["y"]))),
                   n_test=dict(stacks=len(test_stacks), slices=int(len(te["y"]))),
                   device=jax.devices()[0].device_kind, devices=parallel.describe(),
                   timing=dict(total_seconds=round(time.perf_counter() - t_start, 3)))
    write_figures(run_dir, trained, evaluated, te, seed)
    write_json(run_dir / "results.json", results)
    write_run_models(run_dir)      # every trained setting in the one model format
    (run_dir / "results.md").write_text(results_markdown(results))
    print(summary_table(results))
    return results


def run_anatomy_study(study: Study, run_dir: Path, t_start: float) -> dict:
    """method=anatomy (stackcls.study.anatomy): one setting, rows as the paper's settings have."""
    p = study.protocol
    print(f"[run] {study.backbone} method=anatomy data={study.data.name} protocol={p.name} "
          f"seed={study.seed} -> {run_dir}")
    train_stacks, test_stacks = load_data(study)
    with_masks = sum(getattr(s, "masks", None) is not None for s in train_stacks)
    start_run_dir(run_dir, study)
    print(f"[data] train {len(train_stacks)} stacks ({with_masks} with masks), test "
          f"{len(test_stacks)} stacks")
    weights = anatomy_weights(study)
    row, ev, te = run_anatomy(study, train_stacks, test_stacks, run_dir, weights)
    calibration_figure(run_dir, {"anatomy": ev})
    results = dict(schema=SCHEMA_VERSION, backbone=study.backbone, method="anatomy",
                   # without a test set the rows are the cross-validated ones (and the trivial
                   # row is over the training stacks)
                   evaluation="test" if test_stacks else "cv",
                   data=study.data.name, weights=str(study.weights), protocol=p.name,
                   seed=study.seed, input_size=p.anatomy.size, depths={"anatomy": row},
                   trivial=dict(all_in=trivial_row(te)),
                   n_train=dict(stacks=len(train_stacks), slices=int(sum(s.n_slices for s in train_stacks)),
                                with_masks=int(with_masks)),
                   n_test=dict(stacks=len(test_stacks), slices=int(sum(s.n_slices for s in test_stacks))),
                   # the anatomy networks train on one device (the CV jobs are not sharded yet)
                   device=jax.devices()[0].device_kind, devices=parallel.describe(),
                   timing=dict(total_seconds=round(time.perf_counter() - t_start, 3)))
    write_json(run_dir / "results.json", results)
    # the model in the one format, with the mode its CV chose
    write_run_models(run_dir, {"anatomy": row.get("default_mode", {}).get("mode")})
    (run_dir / "results.md").write_text(results_markdown(results))
    print(summary_table(results))
    if study.export.path:
        export_model(study, run_dir)
    return results


def export_model(study: Study, run_dir: Path) -> dict:
    """study.export: the run's model in the shipped format, and the card's table in the doc."""
    from stackcls import pretrained
    e = study.export
    card = pretrained.export(run_dir, Path(e.path).expanduser(), name=e.name, version=e.version,
                             dtype=e.dtype, command=e.command, stand_in=e.stand_in)
    print(f"[export] {Path(e.path) / card['file']}: {card['bytes']:,} bytes, sha256 {card['sha256']}")
    if e.doc:
        print(f"[export] numbers table updated in {pretrained.update_doc(Path(e.doc).expanduser(), card)}")
    return card


def anatomy_weights(study: Study):
    """What the anatomy encoder starts from: "imagenet", None (random) or a Keras file path."""
    w = study.weights
    if w is None or str(w).lower() in ("none", "random", "null"):
        return None
    if str(w).lower() == "imagenet":
        return "imagenet"
    path = Path(w).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={w}: no such file")
    return path


def write_figures(run_dir: Path, trained: dict, evaluated: dict, te: dict, seed: int) -> None:
    """curves.png and confusion.png of every setting; tsne.png and gradcam.png of the last."""
    curves = {}
    for name, res in trained.items():
        sel = res["selected"]
        curves[name] = dict(lr=sel["learning_rate"], epochs=sel["epochs"],
                            **res["curves"][sel["learning_rate"]])
    figures.curves(curves, run_dir / "curves.png")
    mats = {}
    for name, ev in evaluated.items():
        mats[f"{name}: slice"] = confusion_matrix(te["y"], np.argmax(ev.probs, 1))
        if ev.stack_probs is not None:
            mats[f"{name}: stack"] = confusion_matrix(te["y"], ordered(np.log(np.clip(
                ev.stack_probs, 1e-12, 1)), te["stack_index"]))
    figures.confusion(mats, run_dir / "confusion.png")
    calibration_figure(run_dir, evaluated)
    last = list(evaluated)[-1]
    ev = evaluated[last]
    figures.tsne(tsne(ev.pen, seed), te["y"], run_dir / "tsne.png",
                 title=f"t-SNE of penultimate features, test set ({last})")
    cells = gradcam_cells(te["y"], ev.probs)
    if cells:
        x = te["x"][list(cells.values())]
        cams = gradcam(trained[last]["model"], x, classes=np.array([j for _, j in cells]))
        figures.gradcam({k: (x[n, ..., 0], cams[n]) for n, k in enumerate(cells)},
                        run_dir / "gradcam.png", title=f"Grad-CAM ({last}; rows truth, columns prediction)")
