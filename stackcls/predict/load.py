"""load_model: any saved model -> a model ready for `predict_stack`, through one reader.

    load_model()                 the model the package ships (stackcls/pretrained/default/),
    load_model("default")        loaded once per process, its hash checked against its card
    load_model("m.npz")          a model file (stackcls.predict.model_file)
    load_model("folder/")        a model folder (model.npz, with card.json when it ships)
    load_model("runs/RUN")       a run directory: the model file of its deepest setting
                                 (anatomy > depth1 > depth0 > scratch) or of `setting`

Every route ends in `model_file.load`. A run directory written before the model format (orbax
checkpoints only) is converted once by `convert_run` (through stackcls.train.checkpoint) and the
file is kept beside the checkpoints, so later loads read the file alone.

Run directory layout (written by `python -m experiments.run`):
    run.json                      the run's configuration (a resumed run must match it)
    results.json, results.md      results; figures *.png
    depth0/ depth1/ scratch/      one folder per setting:
        model.npz                 the setting's model in the one format: the final classifier,
                                  its stack head, direction model and temperatures
        cv/<job>.npz              per CV job: curves, out-of-fold probabilities/features
        final/, stack/            orbax checkpoints and JSON that training resumes from
    anatomy/                      method=anatomy instead of the settings: model.npz (the ensemble
                                  of fold models at the selected epoch, with its parts), cv/fold<k>/,
                                  final/, stack/ as above
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

from stackcls.io.errors import ModelFileError
from stackcls.predict import model_file

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "default"
SETTINGS_ORDER = ("scratch", "depth0", "depth1")  # load_model picks the last one present
ANATOMY = "anatomy"    # method=anatomy's folder; a run has either it or the paper's settings
DEFAULT = "default"    # load_model's name for the shipped model

_loaded: dict = {}     # resolved model folder -> the loaded model (the shipped one, mostly)


def load_default(path=None):
    """The shipped model (or the model folder `path`), loaded once per process (hash checked
    first); the first load says which model it is on stderr."""
    key = Path(path if path is not None else DEFAULT_DIR).resolve()
    hit = _loaded.get(key)
    if hit is not None:
        return hit
    model = model_file.folder(key)
    card = model.card
    stand_in = " (a stand-in, not the trained release)" if card.get("stand_in") else ""
    print(f"stackcls: default model {card.get('name')} version {card.get('version')}{stand_in}, "
          f"sha256 {card['sha256'][:12]}", file=sys.stderr)
    _loaded[key] = model
    return model


def setting_dirs(run_dir) -> dict[str, Path]:
    """The settings of a run directory that hold a model (a model file, or the checkpoints it is
    converted from), in the order load_model prefers them last."""
    from stackcls.train.checkpoint import is_saved
    run_dir = Path(run_dir)
    return {s: run_dir / s for s in (*SETTINGS_ORDER, ANATOMY)
            if (run_dir / s / model_file.WEIGHTS).is_file() or is_saved(run_dir / s / "final")}


def load_model(path=None, setting: str | None = None, stack: bool = True):
    """The model at `path` (see the module docstring). stack=False drops the stack head.
    Malformed files raise `ModelFileError` naming the file."""
    if path is None or (isinstance(path, str) and path == DEFAULT):
        model = load_default()
    else:
        path = Path(path)
        if path.is_file():
            model = model_file.load(path)
        elif (path / model_file.WEIGHTS).is_file() or (path / model_file.CARD).is_file():
            model = model_file.folder(path)
        else:
            model = model_file.load(_run_model_file(path, setting))
    if not stack and model.stack_head is not None:
        model = dataclasses.replace(model, stack_head=None)
    return model


def _run_model_file(run_dir: Path, setting: str | None) -> Path:
    """The model file of a run directory's setting, converted from its checkpoints if needed."""
    from stackcls.train.checkpoint import is_saved
    if is_saved(run_dir):                       # a bare saved classifier or ensemble folder
        return convert_run(run_dir)
    found = setting_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no trained model (expected depth0/, depth1/, "
                                "scratch/ or anatomy/ written by `python -m experiments.run`, "
                                "a model file or a model folder)")
    if setting is None:
        setting = list(found)[-1]
    if setting not in found:
        raise FileNotFoundError(f"{run_dir}: no final model for {setting!r} (have {list(found)})")
    d = found[setting]
    f = d / model_file.WEIGHTS
    saved = [p for p in (d / "final" / "config.json", *(d / "stack").glob("*.json")) if p.is_file()]
    # a file older than what training saved since (a resumed run) is converted again
    fresh = f.is_file() and all(p.stat().st_mtime <= f.stat().st_mtime for p in saved)
    return f if fresh else convert_run(d)


def convert_run(d: Path, out: Path | None = None, default_mode: str | None = None) -> Path:
    """A setting folder of orbax checkpoints (final/ and stack/) -> its model file (d/model.npz,
    or `out`). Where d cannot be written the file goes to the user cache instead."""
    from stackcls.train import checkpoint
    model = checkpoint.restore_setting(d)
    extra = dict(converted_from=str(d))
    if default_mode is not None:
        extra["default_mode"] = dict(mode=default_mode)
    out = Path(out) if out is not None else d / model_file.WEIGHTS
    try:
        return model_file.save(out, model, extra=extra)
    except OSError:
        from stackcls.cache import cache_dir
        name = hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:16]
        return model_file.save(cache_dir("models") / f"{name}.npz", model, extra=extra)


def write_run_models(run_dir, default_modes: dict | None = None) -> list[Path]:
    """Every setting of a finished run directory as a model file (what the study writes last).
    default_modes: {setting: the mode its CV chose}, kept in the file's manifest."""
    from stackcls.train.checkpoint import is_saved
    run_dir = Path(run_dir)
    return [convert_run(run_dir / s, default_mode=(default_modes or {}).get(s))
            for s in (*SETTINGS_ORDER, ANATOMY) if is_saved(run_dir / s / "final")]


__all__ = ["load_model", "load_default", "setting_dirs", "convert_run", "write_run_models",
           "ModelFileError", "DEFAULT_DIR"]
