"""The shipped model's maintenance commands (training it is `python -m experiments.run
--config-name default_model`; docs/model-card.md):

    python -m experiments.default_model export RUN_DIR [--out DIR] [--version V] [--dtype float16]
        a finished method=anatomy run -> DIR/model.npz + card.json (default: the package's
        stackcls/pretrained/default/), then the numbers table of docs/model-card.md
    python -m experiments.default_model verify [DIR]     the file's sha256 against its card
    python -m experiments.default_model doc [DIR]        the model card's table from card.json again
    python -m experiments.default_model pins [DIR]       the pinned predictions of
                                                         tests/test_default_model.py, to paste there
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from stackcls import pretrained
from stackcls.predict.model_file import DTYPES

DOC = Path(__file__).resolve().parents[1] / "docs" / "model-card.md"
PIN_SUBJECT = (0, 0)          # phantom.render.render_subject(seed, index): the pinned stack


def pinned_stack():
    """The fixed phantom stack the tests pin predictions on: (images (S, H, W) apex -> base,
    spacing (row, col, slice) mm)."""
    from stackcls.phantom.render import render_subject
    d = render_subject(*PIN_SUBJECT)
    images = d.images()[d.frames["ED"]]
    return images, (*d.pixel_spacing, d.spacing)


def pins(model) -> dict:
    """What the tests pin: the model file's hash, and the stack mode's labels and probabilities
    (rounded) on the pinned stack, orientation given."""
    from stackcls.predict.stack import predict_stack
    images, spacing = pinned_stack()
    p = predict_stack(images, model, mode="stack", orientation="apex_to_base", spacing=spacing)
    return dict(sha256=getattr(model, "card", {}).get("sha256"),
                labels="".join(l[1] for l in p.labels),      # OAP, IN, OBS -> A, N, B
                probabilities=[[round(float(v), 4) for v in row] for row in p.probabilities],
                range_probability=round(float(p.range_probability), 4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.default_model", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a finished method=anatomy run into the shipped format")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--out", type=Path, default=pretrained.DEFAULT_DIR)
    e.add_argument("--name", default="stackcls-anatomy-acdc")
    e.add_argument("--version", default="1")
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--stand-in", action="store_true", help="mark the card as a stand-in model")
    e.add_argument("--doc", type=Path, default=DOC, help="model card whose table to regenerate")
    for name, what in (("verify", "check the file's sha256 against its card"),
                       ("doc", "regenerate the model card's numbers table from card.json"),
                       ("pins", "print the pinned predictions for tests/test_default_model.py")):
        s = sub.add_parser(name, help=what)
        s.add_argument("folder", type=Path, nargs="?", default=pretrained.DEFAULT_DIR)
        if name == "doc":
            s.add_argument("--doc", type=Path, default=DOC)
    a = ap.parse_args(argv)
    if a.command == "export":
        command = shlex.join(["python", "-m", "experiments.default_model", *sys.argv[1:]]) \
            if argv is None else None
        card = pretrained.export(a.run_dir, a.out, name=a.name, version=a.version, dtype=a.dtype,
                                 command=command, stand_in=a.stand_in)
        print(f"wrote {a.out / card['file']}: {card['bytes']:,} bytes, sha256 {card['sha256']}")
        if a.out.resolve() == pretrained.DEFAULT_DIR.resolve():
            print(f"updated {pretrained.update_doc(a.doc, card)}")
        return 0
    card = pretrained.verify(a.folder)
    if a.command == "verify":
        print(f"{a.folder / card['file']}: sha256 {card['sha256']} matches its card "
              f"({card['name']} {card['version']})")
    elif a.command == "doc":
        print(f"updated {pretrained.update_doc(a.doc, card)}")
    else:
        import time
        t0 = time.perf_counter()
        model = pretrained.load_default(a.folder)
        got = pins(model)                  # the first call: loading, compiling, one 15-slice stack
        t1 = time.perf_counter()
        pins(model)
        t2 = time.perf_counter()
        print(f"# {card['name']} {card['version']}: paste into tests/test_default_model.py")
        print("\n".join(["PINS = dict(", f"    sha256={got['sha256']!r},", f"    labels={got['labels']!r},",
                         "    probabilities=[", *(f"        {row}," for row in got["probabilities"]),
                         "    ],", f"    range_probability={got['range_probability']!r},", ")"]))
        print(f"# first call (load + compile + predict) {t1 - t0:.1f} s, warm {t2 - t1:.2f} s "
              f"({len(got['labels'])}-slice stack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
