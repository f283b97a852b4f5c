"""Cost of one meta-step against one plain optax training step (compiled FLOPs and wall time).

The model is the MLP of the getting-started guide (8 -> 16 -> 1, tanh, batch 32), the inner
optimizer Adam, the meta-parameter Adam's log learning rate (one element, so forward mode
applies), online meta-learning with ``mfo.meta_optimizer``. For T inner steps per meta-step,
modes ``mixflow`` and ``forward``:

- FLOPs: ``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``. XLA counts a loop body
  once whatever its trip count, so the FLOPs are taken from programs with the inner loop fully
  unrolled (``unroll_steps=True``); the timed programs are the defaults.
- FLOPs are also given relative to the T inner steps alone (``mfo.unroll`` without a
  meta-gradient, fully unrolled too): the fully unrolled programs' bookkeeping of stacked
  per-step outputs grows with T in both, so this ratio isolates the meta-gradient's own work.
- time: interleaved medians (samples of ``--calls`` back-to-back calls) of one meta-step and
  one plain ``optax.adam`` step (the same model and batch: ``jax.grad`` and ``update``),
  after compilation.

Run: ``python -m benchmarks.meta_step_cost [--reps N]``; prints a markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import mixflow_optax as mfo
from benchmarks._bench import interleaved_medians

B, D, H = 32, 8, 16


def model(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"]


def loss(params, meta, batch):
  x, y = batch
  return jnp.mean((model(params, x) - y) ** 2)


def problem(T, seed=0):
  kx, ky, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"w1": jax.random.normal(kw, (D, H)) / D**0.5, "w2": jnp.zeros((H, 1))}
  xs, ys = jax.random.normal(kx, (T, B, D)), jax.random.normal(ky, (T, B, 1))
  return params, (xs, ys), (xs[0], ys[0])


def meta_step(T, mode, unroll_steps=1):
  params, inner, outer = problem(T)
  mo = mfo.meta_optimizer(
    loss,
    loss,
    mfo.transforms.adam(1e-2),
    optax.adam(1e-2),
    hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)},
    mode=mode,
    unroll_steps=unroll_steps,
  )
  state = mo.init(jnp.log(1e-2), params)
  return jax.jit(mo.step), (state, inner, outer)


def plain_step():
  params, (xs, ys), _ = problem(1)
  opt = optax.adam(1e-2)

  def step(params, state, batch):
    grads = jax.grad(loss)(params, None, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step), (params, opt.init(params), (xs[0], ys[0]))


def unroll_only(T):
  """The T inner steps alone (no meta-gradient), fully unrolled: the FLOPs' denominator."""
  params, inner, _ = problem(T)
  opt = mfo.transforms.adam(1e-2)
  run = mfo.unroll(loss, opt, unroll_steps=True)
  return jax.jit(lambda p, b: run(None, p, opt.init(p), b)), (params, inner)


def flops(fn, args):
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--ts", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--calls", type=int, default=20, help="calls per timed sample")
  args = parser.parse_args(argv)

  plain, plain_args = plain_step()
  plain_flops = flops(plain, plain_args)
  n = args.calls

  def repeat(fn, fn_args):
    # n calls on the same inputs (no donation): one sample, divided by n below.
    def call():
      for _ in range(n):
        out = fn(*fn_args)
      return jax.block_until_ready(out)

    return call

  calls = {"plain": repeat(plain, plain_args)}
  rows = []
  for T in args.ts:
    for mode in ("mixflow", "forward"):
      unrolled, u_args = meta_step(T, mode, unroll_steps=True)
      step, s_args = meta_step(T, mode)
      jax.block_until_ready(step(*s_args))  # compile and warm
      calls[(T, mode)] = repeat(step, s_args)
      rows.append((T, mode, flops(unrolled, u_args), flops(*unroll_only(T))))
  jax.block_until_ready(plain(*plain_args))
  times = {k: v / n for k, v in interleaved_medians(calls, args.reps).items()}
  print(f"plain optax Adam step: {plain_flops:,.0f} FLOPs, {1e6 * times['plain']:.0f} us")
  print()
  print(
    "| T | mode | FLOPs | / (T x plain step) | / (T-step unroll) | time (us) | "
    "time / (T x plain step) |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|")
  for T, mode, f, f_unroll in rows:
    t = times[(T, mode)]
    print(
      f"| {T} | {mode} | {f:,.0f} | {f / (T * plain_flops):.1f} | {f / f_unroll:.1f} | "
      f"{1e6 * t:.0f} | {t / (T * times['plain']):.1f} |"
    )


if __name__ == "__main__":
  main()
