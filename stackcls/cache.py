"""The user cache folder every part of stackcls writes to: $STACKCLS_CACHE, else
~/.cache/stackcls. Never ../shared nor the package directory (both may be read-only)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str) -> Path:
    """$STACKCLS_CACHE/sub, else ~/.cache/stackcls/sub (not created here)."""
    env = os.environ.get("STACKCLS_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "stackcls") / sub
