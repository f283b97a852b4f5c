"""Shared test bases and problems.

- ``TestCase``: absltest/parameterized base for every test class.
- ``F64TestCase``: the same, with 64-bit floats enabled for each test (the
  float64 base of the exactness tests).
"""

from __future__ import annotations

import jax
from absl.testing import parameterized


class TestCase(parameterized.TestCase):
  """Base class of the suite's tests."""


class F64TestCase(TestCase):
  """Runs every test with 64-bit floats enabled (a context, not a global flip)."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))
