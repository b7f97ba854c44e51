"""stackcls: which short-axis slices of a cardiac cine-MRI stack lie between apex and base.

Data flow (one module per stage):
    io/ (DICOM, NIfTI, labels CSV) -> stack.Stack -> preprocess -> backbones (features)
    -> models + inference (per-slice scores) -> stack_model (stack head) -> decode (ordered
    labels) -> predict; training: engine (loops), sweep (CV, selection, resume), checkpoint
"""

import importlib

from stackcls.stack import CLASSES, Stack

__version__ = "0.1.0"

_LAZY = {
    "load_stacks": "stackcls.io",
    "save_labels": "stackcls.io",
    "load_labels": "stackcls.io",
    "attach_labels": "stackcls.io",
    "scan": "stackcls.io",
    "predict_stack": "stackcls.predict",
    "load_model": "stackcls.inference",
}


def __getattr__(name):
    # Lazy so that `import stackcls` does not pull in JAX / pydicom until they are needed.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stackcls' has no attribute {name!r}")


__all__ = ["CLASSES", "Stack", *_LAZY]
