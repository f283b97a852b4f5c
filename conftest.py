"""Pytest set-up shared by the tests and the doctests.

The suite is compile-bound: hundreds of tiny XLA programs, each run once or
twice. These XLA CPU options cut compile time 2-3x (legacy fusion emitters, no
LLVM optimisation). They change neither the programs' results beyond float
round-off nor the comparisons the exactness tests make. They must be set before
JAX initialises its backend, hence here, at the repository root.

They do change compiled memory (XLA's fusion decisions). Memory and ordering
claims are therefore checked with XLA's defaults restored for that compilation
(``helpers.default_flags_memory`` in tests/helpers.py), and the tutorials are
executed in kernels started without these flags (tests/test_colabs.py).
"""

import os

_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


import warnings  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_x64(request):
  """Every test and doctest starts and ends in JAX's default 32-bit mode.

  Tests that need float64 enable it in a context (``helpers.F64TestCase``, the ``x64``
  fixture). Float64 left on (by a test, or by a module that pytest imported while collecting
  doctests) would silently change the dtypes of every later test in the same worker: it is
  switched off and reported.
  """
  for when in ("before", "after"):
    if jax.config.jax_enable_x64:
      jax.config.update("jax_enable_x64", False)
      message = f"jax_enable_x64 was on {when} {request.node.nodeid}; switched off."
      warnings.warn(message, stacklevel=1)
    if when == "before":
      yield
