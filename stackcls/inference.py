"""Inference with a classifier: frozen-backbone passes over a dataset, and trained models ready
for `predict_stack`.

    extract(model, x, "features" | "carry", views=V)  the frozen backbone once over images: pooled
                                                      features or trunk outputs, optionally for V
                                                      randomly rotated views per image
    pooled_features(model, carries)                   trunk outputs -> pooled features
    predict_outputs(model, inputs, stage)             (logits, penultimate) of a stage's inputs
    load_model(run_dir) -> TrainedModel               a run's final model (+ stack head, direction);
                                                      load_model() / load_model("default"): the
                                                      model the package ships (stackcls.pretrained)

Every pass over a dataset goes through `stackcls.batching.map_chunks` (fixed chunk shape, last
chunk padded), so each runs one compiled function per shape.

Run directory layout (written by `python -m experiments.run`):
    run.json                      the run's configuration (a resumed run must match it)
    results.json, results.md      results; figures *.png
    depth0/ depth1/ scratch/      one folder per setting:
        cv/<job>.npz              per CV job: curves, out-of-fold probabilities/features
        final/                    the final model (checkpoint.save_model)
        stack/                    the stack-aware head (checkpoint.save_stack_model), the
                                  direction model (direction.json) and the temperatures of the
                                  range probabilities (calibration.json)
    anatomy/                      method=anatomy instead of the settings: cv/fold<k>/ (each fold's
                                  models and validation outputs), final/ (the fold models at the
                                  selected epoch: the ensemble), stack/ (as above)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stackcls.augment import random_rotation
from stackcls.batching import map_chunks
from stackcls.calibration import FILE as CALIBRATION_FILE
from stackcls.calibration import Calibration
from stackcls.checkpoint import (ModelFileError, is_saved, load_stack_model, restore_anatomy_model,
                                 restore_model)
from stackcls.direction import FILE as DIRECTION_FILE
from stackcls.direction import DirectionModel
from stackcls.models import Classifier
from stackcls.preprocess import to_model_input
from stackcls.progress import bar as tqdm
from stackcls.stack_model import StackModel

SETTINGS_ORDER = ("scratch", "depth0", "depth1")  # load_model picks the last one present
ANATOMY = "anatomy"    # method=anatomy's folder; a run has either it or the paper's settings
DEFAULT = "default"    # load_model's name for the shipped model


def extract(model: Classifier, x: np.ndarray, what: str, views: int = 0, seed: int = 0,
            max_degrees: float = 45.0, chunk: int = 32, desc: str = "extract"):
    """Run the frozen backbone once over `x` (N, H, W, 3) RGB 0..255.

    what: "features" (pooled last-block output, (N, D)) or "carry" (trunk output, a pytree).
    views: 0 = the images as they are; V > 0 = V randomly rotated views per image, stacked on
    axis 1 ((N, V, ...)); view v of image n uses a key derived from (seed, v, n // chunk).
    Returns device arrays.
    """
    graphdef, state = nnx.split(model)
    base = jax.random.PRNGKey(seed)

    @jax.jit
    def run(state, xb, key):
        m = nnx.merge(graphdef, state, copy=True)
        xb = xb.astype(jnp.float32)
        if views > 0:
            xb = random_rotation(key, xb, max_degrees)
        carry = m.trunk(xb)
        return m.pooled(carry) if what == "features" else carry

    outs = []
    with tqdm(total=len(x) * max(views, 1), desc=desc, unit="img", leave=False) as bar:
        for v in range(max(views, 1)):
            view_key = jax.random.fold_in(base, v)
            outs.append(map_chunks(lambda xb, i: run(state, xb, jax.random.fold_in(view_key, i)),
                                   x, chunk, with_index=True, bar=bar))
    if views == 0:
        return outs[0]
    return jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outs)


def pooled_features(model: Classifier, carries, views: bool = False, chunk: int = 64):
    """Pooled last-block features from cached trunk outputs: (N, ...) -> (N, D), or with views
    (N, V, ...) -> (N, V, D). One trunk pass (`extract(..., "carry")`) then serves both depths."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, c):
        return nnx.merge(graphdef, state, copy=True).pooled(c)

    lead = jax.tree.leaves(carries)[0].shape[:2]
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), carries) if views else carries
    # unpadded last chunk: the recorded results (and so the selections made on them) were computed so
    out = map_chunks(lambda c: run(state, c), flat, chunk, pad=False)
    return out.reshape(lead + out.shape[1:]) if views else out


def predict_outputs(model: Classifier, x, stage: str = "image", chunk: int = 64):
    """Inference on inputs of a stage -> (logits (N, 3), penultimate (N, 256)) as numpy."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xb):
        m = nnx.merge(graphdef, state, copy=True)
        pen = m.head.penultimate(m.stage_features(xb, stage))
        return m.head.logits(pen), pen

    logits, pen = map_chunks(lambda xb: run(state, xb), x, chunk)
    return np.array(logits), np.array(pen)


@dataclasses.dataclass
class TrainedModel:
    """A trained single-slice classifier (+ optional stack head), ready for `predict_stack`.

    preprocess(images (S, H, W)) -> model input (S, size, size, 3) (window, crop, resize).
    slice_outputs(x) -> (penultimate (S, 256), probs (S, 3)); pure and jitted, so it composes
    into a larger jit.
    """

    model: Classifier
    config: dict
    stack_head: StackModel | None = None
    path: Path | None = None
    direction: DirectionModel | None = None     # for stacks of unknown orientation
    calibration: Calibration | None = None      # temperatures of the range probabilities

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

    def preprocess(self, images, spacing=None) -> np.ndarray:
        """The paper's input: a fixed fraction of the pixels, whatever their size (spacing unused)."""
        return to_model_input(images, self.input_size, keep=float(self.config.get("keep", 0.6)))

    def slice_outputs(self, x):
        return self._outputs(self._state, x)

    def logits(self, x):
        return self.model(jnp.asarray(x, jnp.float32))


def setting_dirs(run_dir) -> dict[str, Path]:
    """The settings of a run directory that have a final model, in SETTINGS_ORDER."""
    run_dir = Path(run_dir)
    return {s: run_dir / s for s in SETTINGS_ORDER if is_saved(run_dir / s / "final")}


def load_model(run_dir=None, setting: str | None = None, stack: bool = True) -> TrainedModel:
    """The final model of a run directory: the deepest setting present (depth1 > depth0 >
    scratch) unless `setting` names one, with its stack head when one was trained (and stack is
    true) and its direction model when one was fitted; a method=anatomy run gives its ensemble
    (stackcls.anatomy.AnatomyModel). A saved model folder loads as itself, a model file
    (stackcls.pretrained's .npz) too.
    No argument, or "default": the model shipped in the package (loaded once per process, its
    hash checked; a folder named default is reached as "./default").
    Malformed files raise `ModelFileError` (stackcls.io.errors) naming the file."""
    from stackcls import pretrained
    if run_dir is None or (isinstance(run_dir, str) and run_dir == DEFAULT):
        return pretrained.load_default()
    run_dir = Path(run_dir)
    if run_dir.suffix == ".npz" and run_dir.is_file():
        return pretrained.load(run_dir)
    if is_saved(run_dir) and not (run_dir / "final").exists():
        if _is_anatomy(run_dir):
            return _load_anatomy(run_dir, None, False)
        model, config = restore_model(run_dir)
        return TrainedModel(model, config, None, run_dir)
    if is_saved(run_dir / ANATOMY / "final") and setting in (None, ANATOMY):
        return _load_anatomy(run_dir / ANATOMY / "final", run_dir / ANATOMY / "stack", stack)
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
    head, direction = _stack_parts(d / "stack", stack)
    return TrainedModel(model, config, head, d, direction, _calibration(d / "stack"))


def _stack_parts(d: Path, stack: bool):
    """(stack head or None, direction model or None) saved in a setting's stack/ folder."""
    head = direction = None
    if stack and (d / "config.json").is_file():
        head = load_stack_model(d)
    if (d / DIRECTION_FILE).is_file():
        try:
            direction = DirectionModel.load(d)
        except ValueError as e:          # its message names the file
            raise ModelFileError(str(e)) from None
    return head, direction


def _calibration(d: Path):
    """The temperatures of the range probabilities saved in a stack/ folder, or None."""
    if not (d / CALIBRATION_FILE).is_file():
        return None
    try:
        return Calibration.load(d)
    except ValueError as e:          # its message names the file
        raise ModelFileError(str(e)) from None


def _is_anatomy(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("method") == ANATOMY
    except (OSError, ValueError, AttributeError):
        return False


def _load_anatomy(final: Path, stack_dir: Path | None, stack: bool):
    """method=anatomy's ensemble (stackcls.anatomy.AnatomyModel) with its stack head, direction
    model and calibration when saved beside it."""
    from stackcls.anatomy import AnatomyModel
    ensemble, config = restore_anatomy_model(final)
    head, direction = _stack_parts(stack_dir, stack) if stack_dir is not None else (None, None)
    calibration = _calibration(stack_dir) if stack_dir is not None else None
    return AnatomyModel(ensemble, config, head, final.parent, direction, calibration)
