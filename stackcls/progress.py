"""One switch for every progress bar: `experiments.run progress=false`, or STACKCLS_PROGRESS=0.

tqdm reads its own TQDM_* variables when it is imported, so a flag set later has to live here.
"""

import os

from tqdm.auto import tqdm as _tqdm

ENABLED = os.environ.get("STACKCLS_PROGRESS", "1") != "0"


def set_enabled(flag: bool) -> None:
    global ENABLED
    ENABLED = bool(flag)


def bar(*args, **kwargs):
    """tqdm(...), unless progress bars are switched off."""
    if not ENABLED:
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
