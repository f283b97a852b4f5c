"""Learned per-layer learning-rate schedules on scikit-learn's digits, against a tuned grid.

Task (one seed): digits (1797 images, 8x8, 10 classes) split 1000 train / 400 validation /
397 test by a seeded permutation; an MLP 64-128x4-10 (ReLU, He init) trained by Adam for
``T`` = 200 steps of batch 128, early-stopped on the validation NLL (checked every 25 steps).

Recipe (settings fixed a priori, the same for every seed):

1. a coarse grid of constant Adam rates (1e-3, 3e-3, 1e-2), one run each, picks the start;
2. ``META_STEPS`` meta-steps of ``mfo.meta_optimizer`` with ``reset_inner``-style full-horizon
   hypergradients: each meta-step trains a population of ``POPULATION`` learners (their own
   inits, fresh batch orders; ``population_size=P, reset_every=1``) for the whole run of T
   steps and takes the exact gradient of the mean validation NLL after T steps with respect to
   a per-layer log learning rate at 3 knots over the run (``hyperparams_per_step=True``,
   ``jnp.interp``; a prefix-tree ``learning_rate`` {layer: rate}); outer Adam(0.1);
3. the learned schedule is exported with ``mfo.export_optimizer(..., per_step=True)`` and used
   to train from fresh inits exactly like the baseline's runs.

Baseline at equal training FLOPs: the FLOPs the recipe spent (coarse grid + meta-steps) are
converted into plain 200-step runs (rounded up, so the baseline never gets less), spent as a
log-spaced grid of Adam rates in [3e-4, 3e-2], each with a constant and a cosine schedule, one
run per point; the best point by validation NLL is the baseline's choice.

Evaluation (not training compute, identical for both sides): each chosen configuration is
trained ``EVAL_REPEATS`` times from fresh inits and batch orders (the same keys for both) and
early-stopped on validation; the primary metric is the mean test NLL at the early-stopping
point (nats, LOWER is better); test accuracy is reported too.

FLOPs: ``cost_analysis()`` of programs with no loops: one plain training step, one validation
evaluation, and the meta-step compiled with its inner loop fully unrolled (``unroll_steps=True``)
at T=1 and T=2; the meta-step's cost at horizon T is ``F(1) + (T - 1) * (F(2) - F(1))`` (XLA
counts a loop body once, so looped programs cannot be used).

Run: ``python -m benchmarks.real_data_lr [--quick] [--seeds 0 1 2]`` (default: seeds 0-9); writes
docs/bench/real_data/lr_schedule.json and lr_schedule.md (seeds may run as separate processes
with ``--out DIR`` and be combined with ``--from-json DIR0/lr_schedule.json ...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks import _real_data

HIDDEN, DEPTH, BATCH = 128, 4, 128
STEPS, EVAL_EVERY = 200, 25
COARSE = (1e-3, 3e-3, 1e-2)
KNOTS = 3
META_STEPS, POPULATION, META_LR = 6, 2, 0.1
EVAL_REPEATS = 3
GRID_RANGE = (3e-4, 3e-2)
SEEDS = tuple(range(10))
OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "bench", "real_data")


def digits_splits(seed: int) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Digits scaled to [0, 1], split 1000/400/397 by a permutation seeded with ``seed``."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(seed).permutation(len(x))
  parts = {"train": perm[:1000], "val": perm[1000:1400], "test": perm[1400:]}
  return {k: (jnp.asarray(x[i]), jnp.asarray(y[i].astype(np.int32))) for k, i in parts.items()}


def layer_names(depth: int = DEPTH) -> list[str]:
  return [f"l{i}" for i in range(depth + 1)]


def init_mlp(key: jax.Array, depth: int = DEPTH) -> dict[str, dict[str, jax.Array]]:
  """He-initialised MLP 64 -> HIDDEN x depth -> 10 as {"l<i>": {"w", "b"}}."""
  sizes = [64] + [HIDDEN] * depth + [10]
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"l{i}": {"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)}
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp(params: Any, x: jax.Array) -> jax.Array:
  n = len(params)
  for i in range(n - 1):
    x = jax.nn.relu(x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"][None, :])
  return x @ params[f"l{n - 1}"]["w"] + params[f"l{n - 1}"]["b"][None, :]


def nll(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y))


def accuracy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(mlp(params, x), -1) == y)


def make_schedule(steps: int, depth: int = DEPTH):
  """hyperparams_fn(meta, step): per-layer rates, log-linear between KNOTS knots over the run."""
  knots_x = jnp.linspace(0.0, steps - 1.0, KNOTS)

  def hyperparams_fn(meta: dict[str, jax.Array], step: jax.Array) -> dict[str, Any]:
    t = jnp.asarray(step, jnp.float32)
    return {
      "learning_rate": {k: jnp.exp(jnp.interp(t, knots_x, meta[k])) for k in layer_names(depth)}
    }

  return hyperparams_fn


def train_curves(
  make_opt,
  data: dict[str, tuple[jax.Array, jax.Array]],
  hparams: jax.Array,
  keys: jax.Array,
  steps: int = STEPS,
  eval_every: int = EVAL_EVERY,
  depth: int = DEPTH,
) -> list[dict[str, float]]:
  """Training runs ``make_opt(hparams[i])`` from init/batch order ``keys[i]``, early-stopped.

  The runs are vmapped (one compilation for the whole batch of runs); each evaluates the
  validation NLL every ``eval_every`` steps and reports the metrics at its minimum.
  """
  (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]

  def one(hparam, key):
    opt = make_opt(hparam)
    params = init_mlp(jax.random.fold_in(key, 1), depth)
    idx = mfo.sample_batches(jax.random.fold_in(key, 2), jnp.arange(len(ytr)), BATCH, steps=steps)
    idx = idx.reshape(steps // eval_every, eval_every, BATCH)

    def chunk(carry, idx_chunk):
      def step(carry, i):
        p, s = carry
        u, s = opt.update(jax.grad(nll)(p, xtr[i], ytr[i]), s, p)
        return (optax.apply_updates(p, u), s), None

      (p, s), _ = jax.lax.scan(step, carry, idx_chunk)
      return (p, s), (nll(p, xva, yva), nll(p, xte, yte), accuracy(p, xte, yte))

    _, out = jax.lax.scan(chunk, (params, opt.init(params)), idx)
    return out

  vals, tests, accs = (np.asarray(a) for a in jax.jit(jax.vmap(one))(hparams, keys))
  results = []
  for val, test_nll, test_acc in zip(vals, tests, accs):
    val = np.nan_to_num(val, nan=np.inf)
    i = int(np.argmin(val))
    ok = bool(np.isfinite(val[i]))
    results.append(
      {
        "val_nll": float(val[i]),
        "test_nll": float(test_nll[i]) if ok else float("inf"),
        "test_acc": float(test_acc[i]) if ok else 0.0,
        "stop_step": (i + 1) * eval_every,
      }
    )
  return results


def adam_factory(schedule: str, steps: int):
  """lr -> optax.adam with a constant or cosine-decayed rate (lr may be traced)."""
  if schedule == "constant":
    return lambda lr: optax.adam(lr)
  if schedule == "cosine":
    return lambda lr: optax.adam(lambda count: lr * optax.cosine_decay_schedule(1.0, steps)(count))
  raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def evaluate_repeats(make_opt, hparam, key, data, repeats, **kw) -> dict[str, Any]:
  """Mean of ``repeats`` runs from fresh inits/batch orders (evaluation, not selection)."""
  keys = jax.random.split(key, repeats)
  runs = train_curves(make_opt, data, jnp.full((repeats,), hparam, jnp.float32), keys, **kw)
  out = {k: float(np.mean([r[k] for r in runs])) for k in ("val_nll", "test_nll", "test_acc")}
  out["runs"] = runs
  return out


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def flop_costs(
  data, *, population: int = POPULATION, steps: int = STEPS, depth: int = DEPTH
) -> dict[str, float]:
  """FLOPs of one plain step, one validation evaluation, and one meta-step at horizon ``steps``.

  Programs without loops only (cost_analysis counts a loop body once): the meta-step is
  compiled with its inner loop fully unrolled at T=1 and T=2 and extrapolated linearly in T.
  """
  (xtr, ytr), (xva, yva) = data["train"], data["val"]
  params = init_mlp(jax.random.PRNGKey(0), depth)
  opt = optax.adam(1e-3)
  xb, yb = xtr[:BATCH], ytr[:BATCH]

  def plain_step(p, s, x, y):
    u, s = opt.update(jax.grad(nll)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  step = _flops(plain_step, params, opt.init(params), xb, yb)
  evaluation = _flops(nll, params, xva, yva)
  meta = {}
  for t in (1, 2):
    mo, meta0 = _meta_optimizer(steps, depth, population, unroll_steps=True), _meta0(1e-3, depth)
    ps = jax.tree.map(lambda a: jnp.broadcast_to(a, (population,) + a.shape), params)
    state = mo.init(meta0, ps)
    inner = (
      jnp.broadcast_to(xb, (population, t) + xb.shape),
      jnp.broadcast_to(yb, (population, t) + yb.shape),
    )
    outer = (
      jnp.broadcast_to(xva, (population,) + xva.shape),
      jnp.broadcast_to(yva, (population,) + yva.shape),
    )
    meta[t] = _flops(mo.step, state, inner, outer)
  per_step = meta[2] - meta[1]
  return {
    "plain_step": step,
    "val_eval": evaluation,
    "plain_run": steps * step + (steps // EVAL_EVERY) * evaluation,
    "meta_step": meta[1] + (steps - 1) * per_step,
    "meta_per_inner_step": per_step,
  }


def _meta0(lr: float, depth: int = DEPTH) -> dict[str, jax.Array]:
  return {k: jnp.full((KNOTS,), math.log(lr), jnp.float32) for k in layer_names(depth)}


def _meta_optimizer(steps, depth, population, unroll_steps: int | bool = 1):
  def loss(p, meta, batch):
    del meta  # the meta-parameters act through the learning rates only
    return nll(p, *batch)

  return mfo.meta_optimizer(
    loss,
    loss,
    mfo.transforms.adam(1e-3),
    optax.adam(META_LR),
    hyperparams_fn=make_schedule(steps, depth),
    hyperparams_per_step=True,
    population_size=population,
    reset_every=1,
    unroll_steps=unroll_steps,
  )


def baseline_runs(recipe_flops: float, run_flops: float) -> int:
  """Plain runs the baseline gets: the recipe's FLOPs rounded UP to an even number of runs."""
  if recipe_flops <= 0 or run_flops <= 0:
    raise ValueError(f"FLOPs must be positive, got {recipe_flops=} and {run_flops=}")
  n = int(math.ceil(recipe_flops / run_flops))
  return n + n % 2


def run(seed: int, *, quick: bool = False) -> dict[str, Any]:
  """One seed: recipe vs. equal-FLOPs grid baseline. Primary metric: mean test NLL (lower is better)."""
  t_start = time.perf_counter()
  steps = 40 if quick else STEPS
  eval_every = 10 if quick else EVAL_EVERY
  meta_steps = 2 if quick else META_STEPS
  depth = 2 if quick else DEPTH
  repeats = 1 if quick else EVAL_REPEATS
  kw = {"steps": steps, "eval_every": eval_every, "depth": depth}
  data = digits_splits(seed)
  key = jax.random.PRNGKey(seed)
  costs = flop_costs(data, population=POPULATION, steps=steps, depth=depth)
  run_flops = steps * costs["plain_step"] + (steps // eval_every) * costs["val_eval"]

  # Recipe: coarse grid -> start; meta-steps; export.
  t0 = time.perf_counter()
  sel_key = jax.random.fold_in(key, 1)
  const = adam_factory("constant", steps)
  coarse_runs = train_curves(
    const, data, jnp.asarray(COARSE, jnp.float32), jnp.stack([sel_key] * len(COARSE)), **kw
  )
  coarse = dict(zip(COARSE, coarse_runs))
  lr0 = min(coarse, key=lambda lr: coarse[lr]["val_nll"])
  (xtr, ytr), (xva, yva) = data["train"], data["val"]
  mo = _meta_optimizer(steps, depth, POPULATION)
  members = jax.vmap(lambda k: init_mlp(k, depth))(
    jax.random.split(jax.random.fold_in(key, 2), POPULATION)
  )
  state = mo.init(_meta0(lr0, depth), members)
  outer = jax.tree.map(lambda a: jnp.broadcast_to(a, (POPULATION,) + a.shape), (xva, yva))

  def batches_fn(k):
    idx = jax.vmap(lambda kk: mfo.sample_batches(kk, jnp.arange(len(ytr)), BATCH, steps=steps))(
      jax.random.split(k, POPULATION)
    )
    return (xtr[idx], ytr[idx]), outer

  result = mfo.meta_train(
    mo, state, batches_fn, meta_steps, key=jax.random.fold_in(key, 3), progress=False
  )
  learned = jax.device_get(result.state.meta_params)
  recipe_train_s = time.perf_counter() - t0
  hfn = make_schedule(steps, depth)
  tx = mfo.export_optimizer(mfo.transforms.adam(1e-3), hfn, learned, per_step=True)
  recipe_flops = len(COARSE) * run_flops + meta_steps * costs["meta_step"]

  # Baseline: as many plain runs as fit (rounded up), grid const + cosine.
  t0 = time.perf_counter()
  n_runs = baseline_runs(recipe_flops, run_flops)
  rates = np.exp(np.linspace(np.log(GRID_RANGE[0]), np.log(GRID_RANGE[1]), n_runs // 2))
  grid = []
  for kind in ("constant", "cosine"):
    runs = train_curves(
      adam_factory(kind, steps),
      data,
      jnp.asarray(rates, jnp.float32),
      jnp.stack([sel_key] * len(rates)),
      **kw,
    )
    grid += [{"lr": float(lr), "schedule": kind, **r} for lr, r in zip(rates, runs)]
  best = min(grid, key=lambda g: g["val_nll"])
  baseline_train_s = time.perf_counter() - t0
  baseline_flops = n_runs * run_flops

  # Evaluation: same fresh keys for both chosen configurations.
  eval_key = jax.random.fold_in(key, 4)
  recipe_eval = evaluate_repeats(lambda _: tx, 0.0, eval_key, data, repeats, **kw)
  baseline_eval = evaluate_repeats(
    adam_factory(best["schedule"], steps), best["lr"], eval_key, data, repeats, **kw
  )
  knots_x = np.linspace(0.0, steps - 1.0, KNOTS)
  return {
    "seed": seed,
    "quick": quick,
    "metric": "test NLL (nats) at the validation early-stopping point, mean of "
    f"{repeats} fresh runs; lower is better",
    "recipe": recipe_eval["test_nll"],
    "baseline": baseline_eval["test_nll"],
    "recipe_acc": recipe_eval["test_acc"],
    "baseline_acc": baseline_eval["test_acc"],
    "recipe_val": recipe_eval["val_nll"],
    "baseline_val": baseline_eval["val_nll"],
    "recipe_runs": recipe_eval["runs"],
    "baseline_runs": baseline_eval["runs"],
    "recipe_flops": recipe_flops,
    "baseline_flops": baseline_flops,
    "compute_ratio": recipe_flops / baseline_flops,
    "flops": costs,
    "coarse_grid": {str(k): v for k, v in coarse.items()},
    "start_lr": lr0,
    "learned_rates": {
      k: {"knots_step": knots_x.tolist(), "lr": np.exp(np.asarray(v)).tolist()}
      for k, v in learned.items()
    },
    "outer_loss": np.asarray(result.history["outer_loss"]).tolist(),
    "baseline_grid": grid,
    "baseline_choice": {"lr": best["lr"], "schedule": best["schedule"]},
    "baseline_runs_count": n_runs,
    "wall_s": {
      "recipe_train": recipe_train_s,
      "baseline_train": baseline_train_s,
      "total": time.perf_counter() - t_start,
    },
  }


def verdict(results: list[dict[str, Any]]) -> str:
  """The shared rule (:func:`benchmarks._real_data.verdict`) on test NLL (lower is better)."""
  return _real_data.verdict(
    [x["recipe"] for x in results], [x["baseline"] for x in results], higher_is_better=False
  )


def markdown(results: list[dict[str, Any]]) -> str:
  lines = [
    "| seed | recipe test NLL | baseline test NLL | recipe acc | baseline acc | baseline choice "
    "| grid runs | FLOPs recipe/baseline |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for x in results:
    c = x["baseline_choice"]
    lines.append(
      f"| {x['seed']} | {x['recipe']:.4f} | {x['baseline']:.4f} | {x['recipe_acc']:.4f} "
      f"| {x['baseline_acc']:.4f} | {c['schedule']} {c['lr']:.2g} | {x['baseline_runs_count']} "
      f"| {x['compute_ratio']:.3f} |"
    )
  for name in ("recipe", "baseline"):
    v = np.array([x[name] for x in results])
    a = np.array([x[f"{name}_acc"] for x in results])
    lines.append(
      f"\n{name}: test NLL {v.mean():.4f} +- {v.std():.4f}, accuracy {a.mean():.4f} +- {a.std():.4f}"
    )
  n = len(results)
  nll_better = sum(x["recipe"] < x["baseline"] for x in results)
  acc_better = sum(x["recipe_acc"] > x["baseline_acc"] for x in results)
  acc_worse = sum(x["recipe_acc"] < x["baseline_acc"] for x in results)
  lines.append(
    f"\nRecipe better on test NLL on {nll_better} of {n} seeds; on test accuracy better on "
    f"{acc_better}, worse on {acc_worse}."
  )
  lines.append(
    f"\nVerdict on test NLL (mean better, and better on enough seeds for a one-sided sign test "
    f"at p <= {_real_data.SIGNIFICANCE}): **{verdict(results)}**"
  )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
  parser.add_argument("--out", default=OUT_DIR)
  parser.add_argument(
    "--from-json",
    nargs="*",
    default=None,
    help="combine the results of earlier runs (their lr_schedule.json) instead of running",
  )
  args = parser.parse_args(argv)
  results = []
  for path in args.from_json or []:
    with open(path) as f:
      results += json.load(f)["results"]
  results.sort(key=lambda x: x["seed"])
  for seed in [] if args.from_json else args.seeds:
    results.append(run(seed, quick=args.quick))
    x = results[-1]
    print(
      f"seed {seed}: recipe {x['recipe']:.4f} ({x['recipe_acc']:.4f}) baseline "
      f"{x['baseline']:.4f} ({x['baseline_acc']:.4f}) ratio {x['compute_ratio']:.3f} "
      f"wall {x['wall_s']['total']:.0f}s",
      flush=True,
    )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "lr_schedule.json"), "w") as f:
    json.dump({"verdict": verdict(results), "results": results}, f, indent=1)
  table = markdown(results)
  with open(os.path.join(args.out, "lr_schedule.md"), "w") as f:
    f.write("# Learning rates and schedules on digits\n\n" + table)
  print(table)


if __name__ == "__main__":
  main()
