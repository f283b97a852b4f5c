r"""Exact against approximate meta-gradients on one table: error, memory and time.

Every problem learns per-group log L2 strengths :math:`\eta` (a meta-parameter of the inner
*loss*, where implicit differentiation applies) through T inner steps on one fixed full batch:

.. math::

  L(\theta, \eta) = \ell(\theta; x) + \tfrac12 \sum_g e^{\eta_g} \|\theta_g\|^2, \qquad
  V(\theta_T) = \ell(\theta_T; x_\text{val}).

Problems: ``ridge`` (least squares, one L2 strength per feature, inner gradient descent at step
``1 / lambda_max``: convex, solved to float64 round-off in 300 steps, and the same problem after
only 5 steps), ``mlp`` (the suite's tanh MLP, one strength per parameter leaf, 300 steps of
gradient descent) and ``lm`` (the suite's transformer LM at a tiny size, one strength per
parameter leaf, 100 steps of Adam).

Methods, all differentiating the same T-step procedure:

- ``bptt``: plain backpropagation through time (``jax.grad`` of a ``lax.scan`` of stock optax
  steps calling ``jax.grad``): the reference, run in float64;
- ``mixflow``: ``mfo.unroll`` with its defaults (exact, forward-over-reverse);
- ``mixflow_ckpt`` (T >= 100): the same with ``checkpoint_every`` the divisor of T nearest
  sqrt(T), storing about 2 sqrt(T) carries instead of T;
- ``truncated``: reverse mode through the last ``K = T // 10`` steps only (the first T - K run
  without a derivative): an approximation;
- ``first_order``: ``mfo.unroll(mode="first_order")``: inner gradients treated as constants;
- ``forward``: ``jax.jacfwd`` of the ``mfo.unroll`` meta-loss (exact; one JVP per meta-parameter);
- ``implicit_cg`` / ``implicit_neumann``: ``mfo.implicit_unroll`` (the implicit function theorem at
  :math:`\theta_T`; conjugate gradients or a Neumann series with step ``1 / lambda_max(H)``, at
  most 100 / 500 Hessian-vector products, relative tolerance 1e-10 in float64, 1e-5 in float32).

Measured: ``err_f64`` / ``err_f32``, the normwise relative error
:math:`\max_g |\hat g - g| / \max_g |g|` of the method's meta-gradient, computed in float64 and
in float32, against float64 ``bptt``; ``temp_mib``, compiled temporary memory of the float32
program (``mfo.compiled_memory``, XLA's default flags unless ``XLA_FLAGS`` says otherwise);
``ms``, the median of interleaved float32 runs; for the implicit methods the inner gradient norm
:math:`\|\nabla_\theta L(\theta_T)\|` and the solve's relative residual (float64).

Usage::

  python -m benchmarks.methods                      # docs/bench/methods/, ~4 min on 2 cores
  python -m benchmarks.methods --out /tmp/m --quick # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks._bench import interleaved_medians
from benchmarks._problems import make_problem

METHODS: tuple[str, ...] = (
  "bptt",
  "mixflow",
  "mixflow_ckpt",
  "truncated",
  "first_order",
  "forward",
  "implicit_cg",
  "implicit_neumann",
)
#: Methods whose meta-gradient equals the reference's up to round-off.
EXACT: tuple[str, ...] = ("bptt", "mixflow", "mixflow_ckpt", "forward")
#: ``mixflow_ckpt`` runs for horizons of at least this many steps.
LONG_T = 100
L2 = 1e-2  # initial L2 strength of every group


class Bilevel(NamedTuple):
  """One problem: a full-batch inner loss with per-group L2 strengths, an outer loss."""

  name: str
  T: int
  inner_loss: Callable[..., jax.Array]
  outer_loss: Callable[..., jax.Array]
  meta: Any
  params: Any
  batch: Any
  outer_batch: Any
  optimizer: str  # "sgd" or "adam": optax.<name> / mfo.transforms.<name>
  learning_rate: float
  neumann_step: float
  n_params: int

  def stacked(self, steps: int) -> Any:
    """The full batch, once per step: leading axis ``steps``."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (steps, *a.shape)), self.batch)

  @property
  def args(self) -> tuple[Any, ...]:
    """``(meta, params, inner_batches, outer_batch)``."""
    return (self.meta, self.params, self.stacked(self.T), self.outer_batch)

  @property
  def truncated_args(self) -> tuple[Any, ...]:
    """``args`` with the inner batches split in ``(first T - K, last K)``.

    Two arguments, not slices of one, so that the program copies no batches.
    """
    k = truncation(self.T)
    split = (self.stacked(self.T - k), self.stacked(k))
    return (self.meta, self.params, split, self.outer_batch)

  def args_for(self, method: str) -> tuple[Any, ...]:
    return self.truncated_args if method == "truncated" else self.args


def segment(T: int) -> int:
  """``checkpoint_every`` of ``mixflow``: the divisor of T nearest sqrt(T).

  A K that does not divide T makes ``mfo.unroll`` slice and reshape the inner batches into
  segments, a copy of all of them (10 MiB on the ridge problem, whose batches are large next to
  its 32 parameters); a divisor reshapes them for free.
  """
  return min((k for k in range(1, T + 1) if T % k == 0), key=lambda k: abs(k - math.sqrt(T)))


def truncation(T: int) -> int:
  """Steps differentiated by the ``truncated`` method: the last ``K = max(1, T // 10)``."""
  return max(1, T // 10)


def _l2_loss(data_loss: Callable) -> Callable:
  """``data_loss`` plus ``0.5 sum_g exp(eta_g) ||theta_g||^2`` over the leaves ``g`` of ``theta``."""

  def inner_loss(params, meta, batch):
    norms = jnp.stack([jnp.sum(g**2) for g in jax.tree.leaves(params)])
    return data_loss(params, batch) + 0.5 * jnp.sum(jnp.exp(meta["log_l2"]) * norms)

  return inner_loss


def _lambda_max(inner_loss: Callable, params: Any, meta: Any, batch: Any, iters: int = 30) -> float:
  """The largest Hessian eigenvalue of the inner loss at ``params`` (power iteration)."""
  grad = lambda p: jax.grad(inner_loss)(p, meta, batch)
  hvp = jax.jit(lambda v: jax.jvp(grad, (params,), (v,))[1])
  v = jax.tree.map(lambda p: jnp.ones_like(p) / math.sqrt(p.size), params)
  lam = 0.0
  for _ in range(iters):
    hv = hvp(v)
    lam = float(optax.tree.norm(hv))
    v = jax.tree.map(lambda x: x / lam, hv)
  return lam


def ridge(T: int, dtype: Any, n: int = 256, d: int = 32) -> Bilevel:
  """Least squares, one L2 strength per feature; gradient descent at step 1 / lambda_max."""
  rng = np.random.default_rng(0)
  w_true = rng.standard_normal(d)
  x, xv = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  y = x @ w_true + rng.standard_normal(n)
  yv = xv @ w_true + rng.standard_normal(n)
  cast = lambda a: jnp.asarray(a, dtype)

  def data_loss(w, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)

  def inner_loss(w, meta, batch):
    return data_loss(w, batch) + 0.5 * jnp.sum(jnp.exp(meta["log_l2"]) * w**2)

  meta = {"log_l2": cast(np.full(d, math.log(L2)))}
  lam_max = float(np.linalg.eigvalsh(x.T @ x / n).max()) + L2
  return Bilevel(
    name="ridge",
    T=T,
    inner_loss=inner_loss,
    outer_loss=data_loss,
    meta=meta,
    params=cast(np.zeros(d)),
    batch=(cast(x), cast(y)),
    outer_batch=(cast(xv), cast(yv)),
    optimizer="sgd",
    learning_rate=1.0 / lam_max,
    neumann_step=1.0 / lam_max,
    n_params=d,
  )


def _from_suite(model: str, T: int, dtype: Any, optimizer: str, lr: float, **sizes) -> Bilevel:
  """A benchmark-suite model, trained on its first inner batch, with per-leaf L2 strengths."""
  p = make_problem(model, T, task="learning_rate", small=True, dtype=dtype, **sizes)
  data_loss = p.outer_loss
  inner_loss = _l2_loss(data_loss)
  leaves = jax.tree.leaves(p.params)
  meta = {"log_l2": jnp.full((len(leaves),), math.log(L2), dtype)}
  batch = jax.tree.map(lambda a: a[0], p.inner_batches)
  return Bilevel(
    name=model,
    T=T,
    inner_loss=inner_loss,
    outer_loss=data_loss,
    meta=meta,
    params=p.params,
    batch=batch,
    outer_batch=p.outer_batch,
    optimizer=optimizer,
    learning_rate=lr,
    neumann_step=0.0,  # set from the Hessian at theta_T by `problems`
    n_params=int(sum(x.size for x in leaves)),
  )


def problems(quick: bool, dtype: Any) -> list[Bilevel]:
  """The problems of the table, in ``dtype``."""
  scale = 10 if quick else 1
  out = [
    ridge(300 // scale, dtype),
    ridge(5, dtype),
    _from_suite("mlp", 300 // scale, dtype, "sgd", 0.05, batch=64),
    _from_suite(
      "lm", 100 // scale, dtype, "adam", 1e-2, batch=4, seq_len=16, attention="mfo_checkpoint"
    ),
  ]
  return out


def _with_neumann_step(prob: Bilevel) -> Bilevel:
  """The Neumann step ``1 / lambda_max`` of the Hessian at the end of the float64 unroll."""
  if prob.neumann_step:
    return prob
  run = mfo.unroll(prob.inner_loss, getattr(mfo.transforms, prob.optimizer)(prob.learning_rate))
  meta, params, batches, _ = prob.args
  opt = getattr(mfo.transforms, prob.optimizer)(prob.learning_rate)
  params_t, _ = jax.jit(run)(meta, params, opt.init(params), batches)
  return prob._replace(neumann_step=1.0 / _lambda_max(prob.inner_loss, params_t, meta, prob.batch))


# ---------------------------------------------------------------------------------- methods


def _bptt_meta_loss(prob: Bilevel) -> Callable:
  """What a user writes with stock optax: jax.grad inside a lax.scan."""

  def meta_loss(meta, params, batches, outer_batch):
    opt = getattr(optax, prob.optimizer)(prob.learning_rate)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(prob.inner_loss)(params, meta, batch)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), batches)
    return prob.outer_loss(params, outer_batch)

  return meta_loss


def _unroll_meta_loss(prob: Bilevel, truncated: bool = False, **options: Any) -> Callable:
  """The meta-loss through ``mfo.unroll``.

  ``truncated``: ``batches`` is ``(head, tail)``; the head's steps run without a derivative.
  """
  opt = getattr(mfo.transforms, prob.optimizer)(prob.learning_rate)
  run = mfo.unroll(prob.inner_loss, opt, **options)

  def meta_loss(meta, params, batches, outer_batch):
    state = opt.init(params)
    if truncated:
      head, batches = batches
      params, state = jax.lax.stop_gradient(run(meta, params, state, head))
    params, _ = run(meta, params, state, batches)
    return prob.outer_loss(params, outer_batch)

  return meta_loss


def _implicit_options(prob: Bilevel, solver: str, dtype: Any) -> dict[str, Any]:
  tol = 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5
  if solver == "cg":
    return dict(solver="cg", maxiter=100, tol=tol)
  return dict(solver="neumann", maxiter=500, tol=tol, neumann_step=prob.neumann_step)


def _implicit_meta_loss(prob: Bilevel, solver: str, dtype: Any) -> Callable:
  opt = getattr(mfo.transforms, prob.optimizer)(prob.learning_rate)
  options = _implicit_options(prob, solver, dtype)
  run = mfo.implicit_unroll(prob.inner_loss, opt, unconverged="ignore", **options)

  def meta_loss(meta, params, batches, outer_batch):
    params, _ = run(meta, params, opt.init(params), batches)
    return prob.outer_loss(params, outer_batch)

  return meta_loss


def meta_grad(prob: Bilevel, method: str, dtype: Any) -> Callable:
  """``f(meta, params, batches, outer_batch) -> d meta``, jitted, for ``method``."""
  if method == "bptt":
    return jax.jit(jax.grad(_bptt_meta_loss(prob)))
  if method == "mixflow":
    return jax.jit(jax.grad(_unroll_meta_loss(prob)))
  if method == "mixflow_ckpt":
    return jax.jit(jax.grad(_unroll_meta_loss(prob, checkpoint_every=segment(prob.T))))
  if method == "truncated":
    return jax.jit(jax.grad(_unroll_meta_loss(prob, truncated=True)))
  if method == "first_order":
    return jax.jit(jax.grad(_unroll_meta_loss(prob, mode="first_order")))
  if method == "forward":
    # Under jax.jacfwd, mfo.unroll differentiates the plain inner gradient forward-over-reverse.
    return jax.jit(jax.jacfwd(_unroll_meta_loss(prob)))
  if method in ("implicit_cg", "implicit_neumann"):
    return jax.jit(jax.grad(_implicit_meta_loss(prob, method.split("_")[1], dtype)))
  raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")


def implicit_info(prob: Bilevel, solver: str, dtype: Any) -> dict[str, float]:
  """The inner gradient norm and the solve's residual of the implicit meta-gradient."""
  opt = getattr(mfo.transforms, prob.optimizer)(prob.learning_rate)
  fn = mfo.implicit_meta_grad(
    prob.inner_loss,
    lambda params, meta, batch: prob.outer_loss(params, batch),
    opt,
    unconverged="ignore",
    **_implicit_options(prob, solver, dtype),
  )
  meta, params, batches, outer = prob.args
  info = jax.jit(fn)(meta, params, opt.init(params), batches, outer).info
  return {
    "grad_norm": float(info.grad_norm),
    "relative_residual": float(info.relative_residual),
    "iterations": int(info.iterations),
  }


def rel_err(a: Any, b: Any) -> float:
  """Normwise relative error ``max |a - b| / max |b|`` over all leaves."""
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------- the table


def run(quick: bool, reps: int, methods: Sequence[str] = METHODS) -> list[dict[str, Any]]:
  """Measures every method on every problem; one record per (problem, method)."""
  with jax.enable_x64(True):
    probs64 = [_with_neumann_step(p) for p in problems(quick, jnp.float64)]
  probs32 = [
    p._replace(neumann_step=p64.neumann_step)
    for p, p64 in zip(problems(quick, jnp.float32), probs64)
  ]
  records = []
  all_methods = methods
  for p64, p32 in zip(probs64, probs32):
    label = f"{p64.name} T={p64.T}"
    methods = [m for m in all_methods if m != "mixflow_ckpt" or p64.T >= LONG_T]
    with jax.enable_x64(True):
      grads64 = {m: meta_grad(p64, m, jnp.float64)(*p64.args_for(m)) for m in methods}
      ref = grads64["bptt"]
      infos = {
        m: implicit_info(p64, m.split("_")[1], jnp.float64) for m in methods if "implicit" in m
      }
    fns, mems = {}, {}
    for m in methods:
      fn = meta_grad(p32, m, jnp.float32)
      args = p32.args_for(m)
      mems[m] = mfo.compiled_memory(fn, *args).temp_mib
      # The same lowering again: JAX returns the executable it just compiled.
      fns[m] = (fn.lower(*args).compile(), args)
    grads32 = {m: jax.block_until_ready(f(*a)) for m, (f, a) in fns.items()}
    seconds = interleaved_medians({m: (lambda f=f, a=a: f(*a)) for m, (f, a) in fns.items()}, reps)
    for m in methods:
      record = {
        "problem": p64.name,
        "T": p64.T,
        "optimizer": p64.optimizer,
        "n_params": p64.n_params,
        "n_meta": int(p64.meta["log_l2"].size),
        "method": m,
        "exact": m in EXACT,
        "err_f64": rel_err(grads64[m], ref),
        "err_f32": rel_err(grads32[m], ref),
        "temp_mib": mems[m],
        "ms": 1e3 * seconds[m],
        **infos.get(m, {}),
      }
      records.append(record)
      print(
        f"{label:14s} {m:17s} err64 {record['err_f64']:9.2e} err32 {record['err_f32']:9.2e} "
        f"{record['temp_mib']:9.3f} MiB {record['ms']:9.2f} ms",
        flush=True,
      )
  return records


def _fmt(x: float) -> str:
  if x == 0:
    return "0"
  return f"{x:.1e}" if x < 1e-2 or x >= 1e3 else f"{x:.3g}"


def format_markdown(records: list[dict[str, Any]]) -> str:
  """The results as one markdown table, one block of rows per problem."""
  lines = [
    "| problem | T | method | rel. error, f64 | rel. error, f32 | temp MiB (f32) | ms (f32) "
    "| inner grad norm | solve rel. residual (HVPs) |",
    "|---|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    implicit = "grad_norm" in r
    lines.append(
      f"| {r['problem']} | {r['T']} | {r['method']} | {_fmt(r['err_f64'])} | "
      f"{_fmt(r['err_f32'])} | {r['temp_mib']:.3f} | {r['ms']:.2f} | "
      + (
        f"{_fmt(r['grad_norm'])} | {_fmt(r['relative_residual'])} ({r['iterations']}) |"
        if implicit
        else "| |"
      )
    )
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/bench/methods"))
  parser.add_argument("--quick", action="store_true", help="a smoke run with T / 10")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  start = time.time()
  records = run(args.quick, 2 if args.quick else args.reps)
  results = {
    "config": {
      "quick": args.quick,
      "reps": args.reps,
      "l2_init": L2,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
    },
    "records": records,
    "seconds": time.time() - start,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(results, indent=1))
  (args.out / "table.md").write_text(format_markdown(records))
  print(format_markdown(records))
  print(f"{results['seconds']:.0f} s")
  return records


if __name__ == "__main__":
  main()
