"""The paper's protocol end to end: `python -m experiments.run backbone=vgg16 depth=1 ...`.

    data (synthetic cohort | ACDC folder | DICOM tree + labels)  -> patient-level train/test split
    -> preprocess (window, centre crop, resize)   -> per setting (depth0, depth1 | scratch):
       5-fold CV per learning rate -> select (lr, epochs) -> final model -> test metrics
       -> stack-aware head (on out-of-fold outputs of the training stacks) -> slice_ordered/stack rows
    -> results.json, results.md, curves/confusion/tsne/gradcam PNGs, checkpoints, terminal table

Rerunning with the same run_dir resumes: finished CV jobs, final models and stack heads are loaded,
not retrained (run.json must match). See docs/experiments.md.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1


class RunConfigMismatch(ValueError):
    pass


# ----------------------------------------------------------------------------- configuration

def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return json.loads(json.dumps(cfg))


def _identity(cfg: dict) -> dict:
    """The parts of a config that define a run's results (a resumed run must match them)."""
    keys = ("backbone", "depth", "weights", "seed", "data")
    ident = {k: cfg.get(k) for k in keys}
    # the stack head's settings are checked where it is saved (changing them retrains only it)
    ident["protocol"] = {k: v for k, v in cfg["protocol"].items() if k != "stack"}
    return ident


def _check_run_dir(run_dir: Path, cfg: dict) -> None:
    f = run_dir / "run.json"
    ident = _identity(cfg)
    if f.is_file():
        old = json.loads(f.read_text()).get("identity")
        if old != ident:
            raise RunConfigMismatch(
                f"{run_dir} holds a run with a different configuration:\n  there: {old}\n  now:   "
                f"{ident}\nchoose another run_dir (or delete that one) to start afresh")
    else:
        from stackcls.checkpoint import write_json

        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(f, dict(identity=ident, config=cfg))


# ----------------------------------------------------------------------------- data

def load_data(cfg: dict):
    """(train stacks, test stacks) split by patient."""
    from stackcls.io import load_stacks
    from stackcls.preprocess import split_subjects

    d, p, seed = cfg["data"], cfg["protocol"], int(cfg["seed"])
    name = d["name"]
    if name == "synthetic":
        from stackcls.phantom import cohort

        n_tr, n_te = int(p["synthetic_subjects"]["train"]), int(p["synthetic_subjects"]["test"])
        root = cohort(n_tr + n_te, seed=int(d.get("cohort_seed", 0)))
        stacks = load_stacks(root / "dicom", labels=root / "labels.csv")
        test_size = n_te
    elif name in ("acdc", "dicom"):
        root = Path(d["root"]).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.root={root}: no such folder")
        labels = d.get("labels") or (root / "labels.csv" if name == "acdc" else None)
        if labels is None:
            raise ValueError("data=dicom needs data.labels=CSV (subject,frame,phase,slice,label)")
        stacks = load_stacks(root, labels=Path(labels))
        test_size = d.get("test_size", 0.5)
    else:
        raise ValueError(f"unknown data.name {name!r} (synthetic, acdc or dicom)")
    unlabelled = [s.key for s in stacks if s.labels is None]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} stack(s) have no labels (e.g. {unlabelled[:3]}); "
                         "every stack needs labels for training and evaluation")
    subjects = sorted({s.subject for s in stacks})
    if d.get("max_subjects"):
        keep = set(np.random.default_rng(seed).permutation(subjects)[:int(d["max_subjects"])])
        stacks = [s for s in stacks if s.subject in keep]
    per_stack = [s.subject for s in stacks]
    tr, te = split_subjects(per_stack, test_size=test_size, seed=seed)
    return [stacks[i] for i in tr], [stacks[i] for i in te]


def make_backbone(cfg: dict, size: int):
    """(backbone, weights description). weights=imagenet that cannot be had: loud warning and
    random initialisation, recorded as "random (imagenet unavailable)"."""
    from stackcls import backbones

    name, w, seed = cfg["backbone"], cfg.get("weights"), int(cfg["seed"])
    spec = backbones.spec(name)
    if not spec.pretrained:
        return backbones.create(name, weights=None, input_size=size, seed=seed), "scratch"
    if w is None or str(w).lower() in ("none", "random", "null"):
        return backbones.create(name, weights=None, input_size=size, seed=seed), "random"
    if str(w).lower() == "imagenet":
        try:
            return backbones.create(name, weights="imagenet", input_size=size, seed=seed), "imagenet"
        except Exception as e:  # offline, no cached file, ...: never silently
            msg = (f"\n{'!' * 78}\n!! {name}: ImageNet weights unavailable ({type(e).__name__}: {e})\n"
                   f"!! falling back to RANDOM initialisation; results.json records it.\n{'!' * 78}")
            print(msg, file=sys.stderr)
            warnings.warn(f"{name}: ImageNet weights unavailable, random initialisation", stacklevel=2)
            return (backbones.create(name, weights=None, input_size=size, seed=seed),
                    "random (imagenet unavailable)")
    path = Path(w).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={w}: no such file")
    return backbones.create(name, weights=path, input_size=size, seed=seed), f"file:{path.name}"


def input_size(cfg: dict) -> int:
    from stackcls import backbones

    spec = backbones.spec(cfg["backbone"])
    want = cfg["protocol"].get("image_size")
    if isinstance(want, dict):  # per-backbone sizes: {vgg16: 64, default: 96}
        want = want.get(cfg["backbone"], want.get("default"))
    if want is None:
        return int(spec.input_size)
    want = int(want)
    if want < spec.min_size:
        warnings.warn(f"{cfg['backbone']}: image_size {want} < its minimum {spec.min_size}; "
                      f"using {spec.input_size}", stacklevel=2)
        return int(spec.input_size)
    return want


# ----------------------------------------------------------------------------- evaluation

def _groups(stack_index):
    return [np.flatnonzero(stack_index == s) for s in np.unique(stack_index)]


def ordered(log_probs: np.ndarray, stack_index: np.ndarray) -> np.ndarray:
    """Ordered decoding (stackcls.decode) of per-slice log-scores, stack by stack."""
    from stackcls.decode import decode_many

    groups = _groups(stack_index)
    out = np.empty(len(log_probs), np.int32)
    for g, labels in zip(groups, decode_many([log_probs[g] for g in groups])):
        out[g] = labels
    return out


def evaluate_rows(arrays: dict, probs: np.ndarray, stack_probs: np.ndarray | None) -> dict:
    from stackcls.metrics import evaluate

    y, si, sl = arrays["y"], arrays["stack_index"], arrays["slice_index"]
    lp = np.log(np.clip(probs, 1e-6, 1.0))
    rows = dict(slice=evaluate(y, probs, si, slice_index=sl),
                slice_ordered=evaluate(y, probs, si, y_pred=ordered(lp, si), slice_index=sl),
                stack=None)
    if stack_probs is not None:
        slp = np.log(np.clip(stack_probs, 1e-12, 1.0))
        rows["stack"] = evaluate(y, stack_probs, si, y_pred=ordered(slp, si), slice_index=sl)
    return rows


def stack_head(setting_dir: Path, tr: dict, te: dict, train_pen, train_probs, test_pen, test_probs,
               cfg: dict):
    """Train (or load, when its settings are unchanged) the stack-aware head on the given outputs
    for the training stacks; return its per-slice probabilities on the test stacks and its info
    ((None, None) when disabled)."""
    sc = cfg["protocol"].get("stack") or {}
    if not sc.get("enabled", True):
        return None, None, None, None
    from stackcls.stack_model import (load_stack_model, save_stack_model, slice_features,
                                      train_stack_model)

    from stackcls.checkpoint import write_json

    from stackcls.direction import fit_direction

    d = setting_dir / "stack"
    want = dict(sc, seed=int(cfg["seed"]))
    stamp = d / "protocol.json"
    feats, labels, subjects = [], [], []
    for g in _groups(tr["stack_index"]):
        feats.append(slice_features(train_pen[g], train_probs[g]))
        labels.append(tr["y"][g])
        subjects.append(str(tr["subject"][g[0]]))
    # the direction model is a sub-second fit on the same inputs: refitted on every (re)run
    direction = fit_direction(feats, subjects, seed=int(cfg["seed"]))
    direction.save(d)
    if (d / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        model = load_stack_model(d)
    else:
        proto = {k: (list(v) if k == "learning_rates" else v) for k, v in sc.items()
                 if k not in ("enabled", "inputs")}
        model = train_stack_model(feats, labels, subjects, seed=int(cfg["seed"]), protocol=proto)
        save_stack_model(d, model)
        write_json(stamp, want)
    groups = _groups(te["stack_index"])
    lps = model.scores_many([slice_features(test_pen[g], test_probs[g]) for g in groups])
    out = np.zeros((len(te["y"]), 3), np.float32)
    for g, lp in zip(groups, lps):
        out[g] = np.exp(lp)
    return out, model.info, model, direction


def orientation_withheld(test_stacks, te: dict, trained, seed: int) -> dict:
    """The stack mode as a user with unoriented files gets it: each test stack is shown to
    predict_stack in a random direction with the orientation "unknown", so the direction must come
    from the images. Metrics in the true order, plus the share of stacks turned the right way."""
    from stackcls.metrics import evaluate
    from stackcls.predict import predict_stack
    from stackcls.stack import CLASS_INDEX

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


# ----------------------------------------------------------------------------- the run

def run(cfg) -> dict:
    """Run (or resume) the protocol for one configuration; returns results.json's dict."""
    import jax

    from stackcls import backbones
    from stackcls.checkpoint import TrainedModel, write_json
    from stackcls.models import build_classifier
    from stackcls.preprocess import stack_arrays
    from stackcls.train import Pool, extract, predict_outputs, run_setting, split

    cfg = _plain(cfg)
    t_start = time.perf_counter()
    if not cfg.get("progress", True):
        from stackcls.progress import set_enabled

        set_enabled(False)
    import logging

    for name in ("absl", "orbax", "jax"):  # Hydra's stdout logging would print their INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(cfg["run_dir"]).expanduser().absolute()
    _check_run_dir(run_dir, cfg)
    seed, p = int(cfg["seed"]), cfg["protocol"]
    name = cfg["backbone"]
    spec = backbones.spec(name)
    scratch = not spec.pretrained
    size = input_size(cfg)
    print(f"[run] {name} depth={cfg['depth']} data={cfg['data']['name']} protocol={p['name']} "
          f"seed={seed} -> {run_dir}")

    train_stacks, test_stacks = load_data(cfg)
    keep = float(cfg["data"].get("keep", 0.6))
    tr = stack_arrays(train_stacks, size, keep)
    te = stack_arrays(test_stacks, size, keep)
    print(f"[data] train {len(train_stacks)} stacks / {len(tr['y'])} slices "
          f"({len(set(tr['subject']))} subjects), test {len(test_stacks)} stacks / {len(te['y'])} "
          f"slices ({len(set(te['subject']))} subjects); class counts train "
          f"{np.bincount(tr['y'], minlength=3).tolist()} test {np.bincount(te['y'], minlength=3).tolist()}")

    backbone, weights_desc = make_backbone(cfg, size)
    model = build_classifier(backbone, size, seed)
    gpu = jax.default_backend() != "cpu"
    vm = cfg.get("vmap", "auto")
    vmap_conv = gpu if vm == "auto" else bool(vm)
    vmap_head = True if vm == "auto" else bool(vm)
    save_config = dict(backbone=name, input_size=size, keep=keep, weights=weights_desc,
                       options={}, preprocess=model.preprocess_mode, classes=["OAP", "IN", "OBS"])
    common = dict(folds=int(p["folds"]), oversample_factor=int(p["oversample"]), seed=seed,
                  batch_size=int(p["batch_size"]), decay=float(p["decay"]), save_config=save_config,
                  epochs=int(p["epochs"]), fail_after_jobs=cfg.get("fail_after_jobs"))
    V = int(p["views"])
    rows, figs = {}, {}

    def finish(setting, res, test_probs, test_pen, train_inputs, stage):
        d = run_dir / setting
        N = len(tr["y"])
        # Inputs of the stack head for the training stacks. "oof": each slice from the CV model
        # that did not see it (honest probabilities, but five models' feature spaces); "final":
        # the final model's own outputs (the feature space the head sees at test time, but
        # in-sample, so more confident than on new data).
        how = (p.get("stack") or {}).get("inputs", "oof")
        if how == "final":
            lo, tr_pen = predict_outputs(res["model"], train_inputs, stage)
            tr_probs = np.asarray(jax.nn.softmax(lo))
        elif how == "oof":
            tr_pen, tr_probs = res["oof_pen"], res["oof_probs"]
        else:
            raise ValueError(f"protocol.stack.inputs must be oof or final, got {how!r}")
        ok = tr_pen is not None and not np.isnan(tr_probs).any()
        stack_probs, stack_info, head, direction = (
            stack_head(d, tr, te, tr_pen, tr_probs, test_pen, test_probs, cfg) if ok else (None,) * 4)
        test = evaluate_rows(te, test_probs, stack_probs)
        if head is not None:
            trained = TrainedModel(res["model"], save_config, head, None, direction)
            test["stack_orientation_withheld"] = orientation_withheld(test_stacks, te, trained, seed)
        np.savez(d / "test_outputs.npz", probs=test_probs, pen=test_pen, y=te["y"],
                 stack_index=te["stack_index"], slice_index=te["slice_index"],
                 stack_probs=stack_probs if stack_probs is not None else np.zeros((0, 3)))
        rows[setting] = dict(selected=res["selected"], test=test, timing=res["timing"],
                             checkpoint=str((d / "final").relative_to(run_dir)),
                             stack_head=stack_info and dict(selected=stack_info.get("selected"),
                                                            timing=stack_info.get("timing")))
        sel = res["selected"]
        c = res["curves"][sel["learning_rate"]]
        figs[setting] = dict(curves=dict(lr=sel["learning_rate"], epochs=sel["epochs"], **c),
                             test_probs=test_probs, test_pen=test_pen, model=res["model"],
                             stack_probs=stack_probs, n_train=N)

    if scratch:
        pool = Pool("image", tr["x"][:, None], tr["x"], tr["y"], rotate_deg=float(p["rotation"]))
        res = run_setting("scratch", model, pool, tr["subject"], lrs=p["learning_rates"]["scratch"],
                          out_dir=run_dir / "scratch", vmapped=vmap_conv, **common)
        logits, pen = predict_outputs(res["model"], te["x"], "image")
        finish("scratch", res, np.asarray(jax.nn.softmax(logits)), pen, tr["x"], "image")
        del pool
    else:
        depth = int(cfg["depth"])
        if depth not in (0, 1):
            raise ValueError(f"depth must be 0 or 1, got {depth}")
        rot = float(p["rotation"])
        if depth >= 1:  # one pass through the trunk serves both depths
            views_c = extract(model, tr["x"], "carry", V, seed, rot, desc="trunk (views)")
            clean_c = extract(model, tr["x"], "carry", 0, desc="trunk (train)")
            test_c = extract(model, te["x"], "carry", 0, desc="trunk (test)")
            views_f = predict_feats(model, views_c, views=True)
            clean_f, test_f = predict_feats(model, clean_c), predict_feats(model, test_c)
        else:
            views_f = extract(model, tr["x"], "features", V, seed, rot, desc="features (views)")
            clean_f = extract(model, tr["x"], "features", 0, desc="features (train)")
            test_f = extract(model, te["x"], "features", 0, desc="features (test)")
        pool0 = Pool("features", views_f, clean_f, tr["y"])
        res0 = run_setting("depth0", model, pool0, tr["subject"], lrs=p["learning_rates"]["depth0"],
                           out_dir=run_dir / "depth0", vmapped=vmap_head, **common)
        logits, pen = predict_outputs(res0["model"], test_f, "features")
        finish("depth0", res0, np.asarray(jax.nn.softmax(logits)), pen, clean_f, "features")
        if depth >= 1:
            sel0 = res0["selected"]
            m0 = res0["model"]
            fold_cache = {}

            def fold_init(f):
                # depth 1 of fold f starts from depth 0 trained on fold f's training subjects with
                # depth 0's selected (lr, epochs): exactly that CV job's state at the selected epoch
                if not fold_cache:
                    t0 = res0["trainer"]
                    jobs = [j for j in res0["jobs"] if j.lr == sel0["learning_rate"]]
                    shape = (max(len(j.items) for j in res0["jobs"]),
                             max(len(j.val) for j in res0["jobs"]))
                    rs = t0.run(jobs, sel0["epochs"], seed, vmapped=vmap_head, keep_state=True,
                                desc="depth0 fold models", _shape=shape)
                    for i, r in enumerate(rs):
                        fold_cache[i] = split(t0.apply(m0, r), "carry")[1]
                return fold_cache[f]

            pool1 = Pool("carry", views_c, clean_c, tr["y"])
            res1 = run_setting("depth1", m0, pool1, tr["subject"], lrs=p["learning_rates"]["depth1"],
                               out_dir=run_dir / "depth1", vmapped=vmap_conv, fold_init=fold_init,
                               final_init=split(m0, "carry")[1], **common)
            logits, pen = predict_outputs(res1["model"], test_c, "carry")
            finish("depth1", res1, np.asarray(jax.nn.softmax(logits)), pen, clean_c, "carry")

    results = dict(schema=SCHEMA_VERSION, backbone=name, data=cfg["data"]["name"], weights=weights_desc,
                   protocol=p["name"], seed=seed, input_size=size,
                   depths={_depth_key(s): r for s, r in rows.items()},
                   n_train=dict(stacks=len(train_stacks), slices=int(len(tr["y"]))),
                   n_test=dict(stacks=len(test_stacks), slices=int(len(te["y"]))),
                   device=jax.devices()[0].device_kind,
                   timing=dict(total_seconds=round(time.perf_counter() - t_start, 3)))
    # figures (deepest setting for t-SNE and Grad-CAM)
    write_figures(run_dir, figs, te, seed)
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(results_markdown(results))
    print(summary_table(results))
    return results


def _depth_key(setting: str) -> str:
    return {"depth0": "0", "depth1": "1"}.get(setting, setting)


def predict_feats(model, carries, views: bool = False):
    """Pooled last-block features from cached trunk outputs ((N, V, ...) when views)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from stackcls.models import gap

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, c):
        m = nnx.merge(graphdef, state, copy=True)
        return gap(m.backbone.last_block(c))

    lead = jax.tree.leaves(carries)[0].shape[:2]
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), carries) if views else carries
    n = jax.tree.leaves(flat)[0].shape[0]
    out = jnp.concatenate([f(state, jax.tree.map(lambda a: a[s:s + 64], flat))
                           for s in range(0, n, 64)])
    return out.reshape(lead + out.shape[1:]) if views else out


def write_figures(run_dir: Path, figs: dict, te: dict, seed: int) -> None:
    from stackcls import figures
    from stackcls.explain import gradcam, tsne

    if not figs:
        return
    figures.curves({s: f["curves"] for s, f in figs.items()}, run_dir / "curves.png")
    mats = {}
    from stackcls.metrics import confusion_matrix

    for s, f in figs.items():
        mats[f"{s}: slice"] = confusion_matrix(te["y"], np.argmax(f["test_probs"], 1))
        if f["stack_probs"] is not None:
            mats[f"{s}: stack"] = confusion_matrix(te["y"], ordered(np.log(np.clip(
                f["stack_probs"], 1e-12, 1)), te["stack_index"]))
    figures.confusion(mats, run_dir / "confusion.png")
    last = list(figs)[-1]
    f = figs[last]
    figures.tsne(tsne(f["test_pen"], seed), te["y"], run_dir / "tsne.png",
                 title=f"t-SNE of penultimate features, test set ({last})")
    pred = np.argmax(f["test_probs"], 1)
    cells = {}
    for i in range(3):
        for j in range(3):
            idx = np.flatnonzero((te["y"] == i) & (pred == j))
            if len(idx):
                cells[(i, j)] = int(idx[np.argmax(f["test_probs"][idx, j])])
    if cells:
        order = list(cells)
        x = te["x"][[cells[k] for k in order]]
        cams = gradcam(f["model"], x, classes=np.array([k[1] for k in order]))
        figures.gradcam({k: (x[n, ..., 0], cams[n]) for n, k in enumerate(order)},
                        run_dir / "gradcam.png", title=f"Grad-CAM ({last}; rows truth, columns prediction)")


# ----------------------------------------------------------------------------- tables

# result rows per depth; the last is the stack mode with the orientation hidden from the model
MODE_ROWS = ("slice", "slice_ordered", "stack", "stack_orientation_withheld")
ROW_KEYS = ("f1.OAP", "f1.IN", "f1.OBS", "auc_weighted", "auc_micro", "accuracy", "soft_accuracy",
            "exact_range_rate", "boundary_mae")


def _get(m: dict, key: str):
    for k in key.split("."):
        m = m[k] if m is not None else None
    return m


def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


def metric_rows(results: dict) -> list[dict]:
    """One row per (depth, mode): the Table-2 layout plus the stack-level measures."""
    out = []
    for depth, row in results["depths"].items():
        for mode in MODE_ROWS:
            m = row["test"].get(mode)
            if m is None:
                continue
            out.append(dict(backbone=results["backbone"], depth=depth, mode=mode,
                            weights=results["weights"], data=results["data"],
                            lr=row["selected"]["learning_rate"], epochs=row["selected"]["epochs"],
                            **{k: _get(m, k) for k in ROW_KEYS},
                            minutes=(row["timing"]["cv_seconds"] + row["timing"]["final_seconds"]) / 60))
    return out


def results_markdown(results: dict) -> str:
    lines = [f"# {results['backbone']} on {results['data']} ({results['protocol']} protocol, "
             f"seed {results['seed']}, weights {results['weights']})", "",
             "## Test metrics (Table 2 style)", "",
             "| depth | mode | lr | epochs | F1 OAP | F1 IN | F1 OBS | AUC (weighted) | AUC (micro) "
             "| accuracy | soft acc. | exact range | boundary MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in metric_rows(results):
        lines.append(f"| {r['depth']} | {r['mode']} | {r['lr']:g} | {r['epochs']} | "
                     + " | ".join(_fmt(r[k]) for k in ROW_KEYS) + " |")
    for depth, row in results["depths"].items():
        w = row["test"].get("stack_orientation_withheld")
        if w is not None:
            lines.append(f"\nDepth {depth}, orientation withheld (each test stack shown in a random "
                         f"direction as 'unknown'): direction found for {w['direction_accuracy']:.3f} "
                         f"of the stacks.")
    lines += ["", "## Training time (Table 1 style)", "",
              f"device: {results.get('device', '?')}", "",
              "| depth | CV minutes | final minutes |", "|---|---|---|"]
    for depth, row in results["depths"].items():
        t = row["timing"]
        lines.append(f"| {depth} | {t['cv_seconds'] / 60:.2f} | {t['final_seconds'] / 60:.2f} |")
    lines += ["", f"total: {results['timing']['total_seconds'] / 60:.2f} min", ""]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    head = f"{'depth':>7} {'mode':>26} {'F1 OAP':>7} {'F1 IN':>6} {'F1 OBS':>7} {'AUCw':>6} " \
           f"{'acc':>6} {'soft':>6} {'exact':>6} {'bMAE':>6}"
    out = ["", f"== {results['backbone']} / {results['data']} / {results['protocol']} "
           f"(weights: {results['weights']}) ==", head]
    for r in metric_rows(results):
        out.append(f"{r['depth']:>7} {r['mode']:>26} {_fmt(r['f1.OAP']):>7} {_fmt(r['f1.IN']):>6} "
                   f"{_fmt(r['f1.OBS']):>7} {_fmt(r['auc_weighted']):>6} {_fmt(r['accuracy']):>6} "
                   f"{_fmt(r['soft_accuracy']):>6} {_fmt(r['exact_range_rate']):>6} "
                   f"{_fmt(r['boundary_mae']):>6}")
    out.append(f"total {results['timing']['total_seconds'] / 60:.2f} min")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry point

def _hydra_main():
    import hydra

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def main(cfg):
        run(cfg)

    main()


if __name__ == "__main__":
    _hydra_main()
