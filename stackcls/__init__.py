"""stackcls: which short-axis slices of a cardiac cine-MRI stack lie between apex and base.

Data flow, one wing (folder) per stage:
    io/ (files -> Stack) -> preprocess/ (arrays) -> models/ (networks: per-slice scores, the
    stack head) -> decode/ (ordered decoding, range probabilities) -> predict/ (the model format,
    load_model, predict_stack, the archive) -> labels; beside it train/ (the loops, CV,
    calibration), ui/ (labelling, review, figures), study/ (the paper's protocol), phantom/.
The top level holds what every wing uses: stack.Stack, atomic writes, progress, the device
mesh (parallel), the cache folder, traced programs kept on disk (programs), the chunked apply
(batching), the CLI.
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
    "predict_stack": "stackcls.predict.stack",
    "load_model": "stackcls.predict.load",
}
_MODULES = {"backbones": "stackcls.models.backbones"}   # `from stackcls import backbones`


def __getattr__(name):
    # Lazy so that `import stackcls` does not pull in JAX / pydicom until they are needed.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'stackcls' has no attribute {name!r}")


__all__ = ["CLASSES", "Stack", *_LAZY]
