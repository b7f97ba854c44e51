"""Per-slice scores -> labels: trained models in one format, and prediction with them.

    model.py       TrainedModel: a classifier (+ stack head, direction, calibration) ready to use
    model_file.py  the one model format (a manifest plus weights, one .npz) and load_model
    stack.py       predict_stack: any input -> labels, IN range, how sure
    archive.py     prediction over a tree of any size (streamed, resumable, sharded)
    units.py       the archive's units of work: discovery, shards, reading, the done set

Imports every wing below (io, preprocess, models, decode) and train's checkpoints (to convert run
directories written before the model format); ui, study and the CLI import it.
"""
