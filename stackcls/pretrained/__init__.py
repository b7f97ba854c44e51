"""The model that ships inside the package: default/model.npz in the one model format
(stackcls.predict.model_file) with its card, and how a run becomes it.

    export(run_dir, out, ...)   a method=anatomy run's model -> out/model.npz + out/card.json
    card_table(card)            the card's numbers as markdown (docs/model-card.md embeds it)
    update_doc(doc, card)       docs/model-card.md's table regenerated from the card

Loading it is `stackcls.load_model()` (stackcls.predict.load.load_default: once per process, its
sha256 checked against the card). The card (`card.json`) says what the file is: name, version,
sha256, size, the command that made it, the training data and its terms, and the cross-validated
metrics beside the trivial "every slice IN" row. `docs/model-card.md` embeds `card_table(card)`
between markers, regenerated on every export (`update_doc`), so the document cannot disagree with
the file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from stackcls.predict.load import DEFAULT_DIR, load_default, load_model
from stackcls.predict import model_file
from stackcls.predict.model_file import CARD, WEIGHTS, describe, load, save, sha256

__all__ = ["DEFAULT_DIR", "export", "card_table", "update_doc", "load_default", "load", "save",
           "verify", "read_card", "describe", "sha256", "TERMS"]
DOC_START, DOC_END = "<!-- card-table:start -->", "<!-- card-table:end -->"


def read_card(folder=DEFAULT_DIR) -> dict:
    return model_file.read_card(folder)


def verify(folder=DEFAULT_DIR) -> dict:
    """The card of the model in `folder` (the shipped one), its file's sha256 checked."""
    return model_file.verify(folder)


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
        calibration=None if model.calibration is None else model.calibration.temperatures,
        default_mode=row.get("default_mode"))
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
    dm = card.get("default_mode")
    if dm:
        lines += ["", f"Default mode: `{dm['mode']}` (chosen by the cross-validation: {dm['rule']}; "
                      f"stack minus slice_ordered {dm['mean_difference']:+.3f}, standard error "
                      f"{dm['standard_error']:.3f} over {dm['folds']} folds)."]
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
