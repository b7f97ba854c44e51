"""Read Keras weight files with h5py (no Keras) and load them strictly into a port.

Layouts read:
- legacy Keras 2 HDF5 (what keras.applications downloads): root attr `layer_names`, each layer
  group has `weight_names` (`conv1/kernel:0`) in storage order; iterate those, not the group keys
  (HDF5 sorts keys, so `beta` would come before `gamma`). Some of those files were written by
  Keras 1 (VGG16: `block1_conv1_W_1:0`); their names are mapped to Keras 2's.
- Keras 3 full-model `.h5`: the same under `/model_weights`, names without `:0`.
- Keras 3 `.weights.h5`: `layers/<class_snake>[_k]/vars/<i>`, the layer's name in the attr
  `name` of `vars`; `k` counts layers of one class in `model.layers` order.

Matching (strict, never guesses): by layer name when the file's names are exactly the port's;
otherwise by position in `model.keras_order()` (what Keras's own load_weights does), or per class
for `.weights.h5`. Every weight of the file must be used, every variable of the port filled,
every shape equal, weight names must be those Keras uses for that slot, and layer names that are
not Keras auto-names (`conv2d_7`) must agree; any violation raises WeightsError naming the file,
the layer and the weight. Nothing is assigned unless everything matches.

Hostile files: a weight is read only from a plain dataset stored inside the file itself. External
links, datasets with external storage (raw data in another file, which HDF5 would read) and
virtual datasets are refused before any data is read, and so are non-float dtypes (integer,
bool, complex, compound: Keras weights are float) and datasets over MAX_ELEMENTS elements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.models.backbones import layers as L


class WeightsError(ValueError):
    pass


# Largest weight array accepted (elements): VGG16's fc1, the largest Keras Applications array,
# has 102.8 M; 2**28 (1 GiB as float32) refuses a header declaring absurd shapes before allocation.
MAX_ELEMENTS = 1 << 28


def _array(parent: h5py.Group, key: str, path: Path, what: str) -> np.ndarray:
    """parent[key] as an array, refusing anything but a float dataset stored inside `path`."""
    where = f"{path}: {what}"
    if isinstance(parent.get(key, getlink=True), h5py.ExternalLink):
        raise WeightsError(f"{where} is an external link to another file; refused")
    ds = parent[key]
    if not isinstance(ds, h5py.Dataset):
        raise WeightsError(f"{where} is not a dataset")
    where = f"{path}: {what} (dataset {ds.name})"
    if ds.file.filename != parent.file.filename:
        raise WeightsError(f"{where} lives in another file ({ds.file.filename}); refused")
    if ds.is_virtual:
        raise WeightsError(f"{where} is a virtual dataset (data from other files); refused")
    if ds.external:
        raise WeightsError(f"{where} has external storage ({[e[0] for e in ds.external]}); "
                           "refused")
    if ds.dtype.kind != "f":
        raise WeightsError(f"{where} has dtype {ds.dtype}, not floating point; refused")
    if ds.size > MAX_ELEMENTS:
        raise WeightsError(f"{where} declares shape {ds.shape} ({ds.size} elements, more than "
                           f"{MAX_ELEMENTS}); refused")
    try:
        return np.asarray(ds[()])
    except (OSError, ValueError) as e:
        raise WeightsError(f"{where} could not be read ({e})") from e


@dataclass
class FileLayer:
    name: str
    weights: list[tuple[str, np.ndarray]]  # (short weight name, array), storage order
    kind: str | None = None  # Keras class (snake case) when the file says it (.weights.h5)
    index: int = 0  # position among layers of that class (.weights.h5)


# Names Keras gives unnamed layers (Keras 2/3, and Keras 1 in older files): session-dependent.
_AUTO_NAME = re.compile(
    r"^(conv2d|batch_normalization|dense|depthwise_conv2d|separable_conv2d|convolution2d|"
    r"batchnormalization|separableconvolution2d)(_\d+)?$")

_KIND = {L.Conv2D: "conv2d", L.BatchNorm: "batch_normalization", L.Dense: "dense",
         L.DepthwiseConv2D: "depthwise_conv2d", L.SeparableConv2D: "separable_conv2d"}


def _s(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


# Keras 1 weight names (still inside files Keras Applications ships, e.g. VGG16's
# "block1_conv1_W_1:0"), as their Keras 2 equivalents. Keras 1's BatchNorm "running_std" held the
# variance; Keras 2 and 3 load it as moving_variance unchanged, and so do we.
_KERAS1 = {"W": "kernel", "b": "bias", "running_mean": "moving_mean",
           "running_std": "moving_variance"}


def _short(weight_name: str, layer_name: str = "") -> str:
    """'conv1/kernel:0' -> 'kernel'; Keras 1 'block1_conv1_W_1:0' -> 'kernel'."""
    n = weight_name.split("/")[-1].split(":")[0]
    if layer_name and n.startswith(layer_name + "_"):
        n = n[len(layer_name) + 1:]
    n = re.sub(r"_\d+$", "", n)
    return _KERAS1.get(n, n)


def _read_legacy(group: h5py.Group, path: Path) -> list[FileLayer]:
    out = []
    for lname in (_s(n) for n in group.attrs["layer_names"]):
        g = group[lname]
        wnames = [_s(n) for n in g.attrs.get("weight_names", [])]
        ws = []
        for wn in wnames:
            if wn not in g:
                raise WeightsError(f"{path}: layer {lname!r} lists weight {wn!r} but has no such dataset")
            ws.append((_short(wn, lname), _array(g, wn, path, f"layer {lname!r} weight {wn!r}")))
        n_datasets = []
        g.visititems(lambda k, o: n_datasets.append(k) if isinstance(o, h5py.Dataset) else None)
        if len(n_datasets) != len(wnames):
            raise WeightsError(f"{path}: layer {lname!r} holds datasets {sorted(n_datasets)} but "
                               f"weight_names lists {wnames}")
        out.append(FileLayer(lname, ws))
    return out


def _read_weights_h5(f: h5py.File, path: Path) -> list[FileLayer]:
    out = []
    for key, g in f["layers"].items():
        if "vars" not in g or len(g["vars"]) == 0:
            continue
        if any(k != "vars" for k in g.keys()):
            raise WeightsError(f"{path}: nested layer {key!r} (sub-layers {list(g.keys())}) is not "
                               "supported; save the backbone itself, not a model containing it")
        v = g["vars"]
        ws = [(str(i), _array(v, str(i), path, f"layer {key!r} var {i}")) for i in range(len(v))]
        m = re.match(r"^(.*?)(?:_(\d+))?$", key)
        out.append(FileLayer(_s(v.attrs.get("name", key)), ws, m.group(1), int(m.group(2) or 0)))
    return out


def read_keras_weights(path) -> list[FileLayer]:
    """All layers that carry weights, in the file's order (by class, then index, for .weights.h5)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"{path} is not a readable HDF5 file ({e})") from e
    with f:
        if "layer_names" in f.attrs:
            layers = _read_legacy(f, path)
        elif "model_weights" in f and "layer_names" in f["model_weights"].attrs:
            layers = _read_legacy(f["model_weights"], path)
        elif "layers" in f:
            layers = _read_weights_h5(f, path)
            layers.sort(key=lambda l: (l.kind, l.index))
        else:
            raise WeightsError(f"{path}: not a Keras weight file (no layer_names, model_weights or "
                               "layers/ group)")
    return [l for l in layers if l.weights]


def _port_layers(model) -> list[L.KerasLayer]:
    by_name = L.keras_layers(model)
    if hasattr(model, "keras_order"):
        order = model.keras_order()
        missing = set(by_name) - set(order)
        unknown = [n for n in order if n not in by_name]
        if missing or unknown:
            raise WeightsError(f"{type(model).__name__}.keras_order() is inconsistent: layers not "
                               f"listed {sorted(missing)[:5]}, unknown names {unknown[:5]}")
        layers = [by_name[n] for n in order]
    else:
        layers = L.creation_order(by_name.values())
    return [l for l in layers if l.keras_weights()]


def _pair(file_layers, port_layers, path):
    """Pairs (FileLayer, KerasLayer) and the strategy used."""
    fnames = [l.name for l in file_layers]
    pnames = [l.name for l in port_layers]
    if len(set(fnames)) == len(fnames) and set(fnames) == set(pnames):
        by = {l.name: l for l in port_layers}
        return [(fl, by[fl.name]) for fl in file_layers], "name"
    if len(file_layers) != len(port_layers):
        extra = sorted(set(fnames) - set(pnames))[:5]
        absent = sorted(set(pnames) - set(fnames))[:5]
        raise WeightsError(f"{path}: {len(file_layers)} layers with weights in the file, "
                           f"{len(port_layers)} in the model (file-only names {extra}, "
                           f"model-only names {absent})")
    if file_layers and file_layers[0].kind is not None:
        pairs = []
        by_kind: dict[str, list] = {}
        for pl in port_layers:
            by_kind.setdefault(_KIND[type(pl)], []).append(pl)
        seen: dict[str, int] = {}
        for fl in file_layers:
            k = seen.get(fl.kind, 0)
            seen[fl.kind] = k + 1
            cands = by_kind.get(fl.kind, [])
            if k >= len(cands):
                raise WeightsError(f"{path}: layer {fl.name!r} is a {fl.kind} but the model has only "
                                   f"{len(cands)} of those")
            pairs.append((fl, cands[k]))
        return pairs, "class"
    return list(zip(file_layers, port_layers)), "order"


def match_weights(model, file_layers: list[FileLayer], path="<weights>"):
    """Validated list of (variable, array) assignments; raises WeightsError on any mismatch."""
    port_layers = _port_layers(model)
    pairs, how = _pair(file_layers, port_layers, path)
    out = []
    for i, (fl, pl) in enumerate(pairs):
        where = f"{path}: layer #{i} {fl.name!r} (model layer {pl.name!r}, {type(pl).__name__})"
        if (how != "name" and fl.name != pl.name and not _AUTO_NAME.match(fl.name)
                and not _AUTO_NAME.match(pl.name)):
            raise WeightsError(f"{where}: names differ (matched by {how})")
        if how == "class" and fl.kind != _KIND[type(pl)]:
            raise WeightsError(f"{where}: file layer is a {fl.kind}")
        vars_, names = pl.keras_weights(), pl.keras_weight_names()
        if len(fl.weights) != len(vars_):
            raise WeightsError(f"{where}: the file has {len(fl.weights)} weights "
                               f"{[n for n, _ in fl.weights]}, the model {len(vars_)} "
                               f"{[n[0] for n in names]}")
        for (wname, arr), var, ok in zip(fl.weights, vars_, names):
            if not wname.isdigit() and wname not in ok:
                raise WeightsError(f"{where}: weight {wname!r} where the model expects {ok[0]!r}")
            if tuple(arr.shape) != tuple(var[...].shape):
                raise WeightsError(f"{where}: weight {wname!r} has shape {tuple(arr.shape)}, the "
                                   f"model expects {tuple(var[...].shape)}")
            if not np.all(np.isfinite(arr)):
                raise WeightsError(f"{where}: weight {wname!r} contains NaN or inf")
            out.append((var, arr))
    return out


def load_keras_weights(model, path) -> nnx.Module:
    """Fill `model` in place from a Keras weight file (any layout above); returns the model."""
    path = Path(path)
    assignments = match_weights(model, read_keras_weights(path), path)
    for var, arr in assignments:
        var[...] = jnp.asarray(arr, dtype=var[...].dtype)
    return model
