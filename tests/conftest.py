"""Test hardening shared by the whole suite.

- Implicit rank promotion raises, so broadcasting bugs cannot hide.
- Exactness tests run in float64 through the ``x64`` fixture (a context
  manager around the test), never a global flip inside a test body.
"""

import os
import pathlib
import sys

# `import helpers` (tests/helpers.py) works from every test file under importlib mode.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# Tests must be reproducible and light on 2 cores.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
