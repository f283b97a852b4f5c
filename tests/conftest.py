"""Test hardening shared by the whole suite.

- Implicit rank promotion raises, so broadcasting bugs cannot hide.
- Exactness tests run in float64 through ``helpers.F64TestCase`` (a context
  manager around each test), never a global flip inside a test body. The
  ``x64`` fixture does the same for the remaining pytest-style tests.
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
from absl import flags  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# absltest's self.create_tempdir() reads absl flags, which pytest (not absltest.main) runs without
# parsing: use their defaults.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
