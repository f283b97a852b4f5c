r"""Forward-mode against reverse-mode meta-gradients: memory and time, by horizon and meta-size.

The task: learn per-group log learning rates of an inner Adam training a tanh MLP 16→256→1
(batch 64) for T steps; the n meta-parameters are the log learning rates of n groups of hidden
units (n = 1: Adam's log learning rate). One meta-step of ``mfo.meta_optimizer`` is compiled (and,
where affordable, run) three ways:

- ``forward``: ``mode="forward"``, one Jacobian-vector product per meta-parameter, nothing stored
  across inner steps;
- ``mixflow``: reverse mode with the library's defaults (one stored carry and saved inner
  gradient per step);
- ``mixflow_sqrt``: reverse mode with ``checkpoint_every=round(sqrt(T))`` (carries stored every
  √T steps, each segment recomputed in the backward pass).

Memory is the compiled temporary allocation (``mfo.compiled_memory``, no run needed, so T up to
10⁵ is measured compile-only). Time is the median of interleaved runs. Everything runs with the
XLA flags of the calling environment: leave ``XLA_FLAGS`` unset for the default flags.

Usage::

  python -m benchmarks.forward_vs_reverse --out docs/bench            # ~10 min on 2 busy CPU cores
  python -m benchmarks.forward_vs_reverse --out /tmp/fwd --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks._bench import interleaved_medians

METHODS = ("forward", "mixflow", "mixflow_sqrt")
WIDTH, IN_DIM, BATCH = 256, 16, 64


def _inner_loss(params, meta_params, batch):
  del meta_params
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def _outer_loss(params, meta_params, batch):
  return _inner_loss(params, meta_params, batch)


def _hyperparams_fn(n: int):
  """Per-group learning rates: hidden unit j belongs to group j mod n."""
  groups = np.arange(WIDTH) % n

  def fn(log_lrs):
    lr = jnp.exp(log_lrs)[groups]
    return {
      "learning_rate": {"w1": jnp.broadcast_to(lr, (IN_DIM, WIDTH)), "b1": lr, "w2": lr[:, None]}
    }

  return fn


def _problem(T: int, abstract: bool, seed: int = 0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {
    "w1": jax.random.normal(k[0], (IN_DIM, WIDTH)) / math.sqrt(IN_DIM),
    "b1": jnp.zeros(WIDTH),
    "w2": jax.random.normal(k[1], (WIDTH, 1)) / math.sqrt(WIDTH),
  }
  shapes = ((T, BATCH, IN_DIM), (T, BATCH, 1))
  if abstract:
    inner = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
  else:
    x = jax.random.normal(k[2], shapes[0])
    inner = (x, jnp.sin(jnp.sum(x, axis=-1, keepdims=True)))
  xv = jax.random.normal(k[3], (BATCH, IN_DIM))
  return params, inner, (xv, jnp.sin(jnp.sum(xv, axis=-1, keepdims=True)))


def _meta_optimizer(method: str, n: int, T: int) -> mfo.MetaOptimizer:
  options: dict[str, Any] = {"mode": "mixflow"}
  if method == "forward":
    options = {"mode": "forward", "max_forward_elements": max(n, 1000)}
  elif method == "mixflow_sqrt":
    options["checkpoint_every"] = max(1, round(math.sqrt(T)))
  return mfo.meta_optimizer(
    _inner_loss,
    _outer_loss,
    mfo.transforms.adam(1e-3),
    optax.adam(1e-2),
    hyperparams_fn=_hyperparams_fn(n),
    **options,
  )


def _setup(method: str, n: int, T: int, abstract: bool):
  mo = _meta_optimizer(method, n, T)
  params, inner, outer = _problem(T, abstract)
  state = mo.init(jnp.full((n,), math.log(1e-3)), params)
  return mo, state, inner, outer


def measure_memory(method: str, n: int, T: int) -> float:
  """Compiled temporary memory of one meta-step, in MiB (compile only)."""
  mo, state, inner, outer = _setup(method, n, T, abstract=True)
  return mfo.compiled_memory(mo.step, state, inner, outer).temp_mib


def measure_times(configs: Sequence[tuple[str, int, int]], reps: int) -> dict[tuple, float]:
  """Median seconds per meta-step, the configurations interleaved within each repetition."""
  runs = {}
  for config in configs:
    mo, state, inner, outer = _setup(*config, abstract=False)
    step = jax.jit(mo.step)
    jax.block_until_ready(step(state, inner, outer))  # compile and warm up
    runs[config] = (step, (state, inner, outer))
  return interleaved_medians({c: (lambda s=s, a=a: s(*a)) for c, (s, a) in runs.items()}, reps)


def check_exact(n: int = 4, T: int = 20) -> float:
  """Largest relative difference of the forward and reverse meta-gradients (float64)."""
  with jax.enable_x64(True):
    run = {
      method: mfo.unroll(
        _inner_loss,
        mfo.transforms.adam(1e-3),
        hyperparams_fn=_hyperparams_fn(n),
        mode="standard" if method == "forward" else "mixflow",
      )
      for method in ("forward", "mixflow")
    }
    params, inner, outer = _problem(T, abstract=False)
    opt_state = mfo.transforms.adam(1e-3).init(params)

    def meta_loss(method):
      def f(log_lrs):
        p, _ = run[method](log_lrs, params, opt_state, inner)
        return _outer_loss(p, log_lrs, outer)

      return f

    eta = jnp.full((n,), math.log(1e-2))
    fwd = jax.jit(jax.jacfwd(meta_loss("forward")))(eta)
    rev = jax.jit(jax.grad(meta_loss("mixflow")))(eta)
    return float(jnp.max(jnp.abs(fwd - rev)) / jnp.max(jnp.abs(rev)))


def crossover(ns: Sequence[int], forward: Sequence[float], reverse: float) -> float | None:
  """The meta-size n (log-log interpolated) where forward memory reaches ``reverse``."""
  logn, logm = np.log(np.asarray(ns, float)), np.log(np.asarray(forward, float))
  if forward[0] >= reverse:
    return None
  for i in range(1, len(ns)):
    if forward[i] >= reverse:
      frac = (math.log(reverse) - logm[i - 1]) / (logm[i] - logm[i - 1])
      return float(np.exp(logn[i - 1] + frac * (logn[i] - logn[i - 1])))
  # Beyond the sweep: extrapolate linearly in n (forward memory is affine in n).
  slope = (forward[-1] - forward[-2]) / (ns[-1] - ns[-2])
  return float(ns[-1] + (reverse - forward[-1]) / slope) if slope > 0 else None


def plot(results: dict[str, Any], out: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  ax = axes[0]
  for method in METHODS:
    rows = [r for r in results["memory_vs_T"] if r["method"] == method]
    ax.plot([r["T"] for r in rows], [r["temp_mib"] for r in rows], "o-", label=method)
  ax.set(xscale="log", yscale="log", xlabel="inner steps T", ylabel="compiled temp memory (MiB)")
  ax.set_title("memory vs horizon (n = 1)")
  ax.legend()
  ax = axes[1]
  for method in METHODS:
    rows = [r for r in results["memory_vs_n"] if r["method"] == method]
    label = method + ("" if method == "forward" else f" (T = {rows[0]['T']})")
    ax.plot([r["n"] for r in rows], [r["temp_mib"] for r in rows], "o-", label=label)
  ax.set(
    xscale="log", yscale="log", xlabel="meta-parameters n", ylabel="compiled temp memory (MiB)"
  )
  ax.set_title("memory vs number of meta-parameters")
  ax.legend()
  ax = axes[2]
  for method in METHODS:
    rows = [r for r in results["time_vs_n"] if r["method"] == method]
    ax.plot([r["n"] for r in rows], [1e3 * r["seconds"] for r in rows], "o-", label=method)
  ax.set(xscale="log", yscale="log", xlabel="meta-parameters n", ylabel="ms per meta-step")
  ax.set_title(f"time vs number of meta-parameters (T = {results['config']['time_T']})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "forward_vs_reverse.png", dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/bench"))
  parser.add_argument("--quick", action="store_true", help="a smoke run with small sweeps")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  if args.quick:
    horizons, ns, n_T, time_ns, time_T, reps = [10, 100], [1, 4], 100, [1, 2], 10, 2
  else:
    horizons = [10, 100, 1_000, 4_000, 10_000, 100_000]
    ns, n_T, time_ns, time_T, reps = [1, 4, 16, 64, 256], 1_000, [1, 2, 4, 8, 16], 100, args.reps
  start = time.time()
  results: dict[str, Any] = {
    "config": {
      "task": "per-group log learning rates of inner Adam; tanh MLP 16-256-1, batch 64",
      "horizons": horizons,
      "ns": ns,
      "n_T": n_T,
      "time_T": time_T,
      "reps": reps,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
    },
    "memory_vs_T": [],
    "memory_vs_n": [],
    "time_vs_n": [],
  }
  for T in horizons:
    for method in METHODS:
      mib = measure_memory(method, 1, T)
      results["memory_vs_T"].append({"method": method, "n": 1, "T": T, "temp_mib": mib})
      print(f"memory  n=1   T={T:<7d} {method:13s} {mib:10.2f} MiB", flush=True)
  for n in ns:
    for method in METHODS:
      mib = measure_memory(method, n, n_T)
      results["memory_vs_n"].append({"method": method, "n": n, "T": n_T, "temp_mib": mib})
      print(f"memory  n={n:<4d} T={n_T:<7d} {method:13s} {mib:10.2f} MiB", flush=True)
  configs = [(m, n, time_T) for n in time_ns for m in METHODS]
  for (method, n, T), seconds in measure_times(configs, reps).items():
    results["time_vs_n"].append({"method": method, "n": n, "T": T, "seconds": seconds})
    print(f"time    n={n:<4d} T={T:<7d} {method:13s} {1e3 * seconds:10.2f} ms", flush=True)

  # Crossovers: the largest n at which forward mode needs no more memory / time than reverse.
  fwd_n = [r["temp_mib"] for r in results["memory_vs_n"] if r["method"] == "forward"]
  per_T = {}
  for row in results["memory_vs_T"]:
    if row["method"] != "forward":
      per_T.setdefault(row["T"], {})[row["method"]] = row["temp_mib"]
  results["memory_crossover_n"] = {
    str(T): {m: crossover(ns, fwd_n, mib) for m, mib in d.items()} for T, d in per_T.items()
  }
  times = {(r["method"], r["n"]): r["seconds"] for r in results["time_vs_n"]}
  results["time_ratio_forward_over_mixflow"] = {
    str(n): times[("forward", n)] / times[("mixflow", n)] for n in time_ns
  }
  results["max_rel_diff_forward_vs_reverse_f64"] = check_exact()
  results["seconds"] = time.time() - start
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "forward_results.json").write_text(json.dumps(results, indent=1))
  plot(results, args.out)
  print(json.dumps({k: results[k] for k in list(results)[-4:]}, indent=1))
  return results


if __name__ == "__main__":
  main()
