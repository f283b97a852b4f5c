r"""Meta-gradient methods and their measurement (memory, time, agreement).

Every method computes the same exact meta-gradient of the outer loss after T
inner Adam steps, with respect to the meta-parameters :math:`\eta` and the
initial parameters :math:`\theta_0`:

.. math::

  \Big(\frac{dV(\theta_T)}{d\eta}, \frac{dV(\theta_T)}{d\theta_0}\Big), \qquad
  \theta_{t+1} = \theta_t + \mathrm{Adam}(\nabla_\theta L(\theta_t, \eta, x_t)).

They differ only in how it is computed:

- ``"standard"``: what a user writes today. Stock ``optax.adam``, ``jax.grad``
  of the inner loss inside a ``jax.lax.scan`` body, ``jax.grad`` of the whole
  thing, no checkpointing: reverse-over-reverse, storing every step's inner
  forward and backward intermediates.
- ``"standard_best"``: the best-configured standard implementation. The same,
  with each step wrapped in ``jax.checkpoint`` and the inner gradients saved
  by name (``checkpoint_name`` + ``save_only_these_names``): the paper's block
  rematerialisation and saved inner gradients, still reverse-over-reverse.
- ``"standard_remat_nosave"``: per-step ``jax.checkpoint`` that saves nothing
  (the recompute redoes the inner gradient).
- ``"mixflow"``: :func:`mixflow_optax.unroll` with ``mode="mixflow"`` and the
  library defaults (per-step remat, saved inner gradients): the second-order
  terms forward-over-reverse.
- ``"mixflow_noremat"``: the same with ``remat=False``.
- ``"mixflow_remat_nosave"``: the same with ``save_inner_grads=False``.

Measurements, per method (see :func:`bench_problem`):

- ``temp_mib``: XLA's compiled temporary buffer size
  (``compiled.memory_analysis().temp_size_in_bytes``), deterministic and
  available without running.
- ``seconds``: median wall-clock seconds of one meta-gradient, with all
  methods compiled and warmed up first and the repetitions interleaved
  (round r runs every method once, in the same order).
- ``rel_err``: the normwise relative difference of its meta-gradient from
  ``"standard"``'s, :math:`\max_\text{leaves} \|a - b\|_\infty /
  \|b\|_\infty`.

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 4: block
  rematerialisation and saved inner gradients; Section 5: benchmarks).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

import mixflow_optax as mfo
from mixflow_optax.bench._problems import Problem, make_problem

__all__ = [
  "METHODS",
  "DEFAULT_CONFIGS",
  "FAST_COMPILE_OPTIONS",
  "make_meta_grad",
  "bench_problem",
  "run_benchmark",
  "format_table",
  "save_results",
  "plot_results",
]

#: All methods, in the order they are run (the reference ``"standard"`` first).
METHODS: tuple[str, ...] = (
  "standard",
  "standard_best",
  "mixflow",
  "mixflow_noremat",
  "mixflow_remat_nosave",
  "standard_remat_nosave",
)

#: The default benchmark: model -> inner-step counts T.
DEFAULT_CONFIGS: dict[str, tuple[int, ...]] = {"mlp": (4,), "lm": (4, 8)}

#: XLA options for smoke runs and tests: they cut CPU compile time several-fold
#: (no LLVM optimisation, legacy fusion emitters) at the cost of slower code.
#: Temp memory is almost unchanged, but timings are not representative.
FAST_COMPILE_OPTIONS: dict[str, Any] = {
  "xla_backend_optimization_level": 0,
  "xla_cpu_use_fusion_emitters": False,
}

_REFERENCE = "standard"
_BEST_STANDARD = "standard_best"
# Name of the inner gradients in the hand-written standard baselines.
_GRAD_NAME = "inner_grad"

MetaGradFn = Callable[[jax.Array, Any, Any, Any], tuple[jax.Array, Any]]


def _standard_meta_loss(problem: Problem, remat: str | None) -> Callable:
  """The meta-loss a user writes with stock optax (``remat``: None, "save_grads", "nothing")."""
  opt = optax.adam(problem.learning_rate)

  def meta_loss(meta_params, params0, inner_batches, outer_batch):
    def step(carry, batch):
      params, opt_state = carry
      grads = jax.grad(problem.inner_loss)(params, meta_params, batch)
      if remat == "save_grads":
        grads = checkpoint_name(grads, _GRAD_NAME)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    if remat == "save_grads":
      policy = jax.checkpoint_policies.save_only_these_names(_GRAD_NAME)
      step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    elif remat == "nothing":
      step = jax.checkpoint(
        step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False
      )
    (params, _), _ = jax.lax.scan(step, (params0, opt.init(params0)), inner_batches)
    return problem.outer_loss(params, outer_batch)

  return meta_loss


def _mixflow_meta_loss(problem: Problem, **unroll_kwargs: Any) -> Callable:
  """The meta-loss written with :func:`mixflow_optax.unroll` (``mode="mixflow"``)."""
  opt = mfo.transforms.adam(problem.learning_rate)
  run = mfo.unroll(problem.inner_loss, opt, mode="mixflow", **unroll_kwargs)

  def meta_loss(meta_params, params0, inner_batches, outer_batch):
    params, _ = run(meta_params, params0, opt.init(params0), inner_batches)
    return problem.outer_loss(params, outer_batch)

  return meta_loss


_META_LOSSES: dict[str, Callable[[Problem], Callable]] = {
  "standard": lambda p: _standard_meta_loss(p, remat=None),
  "standard_best": lambda p: _standard_meta_loss(p, remat="save_grads"),
  "standard_remat_nosave": lambda p: _standard_meta_loss(p, remat="nothing"),
  # Library defaults: remat and save_inner_grads are deliberately not passed.
  "mixflow": lambda p: _mixflow_meta_loss(p),
  "mixflow_noremat": lambda p: _mixflow_meta_loss(p, remat=False),
  "mixflow_remat_nosave": lambda p: _mixflow_meta_loss(p, remat=True, save_inner_grads=False),
}


def make_meta_grad(problem: Problem, method: str) -> MetaGradFn:
  """The jitted meta-gradient of ``problem`` computed by ``method``.

  Args:
    problem: a :class:`~mixflow_optax.bench.Problem`.
    method: one of :data:`METHODS`.

  Returns:
    ``f(meta_params, params0, inner_batches, outer_batch) -> (d meta_params,
    d params0)``, jitted. The data are arguments rather than closed-over
    constants, so that they are not baked into the compiled program.

  Examples:
    >>> from mixflow_optax.bench import make_problem
    >>> p = make_problem("mlp", T=2, small=True)
    >>> f = make_meta_grad(p, "mixflow")
    >>> d_meta, d_params = f(p.meta_params, p.params, p.inner_batches, p.outer_batch)
    >>> d_meta.shape
    (2, 16)
  """
  if method not in _META_LOSSES:
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}.")
  return jax.jit(jax.grad(_META_LOSSES[method](problem), argnums=(0, 1)))


def _args(problem: Problem) -> tuple[Any, ...]:
  return (problem.meta_params, problem.params, problem.inner_batches, problem.outer_batch)


def _rel_err(a: Any, b: Any) -> float:
  """Normwise relative difference ``max over leaves of ||a - b||_inf / ||b||_inf``."""
  errs = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.max(np.abs(y)) if y.size else 0.0
    diff = np.max(np.abs(x - y)) if y.size else 0.0
    errs.append(float(diff / scale) if scale > 0 else float(diff))
  return max(errs) if errs else 0.0


def _ratio(num: float | None, den: float | None) -> float | None:
  if num is None or den is None or den == 0:
    return None
  return num / den


def bench_problem(
  problem: Problem,
  methods: Sequence[str] = METHODS,
  *,
  reps: int = 3,
  compile_only: bool = False,
  compiler_options: dict[str, Any] | None = None,
  on_progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
  """Measures every method's meta-gradient of ``problem``.

  Compiles all methods first (recording temp memory), then, unless
  ``compile_only``, runs each once as a warm-up (checking its meta-gradient
  against ``"standard"``), then ``reps`` interleaved rounds, and takes each
  method's median time.

  Args:
    problem: the problem.
    methods: methods to measure; ``"standard"`` is added first if missing
      (it is the reference of every ratio and of the agreement check).
    reps: timed rounds.
    compile_only: only compile: ``seconds`` and ``rel_err`` are ``None``.
    compiler_options: XLA options for ``compile`` (e.g.
      :data:`FAST_COMPILE_OPTIONS` for smoke runs); ``None``: XLA's defaults.
    on_progress: called with a short status string before each phase.

  Returns:
    One record (dict) per method: ``task, model, T, method, temp_mib,
    seconds, compile_s, mem_ratio_vs_standard, mem_ratio_vs_standard_best,
    time_ratio_vs_standard, time_ratio_vs_standard_best,
    pct_faster_vs_standard, pct_faster_vs_standard_best, rel_err,
    meta_grad_max`` (the largest ``|d meta_params|``, a sanity check that the
    meta-gradient is not trivially zero); ``compile_s`` is the seconds to
    trace, lower and compile. Plus the sizes (``config``),
    ``reps``, ``dtype`` and ``backend``. Memory ratios are
    ``reference_temp / method_temp`` (> 1: the method uses less); time ratios
    are ``method_seconds / reference_seconds`` (< 1: faster);
    ``pct_faster = 100 * (1 - time_ratio)``, the wall-clock time saved.
  """
  methods = list(dict.fromkeys([_REFERENCE, *methods]))
  for m in methods:
    if m not in _META_LOSSES:
      raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}.")
  if reps < 1 and not compile_only:
    raise ValueError(f"reps must be >= 1, got {reps}.")
  say = on_progress or (lambda _: None)
  args = _args(problem)

  compiled, temp, compile_s = {}, {}, {}
  for m in methods:
    say(f"compile {m}")
    t0 = time.perf_counter()
    c = make_meta_grad(problem, m).lower(*args).compile(compiler_options)
    compile_s[m] = time.perf_counter() - t0
    stats = c.memory_analysis()
    temp[m] = None if stats is None else stats.temp_size_in_bytes / 2**20
    compiled[m] = c

  seconds: dict[str, float | None] = dict.fromkeys(methods)
  rel_err: dict[str, float | None] = dict.fromkeys(methods)
  grad_max: dict[str, float | None] = dict.fromkeys(methods)
  if not compile_only:
    grads = {}
    for m in methods:
      say(f"warm-up {m}")
      grads[m] = jax.block_until_ready(compiled[m](*args))
    for m in methods:
      rel_err[m] = _rel_err(grads[m], grads[_REFERENCE])
      grad_max[m] = float(np.max(np.abs(np.asarray(grads[m][0], np.float64))))
    del grads
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(reps):
      say(f"round {r + 1}/{reps}")
      for m in methods:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[m](*args))
        times[m].append(time.perf_counter() - t0)
    seconds = {m: statistics.median(ts) for m, ts in times.items()}

  best = _BEST_STANDARD if _BEST_STANDARD in methods else None
  records = []
  for m in methods:
    rec: dict[str, Any] = {
      "task": problem.task,
      "model": problem.name,
      "T": problem.T,
      "method": m,
      "temp_mib": temp[m],
      "seconds": seconds[m],
      "compile_s": compile_s[m],
      "mem_ratio_vs_standard": _ratio(temp[_REFERENCE], temp[m]),
      "mem_ratio_vs_standard_best": _ratio(temp[best], temp[m]) if best else None,
      "time_ratio_vs_standard": _ratio(seconds[m], seconds[_REFERENCE]),
      "time_ratio_vs_standard_best": _ratio(seconds[m], seconds[best]) if best else None,
    }
    for ref in ("standard", "standard_best"):
      tr = rec[f"time_ratio_vs_{ref}"]
      rec[f"pct_faster_vs_{ref}"] = None if tr is None else 100.0 * (1.0 - tr)
    rec["rel_err"] = rel_err[m]
    rec["meta_grad_max"] = grad_max[m]
    rec["reps"] = 0 if compile_only else reps
    rec["dtype"] = str(jnp.result_type(problem.meta_params))
    rec["backend"] = jax.default_backend()
    rec["config"] = dict(problem.config)
    records.append(rec)
  return records


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
  return "-" if x is None else format(x, spec) + suffix


def format_table(records: Iterable[dict[str, Any]]) -> str:
  """A fixed-width text table of benchmark records (one row per method)."""
  cols = [
    ("task", 14, lambda r: r["task"]),
    ("model", 5, lambda r: r["model"]),
    ("T", 3, lambda r: str(r["T"])),
    ("method", 21, lambda r: r["method"]),
    ("temp MiB", 10, lambda r: _fmt(r["temp_mib"], ".2f")),
    ("median s", 9, lambda r: _fmt(r["seconds"], ".4f")),
    ("mem/std", 8, lambda r: _fmt(r["mem_ratio_vs_standard"], ".2f", "x")),
    ("mem/best", 8, lambda r: _fmt(r["mem_ratio_vs_standard_best"], ".2f", "x")),
    ("t/std", 6, lambda r: _fmt(r["time_ratio_vs_standard"], ".2f")),
    ("t/best", 6, lambda r: _fmt(r["time_ratio_vs_standard_best"], ".2f")),
    ("%fast/std", 9, lambda r: _fmt(r["pct_faster_vs_standard"], "+.0f")),
    ("%fast/best", 10, lambda r: _fmt(r["pct_faster_vs_standard_best"], "+.0f")),
    ("rel err", 8, lambda r: _fmt(r["rel_err"], ".1e")),
  ]
  lines = [" ".join(f"{name:>{w}}" for name, w, _ in cols)]
  lines.append(" ".join("-" * w for _, w, _ in cols))
  for r in records:
    lines.append(" ".join(f"{get(r):>{w}}" for _, w, get in cols))
  return "\n".join(lines)


def save_results(records: Sequence[dict[str, Any]], out: str | os.PathLike) -> str:
  """Writes ``records`` to ``<out>/results.json``; returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(list(records), f, indent=2)
  return path


def plot_results(records: Sequence[dict[str, Any]], out: str | os.PathLike) -> str | None:
  """Bar plots of temp memory and median time per method, one row per (model, T).

  Writes ``<out>/results.png`` and returns its path, or ``None`` (without
  failing) if matplotlib is not installed.
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  configs = list(dict.fromkeys((r["model"], r["T"]) for r in records))
  if not configs:
    return None
  fig, axes = plt.subplots(len(configs), 2, figsize=(12, 3.2 * len(configs)), squeeze=False)
  for row, (model, T) in enumerate(configs):
    recs = [r for r in records if (r["model"], r["T"]) == (model, T)]
    names = [r["method"] for r in recs]
    colors = ["tab:blue" if n.startswith("mixflow") else "tab:gray" for n in names]
    for col, (key, label) in enumerate(
      [("temp_mib", "temp memory (MiB)"), ("seconds", "median time (s)")]
    ):
      ax = axes[row][col]
      vals = [r[key] for r in recs]
      if all(v is None for v in vals):
        ax.text(0.5, 0.5, "not measured (compile-only)", ha="center", va="center")
        ax.set_axis_off()
        continue
      ax.barh(names, [0.0 if v is None else v for v in vals], color=colors)
      ax.invert_yaxis()
      ax.set_xlabel(label)
      ax.set_title(f"{model}, T={T}: {label}")
  fig.tight_layout()
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_benchmark(
  configs: dict[str, Sequence[int]] | None = None,
  methods: Sequence[str] = METHODS,
  *,
  reps: int = 3,
  compile_only: bool = False,
  small: bool = False,
  out: str | os.PathLike | None = None,
  seed: int = 0,
  dtype: Any = jnp.float32,
  progress: bool = True,
  sizes: dict[str, dict[str, int]] | None = None,
  compiler_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
  """Runs :func:`bench_problem` over (model, T) configurations.

  Args:
    configs: model name -> inner-step counts; :data:`DEFAULT_CONFIGS` if None.
    methods: methods to measure (see :data:`METHODS`).
    reps: timed rounds per configuration.
    compile_only: only compile and report memory (``seconds`` is ``None``).
    small: tiny model sizes, for smoke runs and tests.
    out: if given, write ``results.json`` (and ``results.png``) there.
    seed: PRNG seed of every problem.
    dtype: floating dtype of every problem.
    progress: show a tqdm progress bar over configurations.
    sizes: per-model size overrides, e.g. ``{"lm": {"seq_len": 64}}``.
    compiler_options: XLA compile options (see :func:`bench_problem`).

  Returns:
    All records, configuration by configuration.
  """
  from tqdm.auto import tqdm

  configs = DEFAULT_CONFIGS if configs is None else configs
  sizes = sizes or {}
  todo = [(model, T) for model, Ts in configs.items() for T in Ts]
  records: list[dict[str, Any]] = []
  bar = tqdm(todo, desc="mixflow-bench", unit="config", disable=not progress)
  for model, T in bar:
    bar.set_postfix_str(f"{model} T={T}")
    problem = make_problem(model, T, small=small, seed=seed, dtype=dtype, **sizes.get(model, {}))
    records += bench_problem(
      problem,
      methods,
      reps=reps,
      compile_only=compile_only,
      compiler_options=compiler_options,
      on_progress=lambda s, model=model, T=T: bar.set_postfix_str(f"{model} T={T}: {s}"),
    )
    if out is not None:  # Keep partial results if a later configuration fails.
      save_results(records, out)
  bar.close()
  if out is not None:
    save_results(records, out)
    plot_results(records, out)
  return records
