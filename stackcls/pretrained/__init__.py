"""The model that ships inside the package, and the one-file format it ships in.

    load_default()                    the shipped model (lazy, cached in-process); the first call
                                      prints its name, version and sha256 once, to stderr
    export(run_dir, out, ...)         a method=anatomy run's model -> out/model.npz + out/card.json
    save(path, model) / load(path)    the one-file format (below) of an `AnatomyModel`
    verify(folder)                    the card's sha256 against the file's; raises naming the file
    card_table(card)                  the card's numbers as markdown (docs/model-card.md embeds it)

Format (`model.npz`): one zip of .npy arrays (readable with `np.load`, no pickle), written with
fixed timestamps so that the same model gives the same bytes and the same hash:
    meta.json                 uint8 bytes of a JSON object: the format version, the anatomy
                              config (what `restore_anatomy_model` reads), the stack head's config
                              and training record, the direction model's info, the temperatures
    ensemble/<path>           every variable of the K fold networks (parameters, BatchNorm
                              statistics, the class prior), float32 or float16
    stack_head/<path>         every variable of the stack head (float32)
    direction/{mean,std,weights}
One file instead of orbax's folder of many: a package-data glob, one hash, one download.
Loading is strict: every variable of the rebuilt modules must be in the file with its shape, and
the file may hold nothing else; float16 weights are widened to the modules' float32.

The card (`card.json`) says what the file is: name, version, sha256, size, the command that made
it, the training data and its terms, and the cross-validated metrics beside the trivial "every
slice IN" row. `docs/model-card.md` embeds `card_table(card)` between markers, regenerated on
every export (`update_doc`), so the document cannot disagree with the file.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from stackcls.io.errors import ModelFileError

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
WEIGHTS = "model.npz"
CARD = "card.json"
FORMAT = 1
DTYPES = ("float32", "float16")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)       # fixed: the same model writes the same bytes
DOC_START, DOC_END = "<!-- card-table:start -->", "<!-- card-table:end -->"

_loaded: dict = {}                      # resolved folder -> the loaded model


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the file

def _flat(module) -> dict[str, np.ndarray]:
    from flax import nnx
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module))}


def _fill(module, arrays: dict, prefix: str, where: Path):
    """Every variable of `module` from arrays[prefix + path], shapes checked, cast to the
    module's dtype; returns the names used."""
    import jax.numpy as jnp
    from flax import nnx
    state = nnx.state(module)
    used = set()
    for p, v in nnx.to_flat_state(state):
        name = prefix + "/".join(map(str, p))
        want = v.get_value()
        if name not in arrays:
            raise ModelFileError(f"{where}: {name} is missing (not the architecture meta.json describes)")
        a = arrays[name]
        if a.shape != want.shape:
            raise ModelFileError(f"{where}: {name} has shape {a.shape}, the model wants {want.shape}")
        v.set_value(jnp.asarray(a, want.dtype))
        used.add(name)
    nnx.update(module, state)
    return used


def save(path, model, dtype: str = "float32", extra: dict | None = None) -> Path:
    """Write an `AnatomyModel` (ensemble, stack head, direction, calibration) as one .npz file.
    dtype: of the ensemble's floating arrays ("float16" halves the file; the small stack head and
    direction model stay float32). extra: JSON-able facts kept in meta.json."""
    from stackcls.atomic import _jsonable, replace_atomically
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    head, direction = model.stack_head, model.direction
    if head is None or direction is None:
        raise ValueError("the shipped model needs a stack head and a direction model (the run "
                         "trained none: protocol.anatomy.stack.enabled=false?)")
    arrays = {}
    for k, a in _flat(model.ensemble).items():
        arrays["ensemble/" + k] = a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a
    arrays.update({"stack_head/" + k: a for k, a in _flat(head.head).items()})
    arrays.update({"direction/mean": direction.mean, "direction/std": direction.std,
                   "direction/weights": direction.weights})
    cal = model.calibration
    meta = dict(format=FORMAT, kind="anatomy", dtype=dtype, config=model.config,
                stack_head=dict(config=head.config, info=head.info),
                direction=dict(info=direction.info),
                calibration=None if cal is None else dict(temperatures=cal.temperatures, info=cal.info),
                **(extra or {}))
    arrays["meta.json"] = np.frombuffer(json.dumps(meta, sort_keys=True, default=_jsonable)
                                        .encode(), np.uint8)
    path = Path(path)
    with replace_atomically(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(name + ".npy", _ZIP_TIME), buf.getvalue(),
                       compress_type=zipfile.ZIP_DEFLATED)
    return path


def load(path):
    """The `AnatomyModel` saved by `save`. A damaged file or one that does not fit the
    architecture its meta.json describes raises ModelFileError naming the file."""
    from flax import nnx

    from stackcls.anatomy import AnatomyConfig, AnatomyModel, Ensemble, build_net
    from stackcls.calibration import Calibration
    from stackcls.direction import DirectionModel
    from stackcls.stack_model import StackHead, StackModel
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable stackcls model file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != "anatomy":
        got = (meta.get("format"), meta.get("kind")) if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: meta.json is not format {FORMAT} of an anatomy model (got {got})")
    try:
        config = meta["config"]
        cfg = AnatomyConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in config["anatomy"].items()})
        ensemble = Ensemble([build_net(config["backbone"], cfg) for _ in range(int(config["folds"]))])
        hc = meta["stack_head"]["config"]
        head = StackHead(int(hc["in_features"]), int(hc["hidden"]), float(hc["dropout"]),
                         bool(hc.get("residual", False)), rngs=nnx.Rngs(0))
        direction = DirectionModel(arrays["direction/mean"], arrays["direction/std"],
                                   arrays["direction/weights"], meta["direction"].get("info"))
        cal = meta.get("calibration")
        calibration = None if cal is None else Calibration(
            {str(k): float(v) for k, v in cal["temperatures"].items()}, cal.get("info") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: meta.json does not describe an anatomy model "
                             f"({type(e).__name__}: {e})") from None
    used = _fill(ensemble, arrays, "ensemble/", path) | _fill(head, arrays, "stack_head/", path)
    used |= {"direction/mean", "direction/std", "direction/weights"}
    extra = sorted(set(arrays) - used)
    if extra:
        raise ModelFileError(f"{path}: holds arrays the model does not have: {extra[:5]}")
    return AnatomyModel(ensemble, config, StackModel(head, hc, meta["stack_head"].get("info")),
                        path, direction, calibration)


# ----------------------------------------------------------------------------- the shipped model

def read_card(folder=DEFAULT_DIR) -> dict:
    f = Path(folder) / CARD
    try:
        card = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: the model card is missing (reinstall stackcls, or export "
                                "the model again: docs/model-card.md)") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{f}: not a readable model card ({type(e).__name__}: {e})") from None
    if not isinstance(card, dict) or not isinstance(card.get("sha256"), str):
        raise ModelFileError(f"{f}: the model card has no sha256")
    return card


def verify(folder=DEFAULT_DIR) -> dict:
    """The card of the model in `folder`, after checking the weight file's sha256 against it."""
    folder = Path(folder)
    card = read_card(folder)
    f = folder / card.get("file", WEIGHTS)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: the model file is missing (the card {folder / CARD} "
                                "describes it; reinstall stackcls or export the model again)")
    got = sha256(f)
    if got != card["sha256"]:
        raise ModelFileError(f"{f}: sha256 {got} does not match its card ({card['sha256']}); the "
                             "file is damaged or was replaced without its card")
    return card


def load_default(folder=None):
    """The shipped model (or the model in `folder`), loaded once per process (hash checked
    first); the first load says which model it is on stderr."""
    key = Path(folder if folder is not None else DEFAULT_DIR).resolve()
    hit = _loaded.get(key)
    if hit is not None:
        return hit
    card = verify(key)
    model = load(key / card.get("file", WEIGHTS))
    model.card = card
    stand_in = " (a stand-in, not the trained release)" if card.get("stand_in") else ""
    print(f"stackcls: default model {card.get('name')} version {card.get('version')}{stand_in}, "
          f"sha256 {card['sha256'][:12]}", file=sys.stderr)
    _loaded[key] = model
    return model


def describe(model) -> str:
    """What a loaded model is, for output files: the card's name/version/hash or its path."""
    card = getattr(model, "card", None)
    if card:
        return f"{card.get('name')} {card.get('version')} (sha256 {card['sha256']})"
    return str(getattr(model, "path", None) or type(model).__name__)


# ----------------------------------------------------------------------------- export

TERMS = ("Trained on ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017; University "
         "Hospital of Dijon), released for research under CC BY-NC-SA 4.0. These weights are "
         "derived from that data and are distributed under the same terms: attribution (cite "
         "Bernard et al., IEEE TMI 37(11):2514-2525, 2018), non-commercial use only, and "
         "derivatives shared alike. The stackcls code is Apache-2.0; these terms cover the weight "
         "file and its card only. See docs/model-card.md.")


def export(run_dir, out=DEFAULT_DIR, name: str = "stackcls-anatomy-acdc", version: str = "1",
           dtype: str = "float32", command: str | None = None, stand_in: bool = False,
           terms: str = TERMS) -> dict:
    """A finished method=anatomy run -> out/model.npz and out/card.json; returns the card.

    The card's metrics are the run's cross-validated ones (a run with data.test_size=0) or, for
    a run with a test set, its test rows; `evaluation` says which."""
    from stackcls.atomic import write_json
    from stackcls.inference import load_model
    run_dir, out = Path(run_dir), Path(out)
    res_file = run_dir / "results.json"
    try:
        results = json.loads(res_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{res_file}: no results (is {run_dir} a finished run?)") from None
    if results.get("method") != "anatomy":
        raise ValueError(f"{run_dir}: the shipped model format holds method=anatomy models; this "
                         f"run is method={results.get('method', 'paper')}")
    model = load_model(run_dir)
    row = results["depths"]["anatomy"]
    cv = row.get("cv")
    run_cfg = json.loads((run_dir / "run.json").read_text()).get("config", {})
    out.mkdir(parents=True, exist_ok=True)
    f = save(out / WEIGHTS, model, dtype, extra=dict(name=name, version=version))
    card = dict(
        name=name, version=version, file=WEIGHTS, sha256=sha256(f), bytes=f.stat().st_size,
        dtype=dtype, stand_in=bool(stand_in),
        created=datetime.date.today().isoformat(), stackcls_version=_version(),
        command=command or f"python -m experiments.run (run_dir={run_dir})",
        method="anatomy", backbone=results["backbone"], folds=model.config.get("folds"),
        selected=row["selected"],
        training_data=dict(name=results["data"], root=run_cfg.get("data", {}).get("root"),
                           **results["n_train"]),
        terms=terms,
        evaluation=("cross-validation" if cv is not None else
                    f"held-out test set ({results['n_test']['stacks']} stacks)"),
        metrics={m: (cv if cv is not None else row["test"]).get(m)
                 for m in ("slice", "slice_ordered", "stack")},
        direction=row.get("direction") or model.direction.info,
        trivial=(cv or {}).get("every_slice_in") or results["trivial"]["all_in"],
        timing=row.get("timing"),
        calibration=None if model.calibration is None else model.calibration.temperatures)
    write_json(out / CARD, card)
    return card


def _version() -> str:
    from stackcls import __version__
    return __version__


# ----------------------------------------------------------------------------- the card as a table

CARD_COLUMNS = (("exact range", "exact_range_rate"), ("boundary MAE", "boundary_mae"),
                ("F1 OAP", "f1.OAP"), ("F1 IN", "f1.IN"), ("F1 OBS", "f1.OBS"),
                ("accuracy", "accuracy"), ("soft acc.", "soft_accuracy"))


def _get(m, key):
    for k in key.split("."):
        m = m.get(k) if isinstance(m, dict) else None
    return m


def _cell(m, key) -> str:
    v = _get(m, key)
    if v is None:
        return "-"
    sd = _get(m.get("fold_sd") or {}, key) if isinstance(m, dict) else None
    return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def card_table(card: dict) -> str:
    """The card's numbers as markdown: one row per mode and the trivial row, with the spread
    over folds (± the standard deviation of the per-fold values) where the card has it."""
    lines = [f"Model `{card['name']}` version {card['version']}"
             + (" (**stand-in**: a tiny synthetic run, not the trained release)" if card.get("stand_in") else "")
             + f", sha256 `{card['sha256']}`, {card['bytes']:,} bytes ({card['dtype']}).",
             "", f"Evaluation: {card['evaluation']}; training data: {card['training_data']['name']}, "
             f"{card['training_data'].get('stacks')} stacks; selected: "
             f"{card['selected'].get('epochs')} epochs.", "",
             "| mode | " + " | ".join(c for c, _ in CARD_COLUMNS) + " |",
             "|---|" + "---|" * len(CARD_COLUMNS)]
    rows = [(m, card["metrics"].get(m)) for m in ("slice", "slice_ordered", "stack")]
    rows.append(("every slice IN", card["trivial"]))
    for mode, m in rows:
        if m is not None:
            lines.append(f"| {mode} | " + " | ".join(_cell(m, k) for _, k in CARD_COLUMNS) + " |")
    d = card.get("direction") or {}
    acc = (d.get("cv_accuracy") or {}).get(str(d.get("C")))
    if acc is not None:
        lines += ["", f"Direction of stacks of unknown orientation (the direction model alone, "
                      f"subject-level CV over the {d.get('n_stacks')} stacks shown both ways): "
                      f"accuracy {acc:.3f}."]
    if card.get("calibration"):
        lines += ["", "Temperatures of the range probabilities: " + ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(card["calibration"].items())) + "."]
    lines += ["", f"Command: `{card['command']}`"]
    return "\n".join(lines)


def update_doc(doc, card: dict) -> Path:
    """Replace the text between the card-table markers of `doc` with `card_table(card)`."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")
    a, b = text.find(DOC_START), text.find(DOC_END)
    if a < 0 or b < a:
        raise ValueError(f"{doc}: no '{DOC_START}' ... '{DOC_END}' markers to put the table between")
    doc.write_text(text[:a + len(DOC_START)] + "\n" + card_table(card) + "\n" + text[b:], encoding="utf-8")
    return doc
