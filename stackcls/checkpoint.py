"""Saving and restoring trained classifiers (orbax), and `load_model(run_dir)`.

A saved model is a folder holding `config.json` (everything needed to rebuild the module: backbone
name, input size, options, preprocessing) and `state/` (an orbax checkpoint of every variable of
the classifier, backbone included, so restoring never needs the original weight file).

Run directory layout (written by experiments/run.py):
    run.json                      the run's configuration (a resumed run must match it)
    results.json, results.md      results; figures *.png
    depth0/ depth1/ scratch/      one folder per setting:
        cv/<job>.npz              per CV job: curves, out-of-fold probabilities/features
        final/                    the final model (config.json + state/)
        stack/                    the stack-aware head (stackcls.stack_model)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.models import Classifier, build_classifier

SETTINGS_ORDER = ("scratch", "depth0", "depth1")  # load_model picks the last one present


def write_json(path, obj) -> None:
    """Atomic JSON write (temp file then rename): an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_model(path, model: Classifier, config: dict) -> Path:
    """Write `path/config.json` and `path/state` (orbax). `config` needs at least backbone,
    input_size; options (dict) and anything else JSON-able are kept."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    for k in ("backbone", "input_size"):
        if k not in config:
            raise ValueError(f"save_model: config lacks {k!r}")
    path.mkdir(parents=True, exist_ok=True)
    target = path / "state"
    if target.exists():
        shutil.rmtree(target)
    (path / "config.json").unlink(missing_ok=True)  # config.json written last marks completion
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(target, nnx.state(model))
    ckpt.wait_until_finished()
    write_json(path / "config.json", config)
    return path


def is_saved(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "state").is_dir()


def rebuild(config: dict) -> Classifier:
    """An untrained classifier with the architecture a config describes."""
    from stackcls import backbones

    bb = backbones.create(config["backbone"], weights=None, input_size=int(config["input_size"]),
                          **config.get("options", {}))
    return build_classifier(bb, int(config["input_size"]))


def restore_model(path) -> tuple[Classifier, dict]:
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_saved(path):
        raise FileNotFoundError(f"{path}: not a saved model (needs config.json and state/)")
    config = json.loads((path / "config.json").read_text())
    # concrete build (the ports initialise on the host, which eval_shape cannot trace); the
    # restored arrays replace every variable
    graphdef, state0 = nnx.split(rebuild(config))
    abs_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state0)
    state = ocp.StandardCheckpointer().restore(path / "state", abs_state)
    return nnx.merge(graphdef, state), config


@dataclasses.dataclass
class TrainedModel:
    """A trained single-slice classifier (+ optional stack head), ready for `predict_stack`.

    preprocess(images (S, H, W)) -> model input (S, size, size, 3) (window, crop, resize).
    slice_outputs(x) -> (penultimate (S, 256), probs (S, 3)); pure and jitted, so it composes
    into a larger jit.
    """

    model: Classifier
    config: dict
    stack_head: object | None = None
    path: Path | None = None
    direction: object | None = None     # stackcls.direction.DirectionModel, for unknown orientation

    def __post_init__(self):
        graphdef, state = nnx.split(self.model)
        self._state = state

        @jax.jit
        def outputs(state, x):
            m = nnx.merge(graphdef, state, copy=True)
            pen = m.head.penultimate(m.features(jnp.asarray(x, jnp.float32)))
            return pen, jax.nn.softmax(m.head.logits(pen), axis=-1)

        self._outputs = outputs

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    def preprocess(self, images) -> np.ndarray:
        from stackcls.preprocess import to_model_input

        return to_model_input(images, self.input_size, keep=float(self.config.get("keep", 0.6)))

    def slice_outputs(self, x):
        return self._outputs(self._state, x)

    def logits(self, x):
        return self.model(jnp.asarray(x, jnp.float32))


def setting_dirs(run_dir) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {s: run_dir / s for s in SETTINGS_ORDER if is_saved(run_dir / s / "final")}


def load_model(run_dir, setting: str | None = None, stack: bool = True) -> TrainedModel:
    """The final model of a run directory: the deepest setting present (depth1 > depth0 >
    scratch) unless `setting` names one, with its stack head when one was trained."""
    run_dir = Path(run_dir)
    if is_saved(run_dir) and not (run_dir / "final").exists():  # a model folder itself
        model, config = restore_model(run_dir)
        return TrainedModel(model, config, None, run_dir)
    found = setting_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no trained model (expected depth0/final, depth1/final "
                                "or scratch/final written by `python -m experiments.run`)")
    if setting is None:
        setting = list(found)[-1]
    if setting not in found:
        raise FileNotFoundError(f"{run_dir}: no final model for {setting!r} (have {list(found)})")
    d = found[setting]
    model, config = restore_model(d / "final")
    head = direction = None
    if stack and (d / "stack" / "config.json").is_file():
        from stackcls.stack_model import load_stack_model

        head = load_stack_model(d / "stack")
    if (d / "stack" / "direction.json").is_file():
        from stackcls.direction import DirectionModel

        direction = DirectionModel.load(d / "stack")
    return TrainedModel(model, config, head, d, direction)
