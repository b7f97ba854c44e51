"""Shared test fixtures.

Tests that need real files read them from ../shared next to the checkout (ACDC stacks). A user's
clone has no ../shared: those tests skip with the reason instead of failing. The real MobileNet
0.25 ImageNet file ships inside the package, so the tests that need it run everywhere.
"""

import os
from pathlib import Path

import pytest

# Keras is only a test-time reference; pin its backend before anything imports it.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STACKCLS_SHARED", ROOT.parent / "shared"))


def _shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs {p} (the project's shared test assets; absent outside the dev/CI machines)")
    return p


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    return _shared("data/acdc")


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    return ROOT / "stackcls" / "models" / "backbones" / "imagenet" / "mobilenet_2_5_224_tf_no_top.h5"


@pytest.fixture(scope="session")
def shared_mobilenet_weights() -> Path:
    """The project's own copy of the Keras file, independent of the packaged one."""
    return _shared("weights/mobilenet_2_5_224_tf_no_top.h5")
