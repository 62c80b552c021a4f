"""Optional dependencies of a test module: skipped where they are missing, except in CI.

A developer without the `torch` extra can run the rest of the suite; CI installs every extra
(`.ci/run`), so there a missing one is an install step gone wrong and fails the run (an ImportError
when the module is collected) instead of skipping its tests and staying green.
"""

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def require(module: str) -> ModuleType:
    """`module`, imported: a skip of the calling test module where it is missing, except under
    `CI=true`, where its ImportError fails the run."""
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module)
