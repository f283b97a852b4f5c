r"""Long horizons: exact meta-gradients through T = 10,000 inner Adam steps on a CPU.

MixFlow-MG shrinks each step's transient memory; what remains is the static
memory of the unroll, one stored carry :math:`(\theta_t, v_t)` (plus the saved
inner gradient) per step. ``mfo.unroll(..., checkpoint_every=K)`` stores a
carry only every K steps and recomputes each segment in the backward pass:
:math:`T/K + K` stored carries, :math:`O(\sqrt T)` with :math:`K = \sqrt T`.
A tuple ``(K1, K2)`` nests one more level.

This script compiles the meta-gradient of a learning-rate-learning problem
(an MLP regression trained by Adam, the learning rate learned) for each
schedule, reports the compiled temp memory (no run needed), and runs the
schedules that fit: median seconds per meta-gradient and a check that all of
them give the same meta-gradient.

    python examples/long_horizon.py                # T = 10,000 (about 2 minutes on 2 cores)
    python examples/long_horizon.py --T 1000 --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import mixflow_optax as mfo


def make_problem(T: int, width: int, batch: int, seed: int = 0):
  """A 2-layer MLP regression; one small batch per inner step."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  d = 16
  params = {
    "w1": jax.random.normal(k[0], (d, width)) / jnp.sqrt(d),
    "b1": jnp.zeros((width,)),
    "w2": jax.random.normal(k[1], (width, 1)) / jnp.sqrt(width),
  }
  teacher = jax.random.normal(k[2], (d, 1))
  x = jax.random.normal(k[3], (T, batch, d))
  y = jnp.sin(x @ teacher) + 0.1 * jax.random.normal(k[4], (T, batch, 1))
  return params, (x, y)


def mlp_loss(params, meta, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def meta_gradient_fn(checkpoint_every):
  opt = mfo.transforms.adam(1e-3)
  run = mfo.unroll(
    mlp_loss,
    opt,
    hyperparams_fn=lambda log_lr: {"learning_rate": jnp.exp(log_lr)},
    checkpoint_every=checkpoint_every,
  )

  def meta_loss(log_lr, params, batches):
    params_T, _ = run(log_lr, params, opt.init(params), batches)
    # Validation loss: the last inner batch, at the unrolled parameters.
    return mlp_loss(params_T, None, jax.tree.map(lambda b: b[-1], batches))

  return jax.jit(jax.value_and_grad(meta_loss))


def carries_stored(T: int, schedule) -> int:
  """Carries held at the peak of the backward pass for a nested schedule."""
  if schedule is None:
    return T
  levels = tuple(np.atleast_1d(schedule).tolist())
  total, length = 0, T
  for k in levels:
    k = min(k, length)
    total += -(-length // k)
    length = k
  return total + length


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--T", type=int, default=10_000)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
  args = parser.parse_args(argv)

  T = args.T
  root = int(round(T**0.5))
  schedules = [None, root, (10 * root, max(1, root // 3)), (10 * root, root, max(1, root // 10))]
  params, batches = make_problem(T, args.width, args.batch)
  log_lr = jnp.log(1e-3)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  carry_mib = 3 * n_params * 4 / 2**20  # params + Adam's two moments, float32

  records, compiled = [], {}
  for schedule in schedules:
    fn = meta_gradient_fn(schedule)
    t0 = time.perf_counter()
    exe = fn.lower(log_lr, params, batches).compile()
    mem = exe.memory_analysis()
    rec = {
      "checkpoint_every": schedule,
      "T": T,
      "params": n_params,
      "carries_stored": carries_stored(T, schedule),
      "temp_mib": mem.temp_size_in_bytes / 2**20,
      "compile_s": time.perf_counter() - t0,
      "seconds": None,
      "meta_grad": None,
    }
    # The per-step schedule would need more memory than a laptop has at
    # T = 10,000 and large widths; run it only where it is modest.
    if rec["temp_mib"] < 4096:
      compiled[str(schedule)] = exe
    records.append(rec)
    print(f"compiled checkpoint_every={schedule}: temp {rec['temp_mib']:.1f} MiB", flush=True)

  # Interleaved repetitions, medians.
  times = {k: [] for k in compiled}
  values = {}
  for _ in range(args.reps):
    for key, exe in compiled.items():
      t0 = time.perf_counter()
      value, grad = exe(log_lr, params, batches)
      grad.block_until_ready()
      times[key].append(time.perf_counter() - t0)
      values[key] = (float(value), float(grad))
  for rec in records:
    key = str(rec["checkpoint_every"])
    if key in times:
      rec["seconds"] = statistics.median(times[key])
      rec["meta_grad"] = values[key][1]

  grads = [r["meta_grad"] for r in records if r["meta_grad"] is not None]
  spread = max(grads) - min(grads) if grads else 0.0
  print(f"\nT = {T} inner Adam steps, |theta| = {n_params}, one carry = {carry_mib:.2f} MiB")
  print(f"{'checkpoint_every':>20} {'carries':>8} {'temp MiB':>10} {'s/meta-grad':>12}")
  for r in records:
    secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
    print(
      f"{r['checkpoint_every']!s:>20} {r['carries_stored']:>8} {r['temp_mib']:>10.1f} {secs:>12}"
    )
  print(f"meta-gradients of the schedules that ran agree to {spread:.2e} (float32)")
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=2, default=str))
  return records


if __name__ == "__main__":
  main()
