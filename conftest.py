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
