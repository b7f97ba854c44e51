"""Training, beside the flow: it makes the networks that stackcls.predict loads.

    engine.py       one training step and one validation, driven by lax.scan or from Python
    sequences.py    the same for sequence models (the stack head)
    sweep.py        folds x learning rates, resume, the final model
    selection.py    the one (learning rate, epochs) rule
    stack_head.py   training the stack head on per-slice features
    anatomy.py      training method=anatomy's network (augmentation, losses, epochs)
    calibration.py  temperatures of the range probabilities fitted on out-of-fold stacks, and the
                    measures of calibration
    checkpoint.py   orbax checkpoints of what training saves (resume, fold models)

Imports the top level, preprocess, models and decode; never predict, ui or study.
"""
