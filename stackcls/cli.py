"""The `stackcls` console command. Argument parsing only: each subcommand calls one function of
the module that owns the work, imported lazily so `stackcls --help` stays instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _synth(a):
    from stackcls.phantom import synth_command
    return synth_command(subjects=a.subjects, out=a.out, seed=a.seed)


def _inspect(a):
    from stackcls.io import inspect_command
    return inspect_command(a.path, labels=a.labels)


def _predict(a):
    from stackcls.predict import predict_command
    return predict_command(a.path, model=a.model, json_out=a.json, figure_out=a.figure,
                           mode=a.mode)


def _label(a):
    from stackcls.label_ui import label_command
    return label_command(a.data, labels=a.labels)


def _review(a):
    from stackcls.label_ui import review_command
    return review_command(a.data, model=a.model, labels=a.labels, save=a.save)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stackcls", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the built-in synthetic cohort as DICOM + labels CSV")
    s.add_argument("--subjects", type=int, default=10)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)

    s = sub.add_parser("inspect", help="list the stacks found under PATH and every file skipped")
    s.add_argument("path", type=Path)
    s.add_argument("--labels", type=Path, default=None, help="labels CSV to attach")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("predict", help="classify the slices of every stack under PATH")
    s.add_argument("path", type=Path)
    s.add_argument("--model", type=Path, required=True, help="run directory of a trained model")
    s.add_argument("--mode", choices=["stack", "slice", "slice_ordered"], default="stack")
    s.add_argument("--json", type=Path, default=None, help="write predictions as JSON here")
    s.add_argument("--figure", type=Path, default=None, help="write a PNG figure here")
    s.set_defaults(func=_predict)

    s = sub.add_parser("label", help="label stacks interactively (saved after every change)")
    s.add_argument("data", type=Path)
    s.add_argument("--labels", type=Path, required=True)
    s.set_defaults(func=_label)

    s = sub.add_parser("review", help="review a model's predictions, with Grad-CAM")
    s.add_argument("data", type=Path)
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--labels", type=Path, default=None)
    s.add_argument("--save", type=Path, default=None, help="write PNGs here instead of a window")
    s.set_defaults(func=_review)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
