r"""Learning the learning rate of a character-level transformer LM on CPython's own source.

Real data, no download: the top-level ``*.py`` files of the running
interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), a fixed
character vocabulary, disjoint files for train / validation / test (a seeded
permutation of the files fills test, then validation, then train). The model is
a tiny pre-LayerNorm transformer (d 64, 2 layers, 4 heads, 64 characters of
context, batch 16, tied embeddings) trained with Adam for ``Budget.steps``
steps; the metric is the test loss in nats (and bits) per character.

The recipe (learning the rate in one run, no truncation):

.. math::

  \alpha_t = e^{\eta}\, s(t), \qquad
  \eta \leftarrow \eta - \mathrm{Adam}\Big(\frac{d V(\theta_t)}{d\eta}\Big)
  \ \text{every } T \text{ inner steps},

where :math:`s(t)` is the schedule shape a user would write (constant, or a
short linear warmup then cosine decay to 0), :math:`V` the loss on a
validation batch and :math:`dV(\theta_t)/d\eta` is taken through **every**
inner step since initialisation by forward mode with carried tangents
(``mfo.meta_optimizer(..., mode="forward", carry_tangents=True)``): one
Jacobian-vector product per meta-parameter per inner step, hence no
short-horizon bias. The best validation checkpoint is kept (early stopping).

The baselines, at equal compute (XLA cost-analysis FLOPs): a grid over the
(peak) learning rate, ``ceil(recipe FLOPs / one run's FLOPs)`` full training
runs with early stopping on the same validation windows, points log-spaced
(cell centres) over the same prior range ``Budget.lr_range`` whose geometric
centre is the recipe's starting rate; once with a constant rate and once with
warmup + cosine decay. Run ``python -m benchmarks.real_data_lm`` (3 seeds;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sysconfig
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks import _real_data

__all__ = [
  "Budget",
  "Config",
  "QUICK",
  "Splits",
  "VOCAB_SIZE",
  "encode",
  "init_params",
  "load_splits",
  "loss_fn",
  "main",
  "run",
  "schedule_shape",
  "stdlib_files",
]

# ---------------------------------------------------------------- data

#: The fixed character vocabulary: newline, the 95 printable ASCII characters,
#: and one id for everything else (tabs, non-ASCII).
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNK = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
NATS_TO_BITS = 1.0 / math.log(2.0)


def stdlib_files() -> list[pathlib.Path]:
  """The fixed subset of CPython's standard library: its top-level ``*.py`` files, sorted.

  ``_sysconfigdata*`` (generated per machine) is left out.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata"))
  if not files:
    raise FileNotFoundError(f"no *.py files under {root}: is this a full CPython install?")
  return files


def encode(text: str) -> np.ndarray:
  """Character ids (int32) in the fixed vocabulary; anything outside it is ``UNK``."""
  table = np.full(128, UNK, np.int32)
  for i, c in enumerate(VOCAB):
    table[ord(c)] = i
  codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
  return table[np.minimum(codes, 127)]


class Splits(NamedTuple):
  """Character ids of the three splits, and the file names in each."""

  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  files: dict[str, list[str]]


def load_splits(seed: int, held_out_chars: int = 150_000) -> Splits:
  """Disjoint files: a seeded permutation fills test, then validation (>= ``held_out_chars``
  characters each), then train with the rest."""
  files = stdlib_files()
  order = np.random.default_rng(seed).permutation(len(files))
  parts: dict[str, list[np.ndarray]] = {"test": [], "valid": [], "train": []}
  names: dict[str, list[str]] = {"test": [], "valid": [], "train": []}
  for i in order:
    split = next(
      (s for s in ("test", "valid") if sum(map(len, parts[s])) < held_out_chars), "train"
    )
    parts[split].append(encode(files[i].read_text(encoding="utf-8", errors="replace")))
    names[split].append(files[i].name)
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  return Splits(arrays["train"], arrays["valid"], arrays["test"], names)


def random_windows(rng: np.random.Generator, ids: np.ndarray, shape: tuple, length: int):
  """Windows of ``length`` characters at uniformly random offsets, shape ``shape + (length,)``."""
  starts = rng.integers(0, ids.size - length, size=shape)
  return ids[starts[..., None] + np.arange(length)]


def tiled_windows(ids: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping windows covering ``ids`` (the test set, every character once)."""
  n = (ids.size - 1) // (length - 1)
  return ids[(np.arange(n) * (length - 1))[:, None] + np.arange(length)]


# ---------------------------------------------------------------- model


class Config(NamedTuple):
  """The model and its batches."""

  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  seq_len: int = 64
  batch_size: int = 16


def init_params(key: jax.Array, cfg: Config) -> dict[str, Any]:
  """A pre-LayerNorm transformer with tied input/output embeddings."""
  d = cfg.d_model
  keys = jax.random.split(key, 2 + cfg.num_layers)

  def dense(k, n_in, n_out, scale=1.0):
    return scale * jax.random.normal(k, (n_in, n_out)) / math.sqrt(n_in)

  params = {
    "embed": jax.random.normal(keys[0], (VOCAB_SIZE, d)) / math.sqrt(d),
    "pos": 0.02 * jax.random.normal(keys[1], (cfg.seq_len, d)),
    "ln_f": jnp.ones(d),
  }
  residual = 1.0 / math.sqrt(2 * cfg.num_layers)
  for i in range(cfg.num_layers):
    k = jax.random.split(keys[2 + i], 4)
    params[f"block{i}"] = {
      "ln1": jnp.ones(d),
      "qkv": dense(k[0], d, 3 * d),
      "proj": dense(k[1], d, d, residual),
      "ln2": jnp.ones(d),
      "up": dense(k[2], d, 4 * d),
      "up_b": jnp.zeros(4 * d),
      "down": dense(k[3], 4 * d, d, residual),
    }
  return params


def _norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  x = x - jnp.mean(x, -1, keepdims=True)
  return scale[None, None] * x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-5)


def logits_fn(params: dict[str, Any], tokens: jax.Array, cfg: Config) -> jax.Array:
  """Next-character logits, shape ``tokens.shape + (VOCAB_SIZE,)``."""
  b, s = tokens.shape
  h = params["embed"][tokens] + params["pos"][None, :s]
  nh, dh = cfg.num_heads, cfg.d_model // cfg.num_heads
  causal = jnp.tril(jnp.ones((s, s), bool))
  for i in range(cfg.num_layers):
    p = params[f"block{i}"]
    q, k, v = jnp.split(_norm(h, p["ln1"]) @ p["qkv"], 3, axis=-1)
    q, k, v = (x.reshape(b, s, nh, dh) for x in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    probs = jax.nn.softmax(jnp.where(causal[None, None], scores, -1e9), axis=-1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1) @ p["proj"]
    h = h + jax.nn.gelu(_norm(h, p["ln2"]) @ p["up"] + p["up_b"][None, None]) @ p["down"]
  return _norm(h, params["ln_f"]) @ params["embed"].T


def loss_fn(params: dict[str, Any], windows: jax.Array, cfg: Config) -> jax.Array:
  """Mean next-character cross entropy (nats) over windows of ``seq_len + 1`` ids."""
  logits = logits_fn(params, windows[:, :-1], cfg)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]))


# ---------------------------------------------------------------- budget and schedules


class Budget(NamedTuple):
  """One training run and the recipe's settings.

  Attributes:
    steps: inner Adam steps of every training run (recipe and each grid point).
    eval_every: steps between validation evaluations (early stopping, both sides).
    meta_every: T, inner steps per meta-step (the recipe).
    lr_range: the prior range of the (peak) learning rate, shared by both
      sides: the grid spreads its points over it, the recipe starts at its
      geometric centre.
    warmup: linear warmup steps of the cosine schedule.
    outer_lr: Adam step size of the recipe on the log learning rate.
    recipe_shape: the schedule shape whose scale the recipe learns.
    valid_windows: validation windows for early stopping (fixed per seed).
  """

  steps: int = 400
  eval_every: int = 50
  meta_every: int = 10
  lr_range: tuple[float, float] = (1e-3, 3e-2)
  warmup: int = 20
  outer_lr: float = 0.1
  recipe_shape: str = "cosine"
  valid_windows: int = 256


QUICK = Budget(steps=120, eval_every=40, warmup=10, valid_windows=128)


def schedule_shape(kind: str, steps: int, warmup: int) -> Callable[[jax.Array], jax.Array]:
  """``count -> multiplier`` of the peak rate: ``"constant"``, or ``"cosine"`` (linear
  warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``)."""
  if kind == "constant":
    return lambda count: jnp.ones([], jnp.float32)
  if kind == "cosine":

    def shape(count):
      count = jnp.asarray(count, jnp.float32)
      ramp = jnp.minimum(1.0, (count + 1.0) / warmup)
      return ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count / steps, 1.0)))

    return shape
  raise ValueError(f"schedule kind must be 'constant' or 'cosine', got {kind!r}.")


def grid_points(lr_range: tuple[float, float], num: int) -> list[float]:
  """``num`` log-spaced cell centres of ``lr_range`` (one point: its geometric centre)."""
  lo, hi = lr_range
  return [float(lo * (hi / lo) ** ((i + 0.5) / num)) for i in range(num)]


# ---------------------------------------------------------------- data of one seed


class Data(NamedTuple):
  train: np.ndarray  # (steps, batch, seq+1): the training batches, shared by every run
  outer: np.ndarray  # (steps // T, batch, seq+1): the recipe's validation batches
  valid: np.ndarray  # (valid_windows, seq+1): early stopping / model selection
  test: np.ndarray  # (n, seq+1): every test character once


def make_data(seed: int, cfg: Config, budget: Budget) -> Data:
  splits = load_splits(seed)
  rng = np.random.default_rng([seed, 1])
  length = cfg.seq_len + 1
  num_meta = budget.steps // budget.meta_every
  return Data(
    train=random_windows(rng, splits.train, (budget.steps, cfg.batch_size), length),
    outer=random_windows(rng, splits.valid, (num_meta, cfg.batch_size), length),
    valid=random_windows(rng, splits.valid, (budget.valid_windows,), length),
    test=tiled_windows(splits.test, length),
  )


# ---------------------------------------------------------------- training


def _evaluator(cfg: Config) -> Callable[[Any, jax.Array], jax.Array]:
  return jax.jit(lambda params, windows: loss_fn(params, windows, cfg))


def test_loss(params: Any, data: Data, cfg: Config, chunk: int = 256) -> float:
  """Mean test loss (nats per character) over every test window."""
  evaluate = _evaluator(cfg)
  n = (len(data.test) // chunk) * chunk
  losses = [float(evaluate(params, data.test[i : i + chunk])) for i in range(0, n, chunk)]
  return float(np.mean(losses))


class Run(NamedTuple):
  """One early-stopped training run."""

  best_params: Any
  best_valid: float
  best_step: int
  valid_curve: list[float]


@functools.cache
def _train_chunk(cfg: Config, kind: str, steps: int, warmup: int) -> Callable:
  shape = schedule_shape(kind, steps, warmup)

  @jax.jit
  def chunk(params, opt_state, peak_lr, batches):
    opt = optax.adam(lambda count: peak_lr * shape(count))

    def body(carry, batch):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, batch, cfg)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), batches)
    return params, opt_state

  return chunk


def train_baseline(params: Any, data: Data, cfg: Config, budget: Budget, lr: float, kind: str):
  """Plain Adam for ``budget.steps`` steps at peak rate ``lr``, early-stopped on validation."""
  chunk = _train_chunk(cfg, kind, budget.steps, budget.warmup)
  evaluate = _evaluator(cfg)
  opt_state = optax.adam(lambda count: lr).init(params)  # with the count a schedule reads
  best, curve = (None, math.inf, 0), []
  for start in range(0, budget.steps, budget.eval_every):
    batches = data.train[start : start + budget.eval_every]
    params, opt_state = chunk(params, opt_state, jnp.float32(lr), batches)
    curve.append(float(evaluate(params, data.valid)))
    if curve[-1] < best[1]:
      best = (jax.device_get(params), curve[-1], start + len(batches))
  return Run(*best, curve)


def learned_rate_optimizer(
  cfg: Config, budget: Budget, *, truncated: bool = False, **options: Any
) -> mfo.MetaOptimizer:
  """The recipe: Adam's log peak rate, learned online by forward mode through the whole run.

  ``truncated=True``: the same, with the usual truncated reverse-mode meta-gradient through the
  last ``meta_every`` inner steps only (``mode="mixflow"``), for comparison.
  """
  shape = schedule_shape(budget.recipe_shape, budget.steps, budget.warmup)

  def inner_loss(params, meta_params, batch):
    del meta_params
    return loss_fn(params, batch, cfg)

  # Per-step hyperparameters: `step` counts inner steps since init, carried across
  # meta-steps (online), so the shape runs over the whole training run.
  def hyperparams_fn(log_lr, step):
    return {"learning_rate": jnp.exp(log_lr) * shape(step)}

  return mfo.meta_optimizer(
    inner_loss,
    inner_loss,
    mfo.transforms.adam(1e-3),
    optax.adam(budget.outer_lr),
    hyperparams_fn=hyperparams_fn,
    hyperparams_per_step=True,
    **(dict(mode="mixflow") if truncated else dict(mode="forward", carry_tangents=True)),
    **options,
  )


def train_recipe(params: Any, data: Data, cfg: Config, budget: Budget, truncated: bool = False):
  """One online run with the learned rate; returns the early-stopped run and the rates."""
  mo = learned_rate_optimizer(cfg, budget, truncated=truncated)
  state = mo.init(jnp.log(jnp.float32(math.sqrt(math.prod(budget.lr_range)))), params)
  step = jax.jit(mo.step, donate_argnums=0)
  evaluate = _evaluator(cfg)
  t_every = budget.meta_every
  best, curve, rates = (None, math.inf, 0), [], []
  for k in range(budget.steps // t_every):
    state, _ = step(state, data.train[k * t_every : (k + 1) * t_every], data.outer[k])
    rates.append(float(jnp.exp(state.meta_params)))
    done = (k + 1) * t_every
    if done % budget.eval_every == 0 or done == budget.steps:
      curve.append(float(evaluate(state.params, data.valid)))
      if curve[-1] < best[1]:
        best = (jax.device_get(state.params), curve[-1], done)
  return Run(*best, curve), rates


# ---------------------------------------------------------------- compute


def _flops(fn: Callable, *args: Any) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


@functools.cache
def flop_counts(cfg: Config, budget: Budget) -> dict[str, float]:
  """XLA cost-analysis FLOPs of one plain Adam step, one validation evaluation and one
  meta-step of the recipe (T inner steps; counted from fully unrolled T = 1 and T = 2,
  since XLA counts a loop body once)."""
  params = init_params(jax.random.PRNGKey(0), cfg)
  batch = jnp.zeros((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
  opt = optax.adam(1e-3)

  def plain_step(params, opt_state, batch):
    updates, opt_state = opt.update(jax.grad(loss_fn)(params, batch, cfg), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  valid = jnp.zeros((budget.valid_windows, cfg.seq_len + 1), jnp.int32)
  counts = {
    "train_step": _flops(plain_step, params, opt.init(params), batch),
    "eval": _flops(lambda p, w: loss_fn(p, w, cfg), params, valid),
  }
  per_t = []
  for t in (1, 2):
    unrolled = learned_rate_optimizer(cfg, budget, unroll_steps=True)
    state = unrolled.init(jnp.float32(0.0), params)
    per_t.append(_flops(unrolled.step, state, jnp.stack([batch] * t), batch))
  inner = per_t[1] - per_t[0]
  counts["meta_inner_step"] = inner
  counts["meta_outer"] = per_t[0] - inner
  counts["meta_step"] = counts["meta_outer"] + budget.meta_every * inner
  return counts


# ---------------------------------------------------------------- one seed, all seeds


def _summary(run: Run, params_test: float) -> dict[str, Any]:
  return {
    "test_nats": params_test,
    "test_bits": params_test * NATS_TO_BITS,
    "best_valid": run.best_valid,
    "best_step": run.best_step,
    "valid_curve": run.valid_curve,
  }


def grid_search(params, data: Data, cfg: Config, budget: Budget, kind: str, num: int):
  """``num`` early-stopped runs over ``budget.lr_range``; the one with the best validation."""
  start = time.perf_counter()
  points, best = [], None
  for lr in grid_points(budget.lr_range, num):
    result = train_baseline(params, data, cfg, budget, lr, kind)
    points.append({"lr": lr, "best_valid": result.best_valid, "best_step": result.best_step})
    if best is None or result.best_valid < best[1].best_valid:
      best = (lr, result)
  lr, result = best
  summary = _summary(result, test_loss(result.best_params, data, cfg))
  return {"chosen_lr": lr, "grid": points, "wall_s": time.perf_counter() - start, **summary}


def run(seed: int, *, quick: bool = False, budget: Budget | None = None) -> dict[str, Any]:
  """The recipe and both baselines (constant and cosine grids) on one seed.

  Args:
    seed: changes the split (which files are test / validation / train), the
      model's initialisation and the sampled batches.
    quick: the small ``QUICK`` budget (a smoke run), unless ``budget`` is given.
    budget: the training budget and recipe settings.

  Returns:
    A dict with ``recipe`` and ``baselines`` (``constant``, ``cosine``): test
    nats and bits per character, validation, chosen / learned rates, FLOPs,
    wall-clock seconds; ``flops`` per jitted function and ``compute_ratio``
    (recipe FLOPs / baseline FLOPs, at most 1).
  """
  cfg = Config()
  budget = budget or (QUICK if quick else Budget())
  data = make_data(seed, cfg, budget)
  params = init_params(jax.random.PRNGKey(seed), cfg)
  flops = flop_counts(cfg, budget)
  num_evals = len(range(0, budget.steps, budget.eval_every))

  start = time.perf_counter()
  recipe_run, rates = train_recipe(params, data, cfg, budget)
  recipe = _summary(recipe_run, test_loss(recipe_run.best_params, data, cfg))
  recipe_flops = (budget.steps // budget.meta_every) * flops["meta_step"]
  recipe_flops += len(recipe_run.valid_curve) * flops["eval"]
  recipe.update(
    wall_s=time.perf_counter() - start,
    flops=recipe_flops,
    learned_lr=rates,
    start_lr=math.sqrt(math.prod(budget.lr_range)),
    shape=budget.recipe_shape,
  )

  run_flops = budget.steps * flops["train_step"] + num_evals * flops["eval"]
  num_points = max(1, math.ceil(recipe_flops / run_flops))
  baselines = {}
  for kind in ("constant", "cosine"):
    baselines[kind] = grid_search(params, data, cfg, budget, kind, num_points)
    baselines[kind].update(flops=num_points * run_flops, num_points=num_points)
  return {
    "seed": seed,
    "config": cfg._asdict(),
    "budget": budget._asdict(),
    "flops": flops,
    "recipe": recipe,
    "baselines": baselines,
    "compute_ratio": {k: recipe_flops / b["flops"] for k, b in baselines.items()},
  }


def _mean_std(values: list[float]) -> str:
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def verdict(recipe: list[float], baseline: list[float]) -> str:
  """The shared rule (:func:`benchmarks._real_data.verdict`) on test loss (lower is better)."""
  return _real_data.verdict(recipe, baseline, higher_is_better=False)


def table(results: list[dict[str, Any]]) -> str:
  """The markdown table of per-seed and mean test losses, FLOPs and compute ratios."""
  names = {"recipe": "recipe (learned rate, forward mode)"}
  names.update({k: f"grid, {k} schedule" for k in ("constant", "cosine")})
  rows = {"recipe": [r["recipe"] for r in results]}
  rows.update({k: [r["baselines"][k] for r in results] for k in ("constant", "cosine")})
  seeds = [r["seed"] for r in results]
  head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std (nats/char) "
  head += "| bits/char | GFLOPs | compute ratio |"
  lines = [head, "|---" * (len(seeds) + 5) + "|"]
  for key, entries in rows.items():
    nats = [e["test_nats"] for e in entries]
    gflops = np.mean([e["flops"] for e in entries]) / 1e9
    ratio = "" if key == "recipe" else f"{np.mean([r['compute_ratio'][key] for r in results]):.2f}"
    cells = " | ".join(f"{x:.3f}" for x in nats)
    lines.append(
      f"| {names[key]} | {cells} | {_mean_std(nats)} | {np.mean(nats) * NATS_TO_BITS:.3f} "
      f"| {gflops:.0f} | {ratio} |"
    )
  recipe = [e["test_nats"] for e in rows["recipe"]]
  best = min(("constant", "cosine"), key=lambda k: np.mean([e["test_nats"] for e in rows[k]]))
  lines.append("")
  for key in ("constant", "cosine"):
    lines.append(
      f"- recipe vs {names[key]}: {verdict(recipe, [e['test_nats'] for e in rows[key]])}"
    )
  lines.append(
    f"- recipe vs the best baseline ({names[best]}): "
    f"{verdict(recipe, [e['test_nats'] for e in rows[best]])}"
  )
  return "\n".join(lines)


#: Variants of the recipe, run by ``--variant`` (recipe only, no baselines): the same online
#: run with truncated reverse-mode meta-gradients, and forward mode on a constant shape.
VARIANTS = {
  "truncated": ({"recipe_shape": "cosine"}, True),
  "constant_shape": ({"recipe_shape": "constant"}, False),
}


def run_variant(name: str, seed: int, *, quick: bool = False) -> dict[str, Any]:
  """One seed of a recipe variant (see ``VARIANTS``): test loss and learned rates."""
  changes, truncated = VARIANTS[name]
  cfg, budget = Config(), (QUICK if quick else Budget())._replace(**changes)
  data = make_data(seed, cfg, budget)
  start = time.perf_counter()
  params = init_params(jax.random.PRNGKey(seed), cfg)
  result, rates = train_recipe(params, data, cfg, budget, truncated)
  nats = test_loss(result.best_params, data, cfg)
  return {
    "test_nats": nats,
    "test_bits": nats * NATS_TO_BITS,
    "best_valid": result.best_valid,
    "valid_curve": result.valid_curve,
    "learned_lr": rates,
    "wall_s": time.perf_counter() - start,
  }


def _variant(name: str, seeds: list[int], quick: bool, out: pathlib.Path) -> None:
  path = out / "lm_variants.json"
  for seed in seeds:
    result = run_variant(name, seed, quick=quick)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(name, {})[str(seed)] = result
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"seed {seed}: {name} {result['test_nats']:.4f} nats/char")


def main(argv: list[str] | None = None) -> None:
  """Runs the seeds (one file ``lm_seed<k>.json`` each), then writes ``lm.json`` and ``lm.md``
  from the per-seed files of ``--seeds`` (``--table-only``: from existing files only, so that
  seeds can run as separate processes)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
  parser.add_argument("--quick", action="store_true", help="the small smoke-run budget")
  parser.add_argument("--table-only", action="store_true", help="combine existing seed files")
  parser.add_argument(
    "--variant",
    choices=sorted(VARIANTS),
    help="instead: a variant of the recipe alone, per seed (into lm_variants.json)",
  )
  parser.add_argument("--out", default="docs/bench/real_data", help="output folder")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.variant:
    _variant(args.variant, args.seeds, args.quick, out)
    return
  for seed in [] if args.table_only else args.seeds:
    r = run(seed, quick=args.quick)
    (out / f"lm_seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
    print(
      f"seed {seed}: recipe {r['recipe']['test_nats']:.4f} | constant "
      f"{r['baselines']['constant']['test_nats']:.4f} | cosine "
      f"{r['baselines']['cosine']['test_nats']:.4f} nats/char",
      flush=True,
    )
  if not args.table_only and len(args.seeds) == 1:
    return  # one seed of several run as separate processes: combine with --table-only
  results = [json.loads((out / f"lm_seed{s}.json").read_text()) for s in args.seeds]
  text = table(results)
  meta = {
    "python": sysconfig.get_python_version(),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
  }
  summary = {"meta": meta, "results": results, "table": text}
  (out / "lm.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "lm.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
