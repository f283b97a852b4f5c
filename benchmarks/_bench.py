r"""Meta-gradient methods and their measurement (memory, time, agreement).

Every method computes the meta-gradient of the outer loss after T inner
optimizer steps (Adam unless the problem names another optimizer) with respect
to the meta-parameters :math:`\eta` (see :mod:`benchmarks._problems` for the
tasks):

.. math::

  \frac{dV(\theta_T)}{d\eta}, \qquad
  \theta_{t+1} = \theta_t + \mathrm{Opt}(\nabla_\theta L(\theta_t, \eta, x_t)).

They differ only in how it is computed:

- ``"standard"``: what a user writes today. Stock ``optax.adam`` (or the
  problem's ``optax.<optimizer>``), ``jax.grad``
  of the inner loss inside a ``jax.lax.scan`` body, ``jax.grad`` of the whole
  thing, no checkpointing: reverse-over-reverse, storing every step's inner
  forward and backward intermediates.
- ``"standard_best"``: the best-configured standard implementation. The same,
  with each step wrapped in ``jax.checkpoint`` and the inner gradients saved
  by name (``checkpoint_name`` + ``save_only_these_names``): the paper's block
  rematerialisation and saved inner gradients, still reverse-over-reverse.
- ``"standard_remat_nosave"``: per-step ``jax.checkpoint`` that saves nothing
  (the recompute redoes the inner gradient).
- ``"mixflow"``: :func:`mixflow_optax.unroll` with its defaults (per-step
  remat, saved inner gradients): the second-order terms forward-over-reverse.
- ``"mixflow_noremat"``: the same with ``remat=False``.
- ``"mixflow_remat_nosave"``: the same with ``save_inner_grads=False``.
- ``"first_order"``: :func:`mixflow_optax.unroll` with
  ``mode="first_order"``: the inner gradients are constants. An
  *approximation* (first-order MAML), the cheap baseline users compare with;
  its ``rel_err`` says how far it is from the exact meta-gradient.
- ``"hvp"``: not a meta-gradient but its floor: ONE forward-over-reverse
  Hessian-vector product of the inner loss at the first inner batch
  (``jax.jvp`` of ``jax.grad`` over the parameters and the meta-parameters
  the inner loss sees, tangent on the parameters). An exact meta-gradient
  needs at least this per inner step; MixFlow-MG's backward pass is T of them.

Measurements of one compiled program (see :func:`compile_method`):

- ``temp_mib``: XLA's compiled temporary buffers
  (``memory_analysis().temp_size_in_bytes``), deterministic and available
  without running; ``arg_mib``, ``out_mib``: its arguments and outputs;
  ``total_mib = temp + arguments + outputs - aliased``: what a device needs
  to run it.
- ``seconds``: median wall-clock seconds of one meta-gradient, with all
  methods compiled and warmed up first and the repetitions interleaved
  (round r runs every method once, in the same order).
- ``peak_mib``: on a GPU or TPU, the runtime peak of the device allocator
  (``device.memory_stats()["peak_bytes_in_use"]``) during the method's first
  call, above what was in use before it; ``None`` on a CPU (no allocator
  statistics) and when the call did not raise the process-wide peak (then the
  allocator cannot tell it).
- ``rel_err``: the normwise relative difference of its meta-gradient from
  ``"standard"``'s, :math:`\max_\text{leaves} \|a - b\|_\infty /
  \|b\|_\infty`.

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 4: block
  rematerialisation and saved inner gradients; Section 5: benchmarks).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

import mixflow_optax as mfo
from benchmarks._problems import Problem

__all__ = [
  "METHODS",
  "CORE_METHODS",
  "FAST_COMPILE_OPTIONS",
  "NOT_META_GRADIENTS",
  "make_meta_grad",
  "compile_method",
  "time_methods",
  "interleaved_medians",
  "bench_problem",
]

#: All methods, in the order they are run (the reference ``"standard"`` first).
METHODS: tuple[str, ...] = (
  "standard",
  "standard_best",
  "mixflow",
  "mixflow_noremat",
  "mixflow_remat_nosave",
  "standard_remat_nosave",
  "first_order",
  "hvp",
)

#: The three methods every configuration of the suite measures.
CORE_METHODS: tuple[str, ...] = ("standard", "standard_best", "mixflow")

#: Where ``python -m benchmarks`` keeps compiled programs between runs (JAX's persistent
#: compilation cache); ``--compilation-cache none`` turns it off.
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "jax_compilation")


def enable_compilation_cache(cache_dir: str, min_compile_secs: float = 1.0) -> str:
  """Turns on JAX's persistent compilation cache in ``cache_dir``; returns the expanded path.

  Programs that took at least ``min_compile_secs`` to compile are written there and loaded
  instead of recompiled by a later process with the same program, options and JAX version.
  """
  path = os.path.expanduser(cache_dir)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


#: XLA options that cut CPU compile time several-fold (no LLVM optimisation,
#: legacy fusion emitters) at the cost of slower code. The memory analysis is
#: the same to within 0.1% (0.1 MiB of thousands in the default suite), so the
#: suite compiles its compile-only configurations with them; timed programs
#: use XLA's defaults unless ``--fast-compile``.
FAST_COMPILE_OPTIONS: dict[str, Any] = {
  "xla_backend_optimization_level": 0,
  "xla_cpu_use_fusion_emitters": False,
}

#: Methods that compute something other than the meta-gradient (no ``rel_err``).
NOT_META_GRADIENTS: tuple[str, ...] = ("hvp",)

REFERENCE = "standard"
BEST_STANDARD = "standard_best"
# Name of the inner gradients in the hand-written standard baselines.
_GRAD_NAME = "inner_grad"
_MIB = 2**20

MetaGradFn = Callable[[Any, Any, Any, Any], Any]


def _initial_params(problem: Problem, meta_params: Any, params: Any) -> Any:
  return meta_params if problem.task == "maml" else params


def _standard_meta_loss(problem: Problem, remat: str | None) -> Callable:
  """The meta-loss a user writes with stock optax (``remat``: None, "save_grads", "nothing")."""

  def meta_loss(meta_params, params, inner_batches, outer_batch):
    hyperparams = problem.hyperparams_fn(meta_params) if problem.hyperparams_fn else {}
    make_opt = getattr(optax, problem.optimizer)
    opt = make_opt(**{"learning_rate": problem.learning_rate, **hyperparams})
    inner_meta = {} if problem.task == "maml" else meta_params

    def step(carry, batch):
      params, opt_state = carry
      grads = jax.grad(problem.inner_loss)(params, inner_meta, batch)
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
    params0 = _initial_params(problem, meta_params, params)
    (params, _), _ = jax.lax.scan(step, (params0, opt.init(params0)), inner_batches)
    return problem.outer_loss(params, outer_batch)

  return meta_loss


def _unroll_meta_loss(problem: Problem, **unroll_kwargs: Any) -> Callable:
  """The meta-loss written with :func:`mixflow_optax.unroll`."""
  opt = getattr(mfo.transforms, problem.optimizer)(problem.learning_rate)
  run = mfo.unroll(problem.inner_loss, opt, hyperparams_fn=problem.hyperparams_fn, **unroll_kwargs)

  def meta_loss(meta_params, params, inner_batches, outer_batch):
    params0 = _initial_params(problem, meta_params, params)
    # For MAML the inner loss does not see the meta-parameters: pass none, so
    # that the inner-gradient rule has no cotangent to compute for them.
    inner_meta = {} if problem.task == "maml" else meta_params
    params, _ = run(inner_meta, params0, opt.init(params0), inner_batches)
    return problem.outer_loss(params, outer_batch)

  return meta_loss


_META_LOSSES: dict[str, Callable[[Problem], Callable]] = {
  "standard": lambda p: _standard_meta_loss(p, remat=None),
  "standard_best": lambda p: _standard_meta_loss(p, remat="save_grads"),
  "standard_remat_nosave": lambda p: _standard_meta_loss(p, remat="nothing"),
  # Library defaults: remat and save_inner_grads are deliberately not passed.
  "mixflow": lambda p: _unroll_meta_loss(p, mode="mixflow"),
  "mixflow_noremat": lambda p: _unroll_meta_loss(p, mode="mixflow", remat=False),
  "mixflow_remat_nosave": lambda p: _unroll_meta_loss(
    p, mode="mixflow", remat=True, save_inner_grads=False
  ),
  "first_order": lambda p: _unroll_meta_loss(p, mode="first_order"),
  "hvp": None,  # Not a meta-loss: see _inner_hvp.
}


def check_methods(methods: Sequence[str]) -> list[str]:
  """``methods`` with the reference ``"standard"`` first; raises on unknown names."""
  for m in methods:
    if m not in _META_LOSSES:
      raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}.")
  return list(dict.fromkeys([REFERENCE, *methods]))


def make_meta_grad(problem: Problem, method: str) -> MetaGradFn:
  """The jitted meta-gradient of ``problem`` computed by ``method``.

  Args:
    problem: a :class:`~benchmarks.Problem`.
    method: one of :data:`METHODS`.

  Returns:
    ``f(meta_params, params, inner_batches, outer_batch) -> d meta_params``,
    jitted. The data are arguments rather than closed-over constants, so that
    they are not baked into the compiled program.

  Examples:
    >>> from benchmarks import make_problem
    >>> p = make_problem("mlp", T=2, small=True)
    >>> f = make_meta_grad(p, "mixflow")
    >>> f(*p.args).shape
    (2, 64)
  """
  check_methods([method])
  if method == "hvp":
    return jax.jit(_inner_hvp(problem))
  return jax.jit(jax.grad(_META_LOSSES[method](problem)))


def _inner_hvp(problem: Problem) -> MetaGradFn:
  """One forward-over-reverse Hessian-vector product of the inner loss (the ``"hvp"`` method)."""

  def hvp(meta_params, params, inner_batches, outer_batch):
    del outer_batch
    params = _initial_params(problem, meta_params, params)
    inner_meta = {} if problem.task == "maml" else meta_params
    batch = jax.tree.map(lambda x: x[0], inner_batches)

    def grad(params, inner_meta):
      # The gradient over everything differentiable that the inner loss sees,
      # as MixFlow-MG's rule differentiates it.
      return jax.grad(problem.inner_loss, argnums=(0, 1))(params, inner_meta, batch)

    tangents = (params, jax.tree.map(jnp.zeros_like, inner_meta))
    return jax.jvp(grad, (params, inner_meta), tangents)[1]

  return hvp


def compile_method(
  problem: Problem, method: str, compiler_options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
  """Lowers and compiles ``method`` on ``problem`` (which may be abstract).

  Returns:
    ``(compiled, info)``: the executable and its memory analysis (``temp_mib,
    arg_mib, out_mib, alias_mib, total_mib``, ``None`` where the backend has
    none) and ``compile_s``, the seconds to trace, lower and compile.
  """
  fn = make_meta_grad(problem, method)
  t0 = time.perf_counter()
  mem = mfo.compiled_memory(fn, *problem.args, compiler_options=compiler_options)
  info: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
  # The same lowering and options again: JAX returns the executable it just compiled.
  compiled = fn.lower(*problem.args).compile(compiler_options)
  info.update(
    temp_mib=mem.temp_bytes / _MIB,
    arg_mib=mem.argument_bytes / _MIB,
    out_mib=mem.output_bytes / _MIB,
    alias_mib=mem.alias_bytes / _MIB,
    total_mib=mem.total_mib,
  )
  return compiled, info


def _rel_err(a: Any, b: Any) -> float:
  """Normwise relative difference ``max over leaves of ||a - b||_inf / ||b||_inf``."""
  errs = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.max(np.abs(y)) if y.size else 0.0
    diff = np.max(np.abs(x - y)) if y.size else 0.0
    errs.append(float(diff / scale) if scale > 0 else float(diff))
  return max(errs) if errs else 0.0


def _grad_norm(tree: Any) -> float:
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def _allocator_stats() -> dict[str, int] | None:
  """Memory statistics of the first device, or ``None`` (CPU: no allocator statistics)."""
  if jax.default_backend() == "cpu":
    return None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # Some runtimes do not implement it.
    return None
  if not stats or "peak_bytes_in_use" not in stats or "bytes_in_use" not in stats:
    return None
  return stats


def time_methods(
  compiled: dict[str, Any],
  args: Sequence[Any],
  *,
  reps: int,
  order: Sequence[str] | None = None,
  on_progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
  """Warms up and times compiled meta-gradients of one problem.

  Each method runs once first (its meta-gradient is checked against
  ``"standard"``, and on a GPU/TPU its allocator peak read), then ``reps``
  interleaved rounds run every method once; the median is reported.

  Args:
    compiled: method -> compiled executable; must include ``"standard"``.
    args: the problem's arguments.
    reps: timed rounds (>= 1).
    order: the warm-up order; ascending compiled memory makes each first call
      likely to raise the allocator's process-wide peak, which is when its
      own peak can be read.
    on_progress: called with a short status string before each phase.

  Returns:
    method -> ``{seconds, rel_err, meta_grad_norm, peak_mib}``.
  """
  say = on_progress or (lambda _: None)
  out: dict[str, dict[str, Any]] = {m: {} for m in compiled}
  grads = {}
  for m in order or compiled:
    say(f"warm-up {m}")
    before = _allocator_stats()
    grads[m] = jax.block_until_ready(compiled[m](*args))
    after = _allocator_stats()
    peak = None
    if before is not None and after is not None:
      if after["peak_bytes_in_use"] > before["peak_bytes_in_use"]:
        peak = (after["peak_bytes_in_use"] - before["bytes_in_use"]) / _MIB
    out[m]["peak_mib"] = peak
  for m in compiled:
    exact = m not in NOT_META_GRADIENTS
    out[m]["rel_err"] = _rel_err(grads[m], grads[REFERENCE]) if exact else None
    out[m]["meta_grad_norm"] = _grad_norm(grads[m])
  del grads
  calls = {m: (lambda f=f: f(*args)) for m, f in compiled.items()}
  seconds = interleaved_medians(calls, reps, on_round=lambda r: say(f"round {r + 1}/{reps}"))
  for m, sec in seconds.items():
    out[m]["seconds"] = sec
  return out


def interleaved_medians(
  calls: dict[Any, Callable[[], Any]],
  reps: int,
  *,
  on_round: Callable[[int], None] | None = None,
) -> dict[Any, float]:
  """Median seconds of each call, the calls interleaved within each of ``reps`` rounds.

  Interleaving spreads slow drifts of a shared machine (other jobs, thermal
  state) over every call alike, so that ratios of medians stay meaningful.
  The calls must already be compiled and warm.

  Args:
    calls: key -> zero-argument function (its result is waited for).
    reps: timed rounds (>= 1).
    on_round: called with the round's index before each round.

  Returns:
    key -> median seconds.
  """
  times: dict[Any, list[float]] = {k: [] for k in calls}
  for r in range(reps):
    if on_round is not None:
      on_round(r)
    for k, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(ts) for k, ts in times.items()}


def _ratio(num: float | None, den: float | None) -> float | None:
  if num is None or den is None or den == 0:
    return None
  return num / den


def add_ratios(records: list[dict[str, Any]]) -> None:
  """Adds memory and time ratios against ``"standard"`` and ``"standard_best"`` (in place).

  Records are grouped by configuration (everything but the method). Memory
  ratios are ``reference / method`` on ``temp_mib`` and ``total_mib`` (> 1:
  the method uses less); time ratios are ``method / reference`` (< 1:
  faster) and ``pct_faster = 100 (1 - time_ratio)``, the wall-clock saved;
  ``mem_vs_hvp = temp / temp of "hvp"`` where the configuration measured it.
  """
  groups: dict[tuple, dict[str, dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(config_key(r), {})[r["method"]] = r
  for group in groups.values():
    for r in group.values():
      # How far above the floor of one inner HVP (> 1: more memory than it).
      r["mem_vs_hvp"] = _ratio(r["temp_mib"], group.get("hvp", {}).get("temp_mib"))
      for ref in (REFERENCE, BEST_STANDARD):
        base = group.get(ref, {})
        r[f"mem_ratio_vs_{ref}"] = _ratio(base.get("temp_mib"), r["temp_mib"])
        r[f"total_ratio_vs_{ref}"] = _ratio(base.get("total_mib"), r["total_mib"])
        tr = _ratio(r["seconds"], base.get("seconds"))
        r[f"time_ratio_vs_{ref}"] = tr
        r[f"pct_faster_vs_{ref}"] = None if tr is None else 100.0 * (1.0 - tr)


def config_key(record: dict[str, Any]) -> tuple:
  """What identifies a configuration: task, model, optimizer, sizes, T and dtype (not the method)."""
  cfg = tuple(sorted((k, v) for k, v in record["config"].items()))
  opt = record.get("optimizer", "adam")
  return (record["task"], record["model"], opt, record["T"], record["dtype"], cfg)


def make_record(
  problem: Problem, method: str, info: dict[str, Any], *, compile_only: bool, reps: int
) -> dict[str, Any]:
  """One result record (ratios are added by :func:`add_ratios`)."""
  leaf = jax.tree.leaves(problem.params if problem.params is not None else problem.meta_params)[0]
  return {
    "task": problem.task,
    "model": problem.model,
    "family": problem.family,
    "T": problem.T,
    "optimizer": problem.optimizer,
    "method": method,
    "batch": problem.config["batch"],
    "seq_len": problem.config.get("seq_len"),
    "M": problem.config.get("M"),
    "n_params": problem.config["n_params"],
    "vocab": problem.config.get("vocab"),
    "attention": problem.config.get("attention"),
    "block_remat": problem.config.get("block_remat"),
    # The naive LM: XLA attention and no per-block remat (see benchmarks._problems).
    "naive": problem.config.get("attention") == "xla" and not problem.config.get("block_remat"),
    "compile_only": compile_only,
    "temp_mib": info.get("temp_mib"),
    "arg_mib": info.get("arg_mib"),
    "out_mib": info.get("out_mib"),
    "total_mib": info.get("total_mib"),
    "peak_mib": info.get("peak_mib"),
    "seconds": info.get("seconds"),
    "compile_s": info.get("compile_s"),
    "rel_err": info.get("rel_err"),
    "meta_grad_norm": info.get("meta_grad_norm"),
    "reps": 0 if compile_only else reps,
    "dtype": str(jnp.dtype(leaf.dtype)),
    "backend": jax.default_backend(),
    "config": dict(problem.config),
  }


def bench_problem(
  problem: Problem,
  methods: Sequence[str] = CORE_METHODS,
  *,
  reps: int = 3,
  compile_only: bool = False,
  compiler_options: dict[str, Any] | None = None,
  on_progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
  """Measures every method's meta-gradient of one problem.

  Compiles all methods (recording their memory), then, unless
  ``compile_only``, warms each up and times ``reps`` interleaved rounds
  (:func:`time_methods`).

  Args:
    problem: the problem (abstract problems need ``compile_only``).
    methods: methods to measure; ``"standard"`` is added first if missing
      (it is the reference of every ratio and of the agreement check).
    reps: timed rounds.
    compile_only: only compile: ``seconds`` and ``rel_err`` are ``None``.
    compiler_options: XLA options for ``compile`` (e.g.
      :data:`FAST_COMPILE_OPTIONS`); ``None``: XLA's defaults.
    on_progress: called with a short status string before each phase.

  Returns:
    One record (dict) per method, with the ratios of :func:`add_ratios`.

  Examples:
    >>> from benchmarks import make_problem
    >>> p = make_problem("mlp", T=2, small=True)
    >>> recs = bench_problem(p, compile_only=True, compiler_options=FAST_COMPILE_OPTIONS)
    >>> [r["method"] for r in recs]
    ['standard', 'standard_best', 'mixflow']
    >>> recs[2]["mem_ratio_vs_standard"] > 1
    True
  """
  methods = check_methods(methods)
  if reps < 1 and not compile_only:
    raise ValueError(f"reps must be >= 1, got {reps}.")
  say = on_progress or (lambda _: None)
  compiled, infos = {}, {}
  for m in methods:
    say(f"compile {m}")
    compiled[m], infos[m] = compile_method(problem, m, compiler_options)
  if not compile_only:
    order = sorted(methods, key=lambda m: infos[m]["total_mib"] or 0.0)
    timed = time_methods(compiled, problem.args, reps=reps, order=order, on_progress=say)
    for m in methods:
      infos[m].update(timed[m])
  records = [
    make_record(problem, m, infos[m], compile_only=compile_only, reps=reps) for m in methods
  ]
  add_ratios(records)
  return records
