"""Saving and restoring trained models: the single-slice classifier and the stack head.

A saved model is a folder holding `config.json` (everything needed to rebuild the module; for the
classifier: backbone name, input size, options, preprocessing) and `state/` (an orbax checkpoint of
every variable, the classifier's backbone included, so restoring never needs the original weight
file). `config.json` is written last, atomically: a folder without it is not a saved model, so an
interrupted save is never mistaken for a finished one. Loading a run directory's models for
prediction is `stackcls.predict.load.load_model`.

A malformed `config.json` or checkpoint raises `ModelFileError` (a ValueError) naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from stackcls import parallel
from stackcls.atomic import write_json
from stackcls.io.errors import ModelFileError
from stackcls.models.classifier import Classifier, rebuild
from stackcls.models.direction import FILE as DIRECTION_FILE
from stackcls.models.direction import DirectionModel
from stackcls.models.stack_head import StackHead, StackModel
from stackcls.train.calibration import FILE as CALIBRATION_FILE
from stackcls.train.calibration import Calibration


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    try:
        blob = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{f}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{f}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict):
        raise ModelFileError(f"{f}: expected a JSON object, got {type(blob).__name__}")
    return blob


def _restore(path: Path, abs_state):
    try:
        return ocp.StandardCheckpointer().restore(path / "state", abs_state)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged or foreign checkpoint
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelFileError(f"{path / 'state'}: checkpoint does not restore (damaged, or not the "
                             f"architecture config.json describes; {type(e).__name__}: {why})") from None


def _save(path, module: nnx.Module, config: dict) -> Path:
    """`path/state` (orbax) from `module`, then `path/config.json` (the completion mark)."""
    path = Path(path).absolute()
    if not parallel.is_writer():        # every process holds the same model; process 0 saves it
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)
    target = path / "state"
    if target.exists():
        shutil.rmtree(target)
    # a multi-process run: orbax's multi-process support, with process 0 the only one taking part
    ckpt = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=0, active_processes={0})) if jax.process_count() > 1 else ocp.StandardCheckpointer()
    ckpt.save(target, nnx.state(module))
    ckpt.wait_until_finished()
    write_json(path / "config.json", config)
    return path


def save_module(path, module: nnx.Module, config: dict) -> Path:
    """Any module's state (orbax) with a JSON record of what it is (e.g. a CV fold's model at an
    epoch); the record, written last, marks the save complete."""
    return _save(path, module, config)


def restore_into(path, module: nnx.Module) -> nnx.Module:
    """The state saved at `path` in a module of the same architecture (`module`'s own values are
    only its shapes)."""
    graphdef, state0 = nnx.split(module)
    abs_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state0)
    return nnx.merge(graphdef, _restore(Path(path).absolute(), abs_state))


def is_saved(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "state").is_dir()


def save_model(path, model: Classifier, config: dict) -> Path:
    """Write `path/config.json` and `path/state` (orbax). `config` needs at least backbone,
    input_size; options (dict) and anything else JSON-able are kept."""
    for k in ("backbone", "input_size"):
        if k not in config:
            raise ValueError(f"save_model: config lacks {k!r}")
    return _save(path, model, config)


def restore_model(path) -> tuple[Classifier, dict]:
    """(classifier, config) saved by `save_model`."""
    path = Path(path).absolute()
    if not is_saved(path):
        raise FileNotFoundError(f"{path}: not a saved model (needs config.json and state/)")
    config = _read_config(path)
    # concrete build (the ports initialise on the host, which eval_shape cannot trace); the
    # restored arrays replace every variable
    try:
        template = rebuild(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path / 'config.json'}: does not describe a classifier "
                             f"({type(e).__name__}: {e})") from None
    return restore_into(path, template), config


def save_stack_model(path, model: StackModel) -> Path:
    """Write `path/config.json` (architecture and training record) and `path/state` (orbax)."""
    return _save(path, model.head, dict(config=model.config, info=model.info))


def load_stack_model(path) -> StackModel:
    """The stack head saved by `save_stack_model`."""
    path = Path(path).absolute()
    if not is_saved(path):
        raise FileNotFoundError(f"{path}: not a saved stack model (needs config.json and state/)")
    blob = _read_config(path)
    try:
        c = blob["config"]
        abstract = nnx.eval_shape(lambda: StackHead(int(c["in_features"]), int(c["hidden"]),
                                                    float(c["dropout"]), bool(c.get("residual", False)),
                                                    rngs=nnx.Rngs(0)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path / 'config.json'}: does not describe a stack head "
                             f"({type(e).__name__}: {e})") from None
    graphdef, abs_state = nnx.split(abstract)
    state = _restore(path, abs_state)
    return StackModel(nnx.merge(graphdef, state), c, blob.get("info"))


def save_anatomy_model(path, ensemble, config: dict) -> Path:
    """method=anatomy's fold models (stackcls.models.anatomy.Ensemble) and their config: backbone, number
    of folds, the AnatomyConfig ("anatomy"), localise_size, selected epoch."""
    for k in ("backbone", "folds", "anatomy"):
        if k not in config:
            raise ValueError(f"save_anatomy_model: config lacks {k!r}")
    return _save(path, ensemble, config)


def restore_anatomy_model(path):
    """(Ensemble, config) saved by `save_anatomy_model`."""
    from stackcls.models.anatomy import AnatomyConfig, Ensemble, build_net
    path = Path(path).absolute()
    if not is_saved(path):
        raise FileNotFoundError(f"{path}: not a saved anatomy model (needs config.json and state/)")
    config = _read_config(path)
    try:
        cfg = AnatomyConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in config["anatomy"].items()})
        ens = Ensemble([build_net(config["backbone"], cfg) for _ in range(int(config["folds"]))])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path / 'config.json'}: does not describe an anatomy model "
                             f"({type(e).__name__}: {e})") from None
    return restore_into(path, ens), config


def restore_setting(d):
    """The trained model a setting folder of a run holds, from its checkpoints: final/ (the
    classifier, or method=anatomy's ensemble) with the stack head, direction model and
    temperatures saved in stack/ beside it; a bare saved model folder loads as itself. What
    stackcls.predict.load converts into the one model format."""
    from stackcls.models.anatomy import AnatomyModel
    from stackcls.models.classifier import TrainedModel
    d = Path(d)
    final, stack_dir = (d, None) if is_saved(d) and not (d / "final").exists() else (d / "final", d / "stack")
    anatomy = "anatomy" in _read_config(final)   # save_anatomy_model's config; never a classifier's
    head = direction = calibration = None
    if stack_dir is not None:
        if (stack_dir / "config.json").is_file():
            head = load_stack_model(stack_dir)
        try:
            if (stack_dir / DIRECTION_FILE).is_file():
                direction = DirectionModel.load(stack_dir)
            if (stack_dir / CALIBRATION_FILE).is_file():
                calibration = Calibration.load(stack_dir)
        except ValueError as e:          # its message names the file
            raise ModelFileError(str(e)) from None
    if anatomy:
        ensemble, config = restore_anatomy_model(final)
        return AnatomyModel(ensemble, config, head, final.parent, direction, calibration)
    model, config = restore_model(final)
    return TrainedModel(model, config, head, d, direction, calibration)
