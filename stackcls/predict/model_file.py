"""The one model format: every trained model, a run's or the shipped one, is one `.npz` file.

    save(path, model)      a TrainedModel (the paper's classifier) or an AnatomyModel (method=
                           anatomy's ensemble), with its stack head, direction model and
                           temperatures -> one file
    load(path)             the model saved by `save`; nothing else is read
    folder(path)           a model folder: model.npz, and card.json when it ships (hash checked)

The file is a zip of .npy arrays (readable with `np.load`, no pickle), written with fixed
timestamps so that the same model gives the same bytes and the same hash:
    meta.json          the manifest, uint8 bytes of a JSON object: format, kind ("classifier" |
                       "anatomy"), the network's config (backbone, input size, preprocessing),
                       `parts` (each part's config and the sha256 of its arrays), the stack head's
                       config and training record, the direction model's info, the temperatures,
                       provenance (name, version, the run it came from)
    network/<path>     every variable of the classifier, or ensemble/<path> of the K fold networks
                       (float32, or float16 for an anatomy ensemble)
    stack_head/<path>  every variable of the stack head (float32)
    direction/{mean,std,weights}
Loading is strict: every variable of the rebuilt modules must be in the file with its shape and
the file may hold nothing else; float16 weights are widened to the modules' float32. Format 1
(the shipped model's file, anatomy only, written before the classifier kind and the part hashes)
loads unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from stackcls.io.errors import ModelFileError

WEIGHTS = "model.npz"
CARD = "card.json"
MANIFEST = "meta.json"
FORMAT = 2
READS = (1, 2)
DTYPES = ("float32", "float16")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)       # fixed: the same model writes the same bytes
# the network's prefix in the file, by kind
NETWORK = {"classifier": "network/", "anatomy": "ensemble/"}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _arrays_hash(arrays: dict, prefix: str) -> str:
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k.startswith(prefix)):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flat(module) -> dict[str, np.ndarray]:
    from flax import nnx
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module))}


def _fill(module, arrays: dict, prefix: str, where: Path):
    """Every variable of `module` from arrays[prefix + path], shapes checked, cast to the
    module's dtype; returns the names used."""
    import jax
    from flax import nnx
    state = nnx.state(module)
    used = set()
    for p, v in nnx.to_flat_state(state):
        name = prefix + "/".join(map(str, p))
        want = v.get_value()
        if name not in arrays:
            raise ModelFileError(f"{where}: {name} is missing (not the architecture {MANIFEST} describes)")
        a = arrays[name]
        if a.shape != want.shape:
            raise ModelFileError(f"{where}: {name} has shape {a.shape}, the model wants {want.shape}")
        # device_put, not jnp.asarray: in this JAX the latter stages one small program per shape
        v.set_value(jax.device_put(np.asarray(a, want.dtype)))
        used.add(name)
    nnx.update(module, state)
    return used


def kind_of(model) -> str:
    return "anatomy" if hasattr(model, "ensemble") else "classifier"


# ----------------------------------------------------------------------------- writing

def save(path, model, dtype: str = "float32", extra: dict | None = None) -> Path:
    """Write a trained model and its parts as one .npz file (atomically). dtype: of an anatomy
    ensemble's floating arrays ("float16" halves the file); everything else stays float32.
    extra: JSON-able provenance kept in the manifest."""
    from stackcls.atomic import jsonable, replace_atomically
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kind = kind_of(model)
    if kind == "classifier" and dtype != "float32":
        raise ValueError("a classifier is saved in float32")
    net = NETWORK[kind]
    arrays = {}
    for k, a in _flat(model.ensemble if kind == "anatomy" else model.model).items():
        arrays[net + k] = a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a
    head, direction, cal = model.stack_head, model.direction, model.calibration
    parts = {net.rstrip("/"): dict(config=model.config)}
    if head is not None:
        arrays.update({"stack_head/" + k: a for k, a in _flat(head.head).items()})
        parts["stack_head"] = dict(config=head.config, info=head.info)
    if direction is not None:
        arrays.update({"direction/mean": direction.mean, "direction/std": direction.std,
                       "direction/weights": direction.weights})
        parts["direction"] = dict(info=direction.info)
    for name, part in parts.items():
        part["sha256"] = _arrays_hash(arrays, name + "/")
    meta = dict(format=FORMAT, kind=kind, dtype=dtype, config=model.config, parts=parts,
                stack_head=parts.get("stack_head"), direction=parts.get("direction"),
                calibration=None if cal is None else dict(temperatures=cal.temperatures, info=cal.info),
                **(extra or {}))
    arrays[MANIFEST] = np.frombuffer(json.dumps(meta, sort_keys=True, default=jsonable)
                                     .encode(), np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(name + ".npy", _ZIP_TIME), buf.getvalue(),
                       compress_type=zipfile.ZIP_DEFLATED)
    return path


# ----------------------------------------------------------------------------- reading

def read(path) -> tuple[dict, dict]:
    """(manifest, arrays) of a model file, the format checked; ModelFileError names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(MANIFEST).tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable stackcls model file ({type(e).__name__}: {e})") from None
    kinds = ("anatomy",) if isinstance(meta, dict) and meta.get("format") == 1 else tuple(NETWORK)
    if not isinstance(meta, dict) or meta.get("format") not in READS or meta.get("kind") not in kinds:
        got = (meta.get("format"), meta.get("kind")) if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: {MANIFEST} is not a stackcls model of format {READS} (got {got})")
    for name, part in (meta.get("parts") or {}).items():
        if _arrays_hash(arrays, name + "/") != part.get("sha256"):
            raise ModelFileError(f"{path}: the arrays of {name} do not match their sha256 in "
                                 f"{MANIFEST}: the file is damaged or was edited")
    return meta, arrays


def _network(kind: str, config: dict):
    """The untrained network a manifest's config describes."""
    if kind == "classifier":
        from stackcls.models.classifier import rebuild
        return rebuild(config)
    from flax import nnx

    from stackcls.models.anatomy import AnatomyConfig, Ensemble, build_net
    cfg = AnatomyConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                           for k, v in config["anatomy"].items()})
    one = build_net(config["backbone"], cfg)       # the folds share one architecture
    return Ensemble([one] + [nnx.clone(one) for _ in range(int(config["folds"]) - 1)])


def _built(kind: str, config: dict, arrays: dict, path: Path):
    """The network the config describes, every variable from the file's arrays (checked)."""
    from flax import nnx
    try:
        # built abstract (shapes only): every value is replaced by the file's, and a real random
        # initialisation of five networks would cost seconds of eager ops
        network = nnx.eval_shape(lambda: _network(kind, config))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: {MANIFEST} does not describe a {kind} model "
                             f"({type(e).__name__}: {e})") from None
    _fill(network, arrays, NETWORK[kind], path)
    return network


def _fold_weights(arrays: dict, folds: int, path: Path):
    """An anatomy file's K fold networks as FoldWeights (floats widened to the modules' float32):
    ensemble/nets/<k>/<name>, the same names and shapes for every k < folds."""
    from stackcls.models.anatomy import FoldWeights
    per: dict = {}
    for name in arrays:
        if name.startswith(NETWORK["anatomy"]):
            k, _, var = name[len(NETWORK["anatomy"] + "nets/"):].partition("/")
            if not name.startswith(NETWORK["anatomy"] + "nets/") or not k.isdigit() or not var:
                raise ModelFileError(f"{path}: {name} is not a variable of a fold network")
            per.setdefault(int(k), {})[var] = arrays[name]
    if sorted(per) != list(range(folds)):
        raise ModelFileError(f"{path}: holds fold networks {sorted(per)[:8]}, its {MANIFEST} "
                             f"says {folds} folds")
    names = tuple(sorted(per[0]))
    for k, net in per.items():
        if sorted(net) != list(names) or any(net[n].shape != per[0][n].shape for n in names):
            raise ModelFileError(f"{path}: fold network {k} does not have fold 0's variables")
    widen = [np.float32 if np.issubdtype(per[0][n].dtype, np.floating) else per[0][n].dtype
             for n in names]
    return FoldWeights(names, tuple(np.stack([np.asarray(per[k][n], t) for k in range(folds)])
                                    for n, t in zip(names, widen)))


def load(path):
    """The model saved by `save`: a TrainedModel or an AnatomyModel with every part it was saved
    with. A damaged file or one that does not fit the architecture its manifest describes raises
    ModelFileError naming the file."""
    from flax import nnx

    from stackcls import programs
    from stackcls.models.anatomy import AnatomyModel
    from stackcls.models.classifier import TrainedModel
    from stackcls.models.direction import DirectionModel
    from stackcls.models.stack_head import StackHead, StackModel
    from stackcls.train.calibration import Calibration
    path = Path(path)
    meta, arrays = read(path)
    kind = meta["kind"]
    head = direction = calibration = None
    try:
        config = meta["config"]
        folds = int(config["folds"]) if kind == "anatomy" else None
        if meta.get("stack_head"):
            hc = meta["stack_head"]["config"]
            head = nnx.eval_shape(lambda: StackHead(int(hc["in_features"]), int(hc["hidden"]),
                                                    float(hc["dropout"]), bool(hc.get("residual", False)),
                                                    rngs=nnx.Rngs(0)))
        if meta.get("direction"):
            direction = DirectionModel(arrays["direction/mean"], arrays["direction/std"],
                                       arrays["direction/weights"], meta["direction"].get("info"))
        cal = meta.get("calibration")
        calibration = None if cal is None else Calibration(
            {str(k): float(v) for k, v in cal["temperatures"].items()}, cal.get("info") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: {MANIFEST} does not describe a {kind} model "
                             f"({type(e).__name__}: {e})") from None
    if kind == "anatomy":
        weights = dataclasses.replace(_fold_weights(arrays, folds, path),
                                      build=lambda: _built(kind, config, arrays, path))
        # the modules are built (and the file checked against them) once per cache: a warm
        # process reads the variables straight into the traced programs (stackcls.programs)
        layout = json.dumps([config, [(n, a.shape[1:], a.dtype.str) for n, a in
                                      zip(weights.names, weights.stacked)]], sort_keys=True, default=str)
        network = None if programs.checked("anatomy-file", layout) else weights.build()
        used = {k for k in arrays if k.startswith(NETWORK[kind])}
    else:
        network = _built(kind, config, arrays, path)
        used = {NETWORK[kind] + "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(network))}
    if head is not None:
        used |= _fill(head, arrays, "stack_head/", path)
        head = StackModel(head, hc, meta["stack_head"].get("info"))
    if direction is not None:
        used |= {"direction/mean", "direction/std", "direction/weights"}
    extra = sorted(set(arrays) - used)
    if extra:
        raise ModelFileError(f"{path}: holds arrays the model does not have: {extra[:5]}")
    if kind == "anatomy":
        if network is not None:
            programs.mark_checked("anatomy-file", layout)
        model = AnatomyModel(network, config, head, path, direction, calibration, weights)
    else:
        model = TrainedModel(network, config, head, path, direction, calibration)
    model.default_mode = (meta.get("default_mode") or {}).get("mode")
    return model


def read_card(folder) -> dict:
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


def verify(folder) -> dict:
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


def folder(path):
    """The model in a model folder: its card's file after the hash check, or model.npz."""
    path = Path(path)
    if not (path / CARD).is_file():
        return load(path / WEIGHTS)
    card = verify(path)
    model = load(path / card.get("file", WEIGHTS))
    model.card = card
    # the card records the mode its cross-validation chose (train.selection.default_mode)
    model.default_mode = (card.get("default_mode") or {}).get("mode") or model.default_mode
    return model


def describe(model) -> str:
    """What a loaded model is, for output files: the card's name/version/hash or its path."""
    card = getattr(model, "card", None)
    if card:
        return f"{card.get('name')} {card.get('version')} (sha256 {card['sha256']})"
    return str(getattr(model, "path", None) or type(model).__name__)
