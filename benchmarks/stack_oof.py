"""The stack mode out of fold, on real stacks and on held-out stacks extended past both ends; its
head trained on real stacks alone (as shipped) or with extended copies beside them (issue 27).

    python benchmarks/stack_oof.py [--model RUN_OR_FILE] [--data ../shared/data/acdc]
                                   [--share 1.0] [--seeds 1] [--cache FILE.npz]

generalisation_oof.py measures slice_ordered out of fold: the file holds its K fold networks, but
its stack head trained on every stack's out-of-fold outputs, so no held-out head exists in it.
Here the head is trained again, per fold of the model's own CV (patient_folds of fold_units, seed
0), on the other folds' out-of-fold evidence, with the protocol and the learning rate and epoch
count the file's head selected; each stack then goes through the fold network and the fold head
that never saw its patient. Two heads per fold:

- real: the other folds' release stacks (the shipped recipe; the release row should come close
  to the card's cross-validated stack exact range, printed beside it);
- + extended: the same, plus `--share` of them extended by 1-3 slices past either end
  (preprocess/beyond.py, seed 11), each through the fold network that never saw it.

Both are measured on the held-out release stacks, and on held-out copies extended past both ends
with another seed (2027, as generalisation_oof.py --beyond). With --seeds N every head is trained
N times: the rows give the mean ± sd over the seeds, and the mean probability of the N heads (an
ensemble). The per-slice evidence of every set is kept in --cache (default: the user cache
folder), so other shares and seeds cost only the heads.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from generalisation import DATA, scores  # noqa: E402
from generalisation_oof import fold_models  # noqa: E402

from stackcls import load_model, load_stacks, predict_stack  # noqa: E402
from stackcls.cache import cache_dir  # noqa: E402
from stackcls.decode.ordered import decode_many  # noqa: E402
from stackcls.models.stack_head import slice_features  # noqa: E402
from stackcls.preprocess.arrays import fold_units, patient_folds  # noqa: E402
from stackcls.preprocess.beyond import extended  # noqa: E402
from stackcls.stack import CLASSES  # noqa: E402
from stackcls.train.stack_head import train_stack_model  # noqa: E402

TEST_SEED, TRAIN_SEED = 2027, 11


def evidence(stacks, folds: list, held: list) -> list[np.ndarray]:
    """Per stack, the stack head's input (S, D) from fold network f for the stacks held[f]."""
    out = [None] * len(stacks)
    for f, va in enumerate(held):
        m = folds[f]
        for i in va:
            x = m.preprocess(stacks[i].images, stacks[i].spacing)
            out[i] = slice_features(*m.slice_outputs(x))
        print(f"    fold {f + 1}/{len(folds)}", file=sys.stderr, flush=True)
    return out


def fold_heads(model, splits, feats, labels, extra=None, seed: int = 0) -> list:
    """One head per fold, trained on the other folds' stacks (extra: more (feats, labels, stack
    index) whose stack index decides their fold), at the file head's selected settings."""
    info = model.stack_head.info
    protocol = dict(info["protocol"], folds=1, learning_rates=[info["selected"]["learning_rate"]],
                    epochs=info["selected"]["epochs"])
    heads = []
    for f, (tr, _) in enumerate(splits):
        keep = set(int(i) for i in tr)
        F = [feats[i] for i in sorted(keep)]
        Y = [labels[i] for i in sorted(keep)]
        if extra is not None:
            F += [x for x, _, i in extra if i in keep]
            Y += [y for _, y, i in extra if i in keep]
        heads.append(train_stack_model(F, Y, ["-"] * len(F), seed=seed * 100 + f, protocol=protocol,
                                       verbose=False))
    return heads


def held_out(head_sets, splits, feats) -> list[list[str]]:
    """Each stack's labels from its fold's heads: one set of fold heads, or the mean probability
    of several (an ensemble of heads trained with other seeds)."""
    labels = [None] * len(feats)
    for f, (_, va) in enumerate(splits):
        ps = [[np.exp(lp) for lp in heads[f].scores_many([feats[i] for i in va])] for heads in head_sets]
        lps = [np.log(np.mean([p[b] for p in ps], axis=0)) for b in range(len(va))]
        for i, lab in zip(va, decode_many(lps)):
            labels[i] = [CLASSES[int(v)] for v in lab]
    return labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="run folder or model file (default: the shipped model)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--share", type=float, default=1.0, help="share of the training stacks extended")
    ap.add_argument("--seeds", type=int, default=1, help="train every head this many times (seeds 0..N-1)")
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    model = load_model(a.model)
    folds = fold_models(model)
    release = sorted(load_stacks(a.data, labels=a.data / "labels.csv"), key=lambda s: s.key)
    units = fold_units(release, model.config.get("fold_by", "subject"))
    splits = patient_folds(units, k=len(folds), seed=0)
    test_ext = [e for _, e in extended(release, 1.0, seed=TEST_SEED)]
    train_ext = extended(release, 1.0, seed=TRAIN_SEED)
    if len(test_ext) != len(release):
        raise SystemExit("needs masks and spacing on every stack of --data")
    # the cache is the model's: its file's hash, else its path and when it was written
    made = getattr(model, "card", {}).get("sha256") or Path(model.path).stat().st_mtime_ns
    tag = hashlib.sha256(f"{model.path}|{made}|{a.data}".encode()).hexdigest()[:12]
    path = a.cache or cache_dir("benchmarks") / f"stack_oof-{tag}.npz"
    sets = dict(release=release, test_ext=test_ext, train_ext=[e for _, e in train_ext])
    feats = {}
    if path.is_file():
        z = np.load(path)
        feats = {n: [z[f"{n}{i}"] for i in range(len(s))] for n, s in sets.items()}
    else:
        for n, s in sets.items():
            print(f"  evidence: {n} ({len(s)} stacks)", file=sys.stderr, flush=True)
            # a copy goes through the fold network of its source stack
            source = [i for i, _ in train_ext] if n == "train_ext" else list(range(len(s)))
            feats[n] = evidence(s, folds, [[k for k, i in enumerate(source) if i in set(va)]
                                           for _, va in splits])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{n}{i}": v for n, fs in feats.items() for i, v in enumerate(fs)})
    y = lambda st: st.label_indices()  # noqa: E731
    # --share of the extended copies (one copy per stack was made: a share takes a seeded subset)
    pick = np.random.default_rng(TRAIN_SEED).random(len(train_ext)) < a.share
    extra = [(f, y(e), i) for f, (i, e), k in zip(feats["train_ext"], train_ext, pick) if k]
    runs = {name: [fold_heads(model, splits, feats["release"], [y(s) for s in release], x, seed=s)
                   for s in range(a.seeds)]
            for name, x in (("real stacks", None), (f"+ {a.share:g} extended", extra))}
    # the fold heads are the shipped head's protocol: check one stack through predict_stack
    m0, real = folds[0], runs["real stacks"][0]
    m0.stack_head = real[0]
    i0 = int(splits[0][1][0])
    direct = predict_stack(release[i0], m0, mode="stack", orientation="apex_to_base").labels
    assert list(direct) == held_out([real], splits, feats["release"])[i0], "fold head != predict_stack"
    measured = (("release files", "release", release), ("past both ends", "test_ext", test_ext))
    rows = []
    for name, seeds in runs.items():
        for data, key, truth in measured:
            got = [scores(truth, held_out([heads], splits, feats[key])) for heads in seeds]
            rows.append((name, data, {k: (np.mean([g[k] for g in got]), np.std([g[k] for g in got]))
                                      for k in got[0]}))
            if a.seeds > 1:
                got = scores(truth, held_out(seeds, splits, feats[key]))
                rows.append((f"{name}, mean of {a.seeds} heads", data,
                             {k: (v, None) for k, v in got.items()}))
    slice_rows = []
    for data, key, truth in measured:
        lps = [f[:, -3:] for f in feats[key]]
        slice_rows.append((data, scores(truth, [[CLASSES[int(v)] for v in l] for l in decode_many(lps)])))
    card = getattr(model, "card", {}).get("metrics", {}).get("stack", {}).get("exact_range_rate")
    print(f"\n{len(release)} stacks, out of fold (the card's CV stack exact: {card}); heads trained "
          f"{a.seeds}x (mean ± sd over seeds); {time.time() - t0:.0f} s\n")
    print("| mode | head trained on | data | exact IN range | F1 OAP | F1 OBS |\n|---|---|---|---|---|---|")
    for data, s in slice_rows:
        print(f"| slice_ordered | - | {data} | {s['exact']:.3f} | {s['f1_oap']:.3f} | {s['f1_obs']:.3f} |")
    sd = lambda m, v: f"{m:.3f}" if v is None or a.seeds == 1 else f"{m:.3f} ± {v:.3f}"  # noqa: E731
    for name, data, s in rows:
        cells = " | ".join(sd(*s[k]) for k in ("exact", "f1_oap", "f1_obs"))
        print(f"| stack | {name} | {data} | {cells} |")
    trivial = scores(release, [["IN"] * len(st.labels) for st in release])
    print(f"| every slice IN | - | release files | {trivial['exact']:.3f} | 0 | 0 |")
    print("| every slice IN | - | past both ends | 0.000 | 0 | 0 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
