"""Benchmarks of MixFlow-MG meta-gradients against the standard implementations.

Run ``python -m mixflow_optax.bench --help`` (or ``mixflow-bench``).
"""

from mixflow_optax.bench._bench import (
  DEFAULT_CONFIGS,
  FAST_COMPILE_OPTIONS,
  METHODS,
  bench_problem,
  format_table,
  make_meta_grad,
  plot_results,
  run_benchmark,
  save_results,
)
from mixflow_optax.bench._problems import (
  MODELS,
  LMConfig,
  MLPConfig,
  Problem,
  lm_problem,
  make_problem,
  mlp_problem,
)

__all__ = [
  "DEFAULT_CONFIGS",
  "FAST_COMPILE_OPTIONS",
  "LMConfig",
  "METHODS",
  "MLPConfig",
  "MODELS",
  "Problem",
  "bench_problem",
  "format_table",
  "lm_problem",
  "make_meta_grad",
  "make_problem",
  "mlp_problem",
  "plot_results",
  "run_benchmark",
  "save_results",
]
