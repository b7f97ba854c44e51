"""The paper's protocol as library code: `run(compose(["backbone=vgg16", "protocol=paper"]))`
(stackcls.study.run.run, stackcls.study.config.compose) is what
`python -m experiments.run backbone=vgg16 protocol=paper` does.

    config.py      the typed configuration and its presets (the one source of every default)
    data.py        the labelled stacks split by patient; the backbone at its input size
    settings.py    scratch / depth 0 / depth 1: their training pools and starting weights
    evaluation.py  a trained setting on the test stacks: slice, slice_ordered, stack rows
    report.py      results.md, the terminal table, the paper's Tables 1 and 2
    run.py         run(config) -> results.json's dict (resumable)
"""
