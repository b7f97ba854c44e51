"""The `stackcls` console command. Argument parsing, plus `stackcls predict`'s presentation (the
terminal summary, the JSON file, the figure pages). Every other subcommand calls one function of
the module that owns the work. The work's modules are imported inside the functions that need
them: JAX and the readers take seconds to import, and `stackcls --help` stays instant.

File names need not be UTF-8: every path printed or written to JSON goes through
`io.errors.printable` (b"bad\\xff" -> `bad\\xff`), and `main` sets stdout/stderr to escape
whatever else would not encode, so a strict UTF-8 terminal never ends a command in a traceback.
A malformed run directory or input file ends the command with one line, "error: FILE: reason"."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# light (no JAX, no pydicom/nibabel: ~50 ms): the error types and `printable` every command uses
from stackcls.io.errors import ModelFileError, StackReadError, printable, printable_tree

FIGURE_ROWS = 16           # stacks per figure page
# as stackcls.predict.stack.MODES, repeated here so argument checks need not import JAX
MODES = ("stack", "slice", "slice_ordered")
MODEL_HELP = ("run directory of a trained model, or a model file (.npz); default: the model "
              "shipped with stackcls (docs/model-card.md)")


def _synth(a):
    from stackcls.phantom import synth_command
    return synth_command(subjects=a.subjects, out=a.out, seed=a.seed, enhanced=a.enhanced)


def _inspect(a):
    from stackcls.io.inspect import inspect_command
    return inspect_command(a.path, labels=a.labels)


def _bad_paths(path, model) -> int | None:
    """2 (after one "error:" line) when the input or the model path does not exist, else None."""
    if not Path(path).exists():
        _err(f"{path}: no such file or folder")
        return 2
    # a loaded model (callers of predict_command may pass one) needs no check
    if isinstance(model, (str, os.PathLike)) and str(model) != "default" and not Path(model).exists():
        _err(f"{model}: no such model file or run directory")
        return 2
    return None


def _serve(a):
    model = None if str(a.model).lower() == "none" else a.model
    bad = _bad_paths(a.root, model)
    if bad is not None:
        return bad
    from stackcls.ui.web import serve_command
    return serve_command(a.root, labels=a.labels, model=a.model, host=a.host, port=a.port,
                         open_browser=a.open_browser, masks=a.masks)


def _predict(a):
    bad = _bad_paths(a.path, a.model)
    if bad is not None:
        return bad
    if a.out is not None:                 # an archive: streamed, resumable, sharded
        from stackcls.predict.archive import archive_command
        return archive_command(a.path, a.model, a.out, mode=a.mode, shard=a.shard, workers=a.workers)
    return predict_command(a.path, model=a.model, json_out=a.json, figure_out=a.figure,
                           mode=a.mode, review_below=a.review_below, queue_out=a.queue)


def _label(a):
    from stackcls.ui.label_ui import label_command
    return label_command(a.data, labels=a.labels)


def _review(a):
    from stackcls.ui.label_ui import review_command
    return review_command(a.data, model=a.model, labels=a.labels, save=a.save, queue=a.queue)


def _err(msg) -> None:
    print(printable(f"error: {msg}"), file=sys.stderr)


def _short(source: str) -> str:
    return Path(source).name if os.sep in source else source


def _summary(pred) -> str:
    """A `predict.Prediction` as terminal lines: the IN range, then one line per slice, apex
    first."""
    head = f"{pred.subject or '?'}/{pred.phase or '?'}: {len(pred.labels)} slices, mode {pred.mode}, "
    head += f"orientation {pred.orientation} ({pred.orientation_source})"
    if pred.in_range_apex_to_base is None:
        rng = "IN range: none"
    else:
        a, b = pred.in_range_apex_to_base
        rng = f"IN range: apex->base ranks {a}..{b} ({b - a + 1} slices)"
    lines = [head, "  " + rng] + _how_sure(pred)
    if pred.orientation_warning:
        lines.append("  WARNING: " + pred.orientation_warning)
    lines.append(f"  {'rank':>4} {'slice':>5}  {'label':<4} {'OAP':>5} {'IN':>5} {'OBS':>5}  "
                 f"{'level':<7} source")
    level = pred.level or [None] * len(pred.labels)
    for r, c in enumerate(pred.apex_to_base):
        p = pred.probabilities[c]
        lines.append(f"  {r:>4} {pred.slice_ids[c] if pred.slice_ids else c:>5}  {pred.labels[c]:<4} "
                     f"{p[0]:5.2f} {p[1]:5.2f} {p[2]:5.2f}  {level[c] or '':<7} {_short(pred.sources[c])}")
    return "\n".join(lines)


def _how_sure(pred) -> list[str]:
    """The range probability, the next ranges and the coverage of a prediction, as lines."""
    if pred.range_probability is None:
        return []
    cal = "calibrated" if pred.temperature != 1.0 else "not calibrated"
    alts = ", ".join(f"{'none' if a['in_range_apex_to_base'] is None else '{}..{}'.format(*a['in_range_apex_to_base'])}"
                     f" {a['probability']:.2f}" for a in pred.alternatives)
    cov = pred.coverage
    return [f"  P(this range) {pred.range_probability:.2f} ({cal}, T {pred.temperature:.2f}); next: {alts}",
            f"  coverage: {cov['status']} (P(end slice IN): apex {cov['apex_end_in']:.2f}, "
            f"base {cov['base_end_in']:.2f})"]


def predict_command(path, model, json_out=None, figure_out=None, mode: str | None = None,
                    review_below: float | None = None, queue_out="review_queue.csv") -> int:
    """`stackcls predict PATH [--model RUN_DIR] [--json OUT] [--figure OUT.png] [--mode ...]
    [--review-below P [--queue review_queue.csv]]`: every stack under PATH, a summary of each on
    stdout; with review_below, the review queue CSV (`label_session.write_review_queue`). model
    None: the shipped model. Returns 0, 1 (no stack predicted) or 2 (bad arguments)."""
    # every argument is checked before JAX and the model load (seconds): a typo answers at once
    bad = _bad_paths(path, model)
    if bad is not None:
        return bad
    if mode is not None and mode not in MODES:
        _err(f"mode must be one of {MODES}, got {mode!r}")
        return 2
    if review_below is not None and not 0 < review_below <= 1:
        _err(f"--review-below must be a probability in (0, 1], got {review_below}")
        return 2
    # see the module docstring: imported when the command runs
    from stackcls.ui import figures
    from stackcls.atomic import write_json
    from stackcls.io import scan
    from stackcls.predict.stack import as_model, predict_stack, resolve_mode

    path = Path(path)
    try:
        m = as_model(model)
    except (ModelFileError, FileNotFoundError) as e:    # the message starts with the file
        _err(e)
        return 2
    except Exception as e:  # noqa: BLE001 - report any loading failure as a message, not a trace
        _err(f"cannot load model {model if model is not None else '(the shipped default)'}: {e}")
        return 2
    try:
        mode = resolve_mode(m, mode)
    except ValueError as e:
        _err(f"model {model}: {e}")
        return 2
    res = scan(path)
    for p, why in res.skipped:
        print(printable(f"skipped {p}: {why}"), file=sys.stderr)
    if not res.stacks:
        _err(f"{path}: no stack found")
        return 1
    preds, imgs, failed = [], [], []
    for st in res.stacks:
        try:
            pred = predict_stack(st, m, mode=mode)
        except ValueError as e:
            print(printable(f"skipped {st.key}: {e}"), file=sys.stderr)
            failed.append(dict(stack=st.key, reason=str(e)))
            continue
        print(printable(_summary(pred)))
        preds.append(pred)
        imgs.append(st.images)
    if json_out is not None:
        from stackcls.pretrained import describe
        blob = dict(model=str(model) if model is not None else describe(m), mode=mode,
                    stacks=[p.to_dict() for p in preds],
                    skipped=[dict(path=str(p), reason=str(r)) for p, r in res.skipped] + failed)
        print(printable(f"wrote {write_json(json_out, printable_tree(blob))}"))
    if review_below is not None:
        from stackcls.ui.label_session import write_review_queue
        done, n = write_review_queue(preds, queue_out, review_below)
        print(printable(f"wrote {done}: {n} of {len(preds)} stacks to review "
                        f"(P(range) < {review_below:g} or coverage flagged), least sure first"))
    if figure_out is not None and preds:
        # one row per stack; large trees are split into pages OUT.png, OUT-2.png, ...
        figure_out = Path(figure_out)
        for k in range(0, len(preds), FIGURE_ROWS):
            page = figure_out if k == 0 else figure_out.with_name(
                f"{figure_out.stem}-{k // FIGURE_ROWS + 1}{figure_out.suffix or '.png'}")
            done = figures.predictions(preds[k:k + FIGURE_ROWS], imgs[k:k + FIGURE_ROWS], page)
            print(printable(f"wrote {done}"))
    return 0 if preds else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stackcls", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the built-in synthetic cohort as DICOM + labels CSV")
    s.add_argument("--subjects", type=int, default=10)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--enhanced", action="store_true",
                   help="one Enhanced MR multi-frame file per subject (as Siemens XA exports)")
    s.set_defaults(func=_synth)

    s = sub.add_parser("inspect", help="list the stacks found under PATH and every file skipped")
    s.add_argument("path", type=Path)
    s.add_argument("--labels", type=Path, default=None, help="labels CSV to attach")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("predict", help="classify the slices of every stack under PATH")
    s.add_argument("path", type=Path)
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--mode", choices=list(MODES), default=None,
                   help="default: the model's own, the one its cross-validation chose (the shipped "
                        "model: slice_ordered)")
    s.add_argument("--json", type=Path, default=None, help="write predictions as JSON here")
    s.add_argument("--figure", type=Path, default=None, help="write a PNG figure here")
    s.add_argument("--review-below", type=float, default=None, metavar="P",
                   help="also write a review queue: stacks whose range probability is below P "
                        "or whose coverage is flagged, least sure first")
    s.add_argument("--queue", type=Path, default=Path("review_queue.csv"),
                   help="where --review-below writes the queue (default review_queue.csv)")
    s.add_argument("--out", type=Path, default=None,
                   help="archive mode: stream every stack into this JSONL file (resumes; summary "
                        "CSV beside it); see stackcls.predict.archive")
    s.add_argument("--shard", default="0/1", help="archive mode: predict shard I of N (I/N)")
    s.add_argument("--workers", type=int, default=None,
                   help="archive mode: reader processes (0: reader threads; default: 0 on up to 2 "
                        "cores, else one per spare core, at most 8)")
    s.set_defaults(func=_predict)

    s = sub.add_parser("label", help="label stacks interactively (saved after every change)")
    s.add_argument("data", type=Path)
    s.add_argument("--labels", type=Path, required=True)
    s.set_defaults(func=_label)

    s = sub.add_parser("review", help="review a model's predictions, with Grad-CAM")
    s.add_argument("data", type=Path)
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--labels", type=Path, default=None)
    s.add_argument("--save", type=Path, default=None, help="write PNGs here instead of a window")
    s.add_argument("--queue", type=Path, default=None,
                   help="review only the stacks of this queue (stackcls predict --review-below), in its order")
    s.set_defaults(func=_review)

    s = sub.add_parser("serve", help="review and label in the browser (docs/web-app.md)")
    s.add_argument("root", type=Path)
    s.add_argument("--labels", type=Path, default=None,
                   help="labels CSV to show and edit (default ./review_labels.csv)")
    s.add_argument("--model", default="default",
                   help="a run folder or model file, 'default' (the shipped model) or 'none' (labelling only)")
    s.add_argument("--masks", type=Path, default=None, help="masks folder <subject>/<phase>.nii.gz")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--open", action="store_true", dest="open_browser", help="open the URL in a browser")
    s.set_defaults(func=_serve)
    return p


def _escape_unencodable(*streams) -> None:
    """Print what a stream cannot encode as backslash escapes instead of raising (a strict UTF-8
    terminal and a file name that is not UTF-8: warnings and library messages included)."""
    for stream in streams:
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):   # not a TextIOWrapper, or already in use
            pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _escape_unencodable(sys.stdout, sys.stderr)
    # after parsing (--help and usage errors never get here); sets environment variables only
    # while JAX is not imported, so commands that never compile pay nothing
    from stackcls.cache import compile_cache
    compile_cache()
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (StackReadError, ModelFileError, FileNotFoundError) as e:   # each names its file
        _err(e)
        return 2
    return int(rc or 0)


def run() -> None:
    """The `stackcls` command: main(), then out without the interpreter's teardown.

    Finalising JAX's runtime and every imported module costs a one-study run about 0.3 s of its
    four (docs/scaling.md). When main returns, every output file is written and closed (atomically),
    so the logging handlers and the standard streams are all that is left to flush."""
    rc = main()
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):     # a closed pipe or stream: nothing more can go out on it
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
