r"""Learned data-mixture weights for a character-level LM on CPython's standard library.

Real data, no download: every ``*.py`` file of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``, without
``site-packages`` and the machine-generated ``_sysconfigdata*``), grouped into
domains by top-level package. Shares of characters (CPython 3.11, 1,789 files, 31.5 M
characters):

==================  =======  ==============================================
domain              share    what it is
==================  =======  ==============================================
``test``            54.4 %   the regression test suite
``top``             14.8 %   top-level modules (ordinary code)
``encodings``        4.5 %   codecs, largely decoding tables
``idlelib``          4.0 %   the IDLE editor and its tests
``unittest``         2.9 %   unittest and its tests
``distutils``        2.7 %   distutils and its tests
``pydoc_data``       2.4 %   English prose (the help topics) in a string
``lib2to3``          2.1 %   lib2to3, its fixers and tests
``tkinter``          2.1 %   Tk bindings and tests
``asyncio``          1.6 %   asyncio
``email``            1.2 %   email
``xml``              1.0 %   xml
``ctypes``           1.0 %   ctypes and its tests
``multiprocessing``  0.9 %   multiprocessing
``other``            4.7 %   every other package (importlib, http, json, ...)
==================  =======  ==============================================

Validation and test are held-out *ordinary code*: disjoint files drawn by a
seeded permutation from the top-level modules and the code packages
(``top``, ``asyncio``, ``email``, ``xml``, ``multiprocessing``, ``other``;
files whose path has no ``test``), ``HELD_OUT_CHARS`` characters each; the
rest of those files stays in its training domain. The model is the tiny
transformer of :mod:`benchmarks.real_data_lm` (d 64, 2 layers, 64 characters
of context, batch 16); the metric is test nats per character.

The recipe: one logit :math:`\lambda_k` per domain, the inner loss on a batch
drawn from the natural mixture (windows uniform over characters)

.. math::

  L(\theta, \lambda) = \frac{1}{B} \sum_{i=1}^B w_{d_i}\, \ell_i(\theta), \qquad
  w = K\, \mathrm{softmax}(\lambda)

(:math:`w = 1` at :math:`\lambda = 0`: the natural mixture), learned online by
``mfo.meta_optimizer`` (reverse mode ``"mixflow"``, :math:`T = 2` inner Adam
steps per meta-step, outer loss on a validation batch) through
``mfo.meta_train``; then a plain optax retrain from scratch that *samples* the
domains from :math:`q_k \propto p_k w_k` (:math:`p_k`: natural share; the
learned weights averaged over the second half of the meta-run), early-stopped
on validation. Both the meta-run and the retrain use Adam at ``RECIPE_LR``,
chosen a priori (the middle of the baseline grid).

The baseline: the natural mixture, Adam with the half-decade learning-rate grid
``GRID``, every point early-stopped on the same validation windows, with at
least the recipe's total FLOPs (XLA cost analysis of each jitted function,
loops unrolled for the analysis, times its calls; evaluations included): the
steps per grid point are rounded up. Also reported, as controls not at equal
compute: the "uniform over domains" and the natural mixture at ``RECIPE_LR`` with
the retrain's steps (the second isolates the learned mixture's own effect).
Run ``python -m benchmarks.real_data_lm_mixture`` (3 seeds; ``--quick`` for a
smoke run).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sysconfig
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks.real_data_lm import (
  Config,
  Run,
  encode,
  init_params,
  logits_fn,
  tiled_windows,
  verdict,
)

__all__ = [
  "Budget",
  "DOMAINS",
  "GRID",
  "QUICK",
  "RECIPE_LR",
  "Corpus",
  "domain_of",
  "load_corpus",
  "main",
  "run",
]

#: The training domains, in a fixed order (the meta-parameters' order).
DOMAINS = (
  "test",
  "top",
  "encodings",
  "idlelib",
  "unittest",
  "distutils",
  "pydoc_data",
  "lib2to3",
  "tkinter",
  "asyncio",
  "email",
  "xml",
  "ctypes",
  "multiprocessing",
  "other",
)
#: Domains whose non-test files may be held out as validation / test ("ordinary code").
CODE_DOMAINS = ("top", "asyncio", "email", "xml", "multiprocessing", "other")
HELD_OUT_CHARS = 100_000
#: The baseline's a-priori learning-rate grid (half-decades) and the recipe's rate.
GRID = (1e-3, 3e-3, 1e-2, 3e-2)
RECIPE_LR = 3e-3


def domain_of(rel: pathlib.PurePath) -> str:
  """The domain of a file, from its path relative to the stdlib root."""
  if len(rel.parts) == 1:
    return "top"
  return rel.parts[0] if rel.parts[0] in DOMAINS else "other"


@functools.cache
def _stdlib_texts() -> tuple[tuple[str, str], ...]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(
    p
    for p in root.rglob("*.py")
    if "site-packages" not in p.parts and not p.name.startswith("_sysconfigdata")
  )
  if not files:
    raise FileNotFoundError(f"no *.py files under {root}: is this a full CPython install?")
  return tuple(
    (str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files
  )


class Corpus(NamedTuple):
  """Character ids (uint8) of every training domain and of the held-out splits.

  Attributes:
    domains: domain name -> character ids of its training files, concatenated.
    valid: held-out ordinary code for validation.
    test: held-out ordinary code for the test metric.
    files: domain name, ``"held_valid"`` or ``"held_test"`` -> the relative paths it holds.
  """

  domains: dict[str, np.ndarray]
  valid: np.ndarray
  test: np.ndarray
  files: dict[str, list[str]]


def load_corpus(seed: int, held_out_chars: int = HELD_OUT_CHARS) -> Corpus:
  """The domains and the seeded held-out files (test filled first, then validation)."""
  texts = _stdlib_texts()
  held_pool = [
    i
    for i, (rel, _) in enumerate(texts)
    if domain_of(pathlib.PurePath(rel)) in CODE_DOMAINS and "test" not in rel
  ]
  split: dict[int, str] = {}
  sizes = {"held_test": 0, "held_valid": 0}
  for i in np.random.default_rng(seed).permutation(held_pool):
    name = next((s for s in sizes if sizes[s] < held_out_chars), None)
    if name is None:
      break
    split[int(i)] = name
    sizes[name] += len(texts[i][1])
  parts: dict[str, list[np.ndarray]] = {k: [] for k in (*DOMAINS, *sizes)}
  files: dict[str, list[str]] = {k: [] for k in parts}
  for i, (rel, text) in enumerate(texts):
    name = split.get(i, domain_of(pathlib.PurePath(rel)))
    parts[name].append(encode(text).astype(np.uint8))
    files[name].append(rel)
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  return Corpus({k: arrays[k] for k in DOMAINS}, arrays["held_valid"], arrays["held_test"], files)


# ---------------------------------------------------------------- sampling and losses


class Budget(NamedTuple):
  """The recipe's and the baseline's budget.

  Attributes:
    meta_steps: meta-steps of the recipe (each ``meta_every`` inner steps).
    meta_every: T, inner Adam steps per meta-step.
    retrain_steps: steps of the recipe's retrain with the learned mixture.
    eval_every: steps between validation evaluations (early stopping, both sides).
    valid_windows: validation windows of early stopping (fixed per seed).
    outer_lr: Adam step size on the domain logits.
  """

  meta_steps: int = 40
  meta_every: int = 2
  retrain_steps: int = 200
  eval_every: int = 50
  valid_windows: int = 128
  outer_lr: float = 0.1


QUICK = Budget(meta_steps=8, retrain_steps=40, eval_every=20, valid_windows=32)


def _sampler(corpus: Corpus, cfg: Config):
  """``(key, log_q, shape) -> (windows, domain ids)``: windows of ``seq_len + 1`` ids from
  domains drawn with probabilities ``softmax(log_q)``, offsets uniform within the domain."""
  flat = jnp.asarray(np.concatenate([corpus.domains[d] for d in DOMAINS]))
  sizes = np.array([corpus.domains[d].size for d in DOMAINS])
  starts = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)[:-1]]), jnp.int32)
  spans = jnp.asarray(sizes - cfg.seq_len - 1, jnp.float32)
  length = cfg.seq_len + 1

  @functools.partial(jax.jit, static_argnums=2)
  def sample(key, log_q, shape):
    k_domain, k_offset = jax.random.split(key)
    domain = jax.random.categorical(k_domain, log_q, shape=shape)
    offset = jnp.floor(jax.random.uniform(k_offset, shape) * spans[domain]).astype(jnp.int32)
    positions = jnp.expand_dims(jnp.arange(length), tuple(range(len(shape))))
    windows = flat[(starts[domain] + offset)[..., None] + positions]
    return windows.astype(jnp.int32), domain.astype(jnp.int32)

  return sample, jnp.log(jnp.asarray(sizes / sizes.sum(), jnp.float32))


def example_losses(params: Any, windows: jax.Array, cfg: Config) -> jax.Array:
  """Mean next-character cross entropy (nats) of each window, shape ``(batch,)``."""
  logits = logits_fn(params, windows[:, :-1], cfg)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]), -1)


def domain_weights(logits: jax.Array) -> jax.Array:
  """:math:`w = K\\,\\mathrm{softmax}(\\lambda)`: mean weight 1, all ones at logits 0."""
  return logits.shape[-1] * jax.nn.softmax(logits)


# ---------------------------------------------------------------- training


@functools.cache
def _train_chunk(cfg: Config, lr: float):
  opt = optax.adam(lr)

  @jax.jit
  def chunk(params, opt_state, batches):
    def body(carry, windows):
      params, opt_state = carry
      grads = jax.grad(lambda p: jnp.mean(example_losses(p, windows, cfg)))(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    return jax.lax.scan(body, (params, opt_state), batches)[0]

  return opt, chunk


def train(params, key, sample, log_q, valid, cfg: Config, lr: float, steps: int, every: int):
  """Plain Adam for ``steps`` steps on windows from the mixture ``softmax(log_q)``,
  early-stopped on ``valid`` (evaluated every ``every`` steps and at the end)."""
  opt, chunk = _train_chunk(cfg, lr)
  evaluate = _evaluator(cfg)
  opt_state = opt.init(params)
  best, curve = (None, math.inf, 0), []
  for start in range(0, steps, every):
    key, sub = jax.random.split(key)
    n = min(every, steps - start)
    params, opt_state = chunk(params, opt_state, sample(sub, log_q, (n, cfg.batch_size))[0])
    curve.append(float(evaluate(params, valid)))
    if curve[-1] < best[1]:
      best = (jax.device_get(params), curve[-1], start + n)
  return Run(*best, curve)


@functools.cache
def _evaluator(cfg: Config):
  return jax.jit(lambda params, windows: jnp.mean(example_losses(params, windows, cfg)))


def test_loss(params: Any, test: np.ndarray, cfg: Config, chunk: int = 256) -> float:
  """Mean test loss (nats per character) over non-overlapping windows."""
  evaluate = _evaluator(cfg)
  n = (len(test) // chunk) * chunk
  return float(np.mean([float(evaluate(params, test[i : i + chunk])) for i in range(0, n, chunk)]))


def mixture_meta_optimizer(cfg: Config, budget: Budget, **options: Any) -> mfo.MetaOptimizer:
  """The recipe's meta-optimizer: domain logits in the inner loss, validation outer loss."""

  def inner_loss(params, logits, batch):
    weights = domain_weights(logits)[batch["domain"]]
    return jnp.mean(weights * example_losses(params, batch["windows"], cfg))

  def outer_loss(params, logits, windows):
    del logits
    return jnp.mean(example_losses(params, windows, cfg))

  return mfo.meta_optimizer(
    inner_loss,
    outer_loss,
    mfo.transforms.adam(RECIPE_LR),
    optax.adam(budget.outer_lr),
    mode="mixflow",
    **options,
  )


def learn_mixture(params, key, sample, log_p, valid_pool, cfg: Config, budget: Budget):
  """The online meta-run; returns the meta-train result and the averaged weights."""
  mo = mixture_meta_optimizer(cfg, budget)
  state = mo.init(jnp.zeros(len(DOMAINS)), params)
  valid_pool = jnp.asarray(valid_pool)

  def batches_fn(key):
    k_inner, k_outer = jax.random.split(key)
    windows, domain = sample(k_inner, log_p, (budget.meta_every, cfg.batch_size))
    pick = jax.random.randint(k_outer, (cfg.batch_size,), 0, valid_pool.shape[0])
    return {"windows": windows, "domain": domain}, valid_pool[pick]

  def eval_fn(state):
    weights = np.asarray(domain_weights(state.meta_params))
    return {f"w/{d}": float(w) for d, w in zip(DOMAINS, weights)}

  result = mfo.meta_train(
    mo, state, batches_fn, budget.meta_steps, key=key, eval_fn=eval_fn, eval_every=1,
    best_metric="w/top", best_mode="max", progress=False,
  )  # fmt: skip
  half = budget.meta_steps // 2
  weights = np.array([np.mean(result.history[f"eval/w/{d}"][half:]) for d in DOMAINS])
  return result, weights


# ---------------------------------------------------------------- compute


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


@functools.cache
def flop_counts(cfg: Config, budget: Budget) -> dict[str, float]:
  """XLA cost-analysis FLOPs of one plain Adam step, one validation evaluation and one
  meta-step (its T inner steps fully unrolled for the analysis: XLA counts a loop body once).
  Sampling windows is left out on both sides."""
  params = init_params(jax.random.PRNGKey(0), cfg)
  windows = jnp.zeros((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
  opt = optax.adam(RECIPE_LR)

  def plain_step(params, opt_state, windows):
    grads = jax.grad(lambda p: jnp.mean(example_losses(p, windows, cfg)))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  mo = mixture_meta_optimizer(cfg, budget, unroll_steps=True)
  state = mo.init(jnp.zeros(len(DOMAINS)), params)
  inner = {
    "windows": jnp.zeros((budget.meta_every, *windows.shape), jnp.int32),
    "domain": jnp.zeros((budget.meta_every, cfg.batch_size), jnp.int32),
  }
  valid = jnp.zeros((budget.valid_windows, cfg.seq_len + 1), jnp.int32)
  return {
    "train_step": _flops(plain_step, params, opt.init(params), windows),
    "eval": _flops(lambda p, w: jnp.mean(example_losses(p, w, cfg)), params, valid),
    "meta_step": _flops(mo.step, state, inner, windows),
  }


def num_evals(steps: int, every: int) -> int:
  return len(range(0, steps, every))


def baseline_steps(flops: dict[str, float], recipe_flops: float, budget: Budget) -> int:
  """The fewest steps per grid point such that ``len(GRID)`` early-stopped runs (their
  evaluations included) cost at least the recipe's FLOPs."""
  per_point = recipe_flops / len(GRID)

  def cost(steps: int) -> float:
    return steps * flops["train_step"] + num_evals(steps, budget.eval_every) * flops["eval"]

  # cost(s) <= s * (train_step + eval / every) + eval: start below the answer, count up.
  per_step = flops["train_step"] + flops["eval"] / budget.eval_every
  steps = max(1, math.floor((per_point - flops["eval"]) / per_step))
  while cost(steps) < per_point:
    steps += 1
  return steps


# ---------------------------------------------------------------- one seed, all seeds


def run(seed: int, *, quick: bool = False, budget: Budget | None = None) -> dict[str, Any]:
  """The recipe, the equal-compute natural-mixture grid and the uniform mixture on one seed.

  Args:
    seed: changes the held-out files, the model's initialisation and every sampled batch.
    quick: the small ``QUICK`` budget (a smoke run), unless ``budget`` is given.
    budget: the training budget.

  Returns:
    A dict with the row fields ``seed``, ``recipe``, ``baseline`` (test nats per character,
    lower is better), ``recipe_flops``, ``baseline_flops``, and the details: learned weights
    and mixture, the grid, the uniform-over-domains mixture, wall-clock seconds.
  """
  cfg = Config()
  budget = budget or (QUICK if quick else Budget())
  corpus = load_corpus(seed)
  sample, log_p = _sampler(corpus, cfg)
  rng = np.random.default_rng([seed, 1])
  length = cfg.seq_len + 1
  valid_pool = tiled_windows(corpus.valid, length)
  valid = valid_pool[rng.choice(len(valid_pool), budget.valid_windows, replace=False)]
  test = tiled_windows(corpus.test, length)
  k_init, k_meta, k_retrain, k_base, k_uniform = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = init_params(k_init, cfg)
  flops = flop_counts(cfg, budget)

  t0 = time.perf_counter()
  meta, weights = learn_mixture(params, k_meta, sample, log_p, valid_pool, cfg, budget)
  log_q = log_p + jnp.log(jnp.asarray(weights, jnp.float32))
  retrain = train(
    params, k_retrain, sample, log_q, valid, cfg, RECIPE_LR, budget.retrain_steps, budget.eval_every
  )
  recipe_seconds = time.perf_counter() - t0
  recipe_flops = (
    budget.meta_steps * flops["meta_step"]
    + budget.retrain_steps * flops["train_step"]
    + num_evals(budget.retrain_steps, budget.eval_every) * flops["eval"]
  )

  steps = baseline_steps(flops, recipe_flops, budget)
  t0 = time.perf_counter()
  grid = {
    lr: train(params, k_base, sample, log_p, valid, cfg, lr, steps, budget.eval_every)
    for lr in GRID
  }
  baseline_seconds = time.perf_counter() - t0
  best_lr = min(grid, key=lambda lr: grid[lr].best_valid)  # chosen on validation
  baseline_flops = len(GRID) * (
    steps * flops["train_step"] + num_evals(steps, budget.eval_every) * flops["eval"]
  )
  uniform = train(
    params, k_uniform, sample, jnp.zeros_like(log_p), valid, cfg, RECIPE_LR,
    budget.retrain_steps, budget.eval_every,
  )  # fmt: skip
  q = np.exp(np.asarray(log_q))
  control = train(
    params, k_uniform, sample, log_p, valid, cfg, RECIPE_LR, budget.retrain_steps,
    budget.eval_every,
  )  # fmt: skip
  return {
    "seed": seed,
    "recipe": test_loss(retrain.best_params, test, cfg),
    "baseline": test_loss(grid[best_lr].best_params, test, cfg),
    "recipe_flops": recipe_flops,
    "baseline_flops": baseline_flops,
    "compute_ratio": recipe_flops / baseline_flops,
    "uniform_domains": test_loss(uniform.best_params, test, cfg),
    "natural_same_steps": test_loss(control.best_params, test, cfg),
    "recipe_seconds": recipe_seconds,
    "baseline_seconds": baseline_seconds,
    "flops": flops,
    "meta_step_cost": flops["meta_step"] / flops["train_step"],
    "budget": budget._asdict(),
    "natural_mixture": dict(zip(DOMAINS, np.exp(np.asarray(log_p)).tolist())),
    "learned_weights": dict(zip(DOMAINS, weights.tolist())),
    "learned_mixture": dict(zip(DOMAINS, (q / q.sum()).tolist())),
    "meta_outer_loss": meta.history["outer_loss"].tolist(),
    "retrain": {"best_valid": retrain.best_valid, "best_step": retrain.best_step,
                "valid_curve": retrain.valid_curve},
    "baseline_best_lr": best_lr,
    "baseline_steps_per_point": steps,
    "baseline_grid": {
      str(lr): {"best_valid": r.best_valid, "best_step": r.best_step, "valid_curve": r.valid_curve}
      for lr, r in grid.items()
    },
    "uniform_best_valid": uniform.best_valid,
  }  # fmt: skip


def natural_control(seed: int, *, quick: bool = False) -> float:
  """Test nats/char of the natural mixture at ``RECIPE_LR`` for the retrain's steps: the
  recipe's retrain without the learned mixture (not at equal compute; the same keys as
  ``run``)."""
  cfg = Config()
  budget = QUICK if quick else Budget()
  corpus = load_corpus(seed)
  sample, log_p = _sampler(corpus, cfg)
  rng = np.random.default_rng([seed, 1])
  valid_pool = tiled_windows(corpus.valid, cfg.seq_len + 1)
  valid = valid_pool[rng.choice(len(valid_pool), budget.valid_windows, replace=False)]
  k_init, *_, k_uniform = jax.random.split(jax.random.PRNGKey(seed), 5)
  control = train(
    init_params(k_init, cfg), k_uniform, sample, log_p, valid, cfg, RECIPE_LR,
    budget.retrain_steps, budget.eval_every,
  )  # fmt: skip
  return test_loss(control.best_params, tiled_windows(corpus.test, cfg.seq_len + 1), cfg)


def table(results: list[dict[str, Any]]) -> str:
  """Markdown: per-seed test nats/char of the recipe, the baseline and the uniform mixture."""
  seeds = [r["seed"] for r in results]
  head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | GFLOPs |"
  lines = [head, "|---" * (len(seeds) + 3) + "|"]
  rows = {
    "recipe (learned mixture, retrain)": ("recipe", "recipe_flops"),
    f"baseline (natural mixture, {len(GRID)}-point LR grid)": ("baseline", "baseline_flops"),
    "uniform over domains, recipe's rate and retrain steps": ("uniform_domains", None),
    "natural mixture, recipe's rate and retrain steps": ("natural_same_steps", None),
  }
  for name, (key, flop_key) in rows.items():
    if not all(key in r for r in results):
      continue
    vals = [r[key] for r in results]
    gflops = f"{np.mean([r[flop_key] for r in results]) / 1e9:.0f}" if flop_key else ""
    cells = " | ".join(f"{v:.4f}" for v in vals)
    lines.append(f"| {name} | {cells} | {np.mean(vals):.4f} ± {np.std(vals):.4f} | {gflops} |")
  recipe, baseline = [r["recipe"] for r in results], [r["baseline"] for r in results]
  ratio = np.mean([r["compute_ratio"] for r in results])
  lines += [
    "",
    f"Test nats/char on held-out ordinary code (lower is better); compute ratio "
    f"recipe/baseline {ratio:.2f}. Recipe vs baseline: **{verdict(recipe, baseline)}**.",
  ]
  if all("natural_same_steps" in r for r in results):
    same = [r["natural_same_steps"] for r in results]
    lines.append(
      f"The learned mixture vs the natural mixture at the recipe's rate and retrain steps "
      f"(the mixture's own effect): **{verdict(recipe, same)}**."
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the seeds (one file each), then writes ``lm_mixture.json`` and ``lm_mixture.md``."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
  parser.add_argument("--quick", action="store_true", help="the small smoke-run budget")
  parser.add_argument("--table-only", action="store_true", help="combine existing seed files")
  parser.add_argument(
    "--add-control", action="store_true", help="add natural_same_steps to existing seed files"
  )
  parser.add_argument("--out", default="docs/bench/real_data", help="output folder")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.add_control:
    for seed in args.seeds:
      path = out / f"lm_mixture_seed{seed}.json"
      r = json.loads(path.read_text())
      r["natural_same_steps"] = natural_control(seed, quick=args.quick)
      path.write_text(json.dumps(r, indent=1) + "\n")
      print(f"seed {seed}: natural mixture, same steps {r['natural_same_steps']:.4f}", flush=True)
    return {}
  for seed in [] if args.table_only else args.seeds:
    r = run(seed, quick=args.quick)
    (out / f"lm_mixture_seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
    print(
      f"seed {seed}: recipe {r['recipe']:.4f} | baseline {r['baseline']:.4f} | uniform "
      f"{r['uniform_domains']:.4f} nats/char",
      flush=True,
    )
  if not args.table_only and len(args.seeds) == 1:
    return {}  # one seed of several run as separate processes: combine with --table-only
  results = [json.loads((out / f"lm_mixture_seed{s}.json").read_text()) for s in args.seeds]
  text = table(results)
  meta = {"python": sysconfig.get_python_version(), "jax": jax.__version__}
  summary = {"meta": meta, "results": results, "table": text}
  (out / "lm_mixture.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "lm_mixture.md").write_text(text + "\n")
  print(text)
  return summary


if __name__ == "__main__":
  main()
