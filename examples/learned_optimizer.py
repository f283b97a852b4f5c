r"""Meta-training a per-parameter MLP learned optimizer with exact meta-gradients.

The learned optimizer is :func:`mixflow_optax.transforms.mlp_lopt`; its
weights :math:`\phi` are meta-parameters, learned by truncated
backpropagation through unrolled inner training (:func:`mixflow_optax.unroll`
in MixFlow mode) on a family of small tasks:

- random quadratics :math:`\tfrac12 (x - x^\star)^\top A (x - x^\star)` in 16
  dimensions, with random rotations, condition numbers up to 100 and scales
  from 0.1 to 10;
- small MLP regressions: a tanh student (8 -> 32 -> 1) fitting a random tanh
  teacher from noisy minibatches of 32.

Each task in the meta-batch carries its parameters and optimizer state from
one truncation of ``unroll`` inner steps to the next and is replaced by a new
task after ``truncations`` truncations (staggered across the batch, so the
meta-batch always mixes early and late training). The meta-loss of one
truncation is the mean log inner loss of its steps; the meta-gradient is the
mean over a batch of tasks (``jax.vmap``), clipped per family, then averaged
over the two families and applied by Adam.

Afterwards the learned optimizer is evaluated on held-out tasks (new seeds)
against Adam with a learning rate tuned by grid search on those same tasks.
The script writes ``lopt_curves.png`` and ``lopt_results.json`` (held-out
losses, the tuned learning rates, and the compiled memory of the
meta-gradient in mixflow and standard mode).

Run (2 to 2.5 minutes on 2 CPU cores, about 40 s of it compilation)::

  python examples/learned_optimizer.py --out docs

Reuse the pieces from a notebook or another script::

  import sys; sys.path.insert(0, "examples")
  import learned_optimizer as lo
  cfg = lo.Config(meta_steps=100)
  result = lo.meta_train(cfg)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo

__all__ = [
  "FAST_COMPILE",
  "Config",
  "TaskFamily",
  "TaskCarry",
  "quadratic_family",
  "mlp_regression_family",
  "default_families",
  "make_lopt",
  "make_meta_step",
  "init_carries",
  "meta_train",
  "run_optimizer",
  "evaluate",
  "meta_step_memory",
  "plot_curves",
  "main",
]


# XLA CPU options that cut compile time 5-10x for the one-off programs here
# (evaluation, compile-only memory analysis), at some cost in run time. The
# compiled memory reported below is the same with XLA's defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes and settings of the example (the defaults are the documented run).

  Attributes:
    meta_steps: number of meta-gradient steps.
    unroll: inner steps per truncation (the unroll length T of each
      meta-gradient).
    truncations: truncations per inner training run; a task is replaced by a
      new one after ``unroll * truncations`` inner steps.
    tasks_per_family: tasks per family in each meta-batch.
    meta_lr: Adam learning rate of the outer optimizer.
    meta_clip: global-norm clipping of the meta-gradient.
    seed: seeds the learned optimizer's initial weights, the training tasks
      and the held-out tasks.
    hidden_sizes: widths of the learned optimizer's hidden layers.
    step_mult: ``mlp_lopt``'s step size.
    magnitude_scale: ``mlp_lopt``'s magnitude scale.
    eval_tasks: held-out tasks per family.
    eval_steps: inner steps of each held-out run; by default twice the
      training horizon ``unroll * truncations``. Results are reported at
      the training horizon and at ``eval_steps``.
    adam_lrs: the learning-rate grid of the Adam baseline.
    mode: ``"mixflow"`` or ``"standard"`` meta-gradients (same values).
    memory_unrolls: unroll lengths at which the compiled memory of the
      meta-gradient is measured in both modes (empty: skip).
  """

  meta_steps: int = 1000
  unroll: int = 10
  truncations: int = 10
  tasks_per_family: int = 8
  meta_lr: float = 3e-3
  meta_clip: float = 1.0
  seed: int = 0
  hidden_sizes: tuple[int, ...] = (32, 32)
  step_mult: float = 3e-2
  magnitude_scale: float = 0.1
  eval_tasks: int = 32
  eval_steps: int | None = None
  adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
  mode: str = "mixflow"
  memory_unrolls: tuple[int, ...] = (10, 20)

  @property
  def eval_horizon(self) -> int:
    return self.eval_steps or 2 * self.unroll * self.truncations


# ---------------------------------------------------------------------------
# Task families.
# ---------------------------------------------------------------------------


class TaskFamily(NamedTuple):
  """A distribution over small training problems (pure functions of keys).

  Attributes:
    name: short name, used as a key in the results.
    sample_task: ``key -> task``, a pytree of arrays describing one problem.
    init_params: ``(key, task) -> params``, the initial parameters.
    sample_batch: ``(key, task) -> batch``, the data of one training step.
    loss: ``(params, task, batch) -> scalar``, the training loss.
    eval_loss: ``(params, task) -> scalar``, the loss reported on held-out
      tasks (the exact loss, or a large fixed held-out batch).
  """

  name: str
  sample_task: Callable[[jax.Array], Any]
  init_params: Callable[[jax.Array, Any], Any]
  sample_batch: Callable[[jax.Array, Any], Any]
  loss: Callable[[Any, Any, Any], jax.Array]
  eval_loss: Callable[[Any, Any], jax.Array]


def quadratic_family(
  dim: int = 16, max_condition: float = 100.0, scale_range: tuple[float, float] = (0.1, 10.0)
) -> TaskFamily:
  r"""Random quadratics :math:`\tfrac12 (x - x^\star)^\top A (x - x^\star)` (deterministic).

  :math:`A = s\, Q \operatorname{diag}(\lambda) Q^\top` with a random rotation
  :math:`Q`, eigenvalues log-spaced over a random condition number in
  ``[1, max_condition]`` and a log-uniform scale :math:`s`.
  """

  def sample_task(key):
    k_cond, k_scale, k_rot, k_target = jax.random.split(key, 4)
    log_cond = jax.random.uniform(k_cond, (), maxval=math.log(max_condition))
    log_scale = jax.random.uniform(
      k_scale, (), minval=math.log(scale_range[0]), maxval=math.log(scale_range[1])
    )
    eig = jnp.exp(log_scale - log_cond * jnp.linspace(0.0, 1.0, dim))
    q, _ = jnp.linalg.qr(jax.random.normal(k_rot, (dim, dim)))
    return {"a": (q * eig[None, :]) @ q.T, "target": jax.random.normal(k_target, (dim,))}

  def init_params(key, task):
    del task
    return {"x": jax.random.normal(key, (dim,))}

  def sample_batch(key, task):
    del key, task
    return jnp.zeros(())  # Deterministic: no data.

  def loss(params, task, batch):
    del batch
    d = params["x"] - task["target"]
    return 0.5 * d @ task["a"] @ d

  return TaskFamily(
    "quadratic", sample_task, init_params, sample_batch, loss, lambda p, t: loss(p, t, None)
  )


def mlp_regression_family(
  d_in: int = 8,
  hidden: int = 32,
  depth: int = 1,
  teacher_hidden: int = 16,
  batch_size: int = 32,
  eval_size: int = 512,
  noise: float = 0.1,
) -> TaskFamily:
  r"""A tanh MLP student (``d_in -> hidden x depth -> 1``) regressing a random tanh teacher.

  Each step draws a fresh minibatch :math:`x \sim \mathcal N(0, I)`,
  :math:`y = \mathrm{teacher}(x) + \sigma \varepsilon`; the held-out loss uses
  a fixed batch of ``eval_size`` examples drawn from the task's own key.
  """

  def teacher(task, x):
    return jnp.tanh(x @ task["w1"]) @ task["w2"]

  def student(params, x):
    h = x
    for i in range(1, depth + 1):
      h = jnp.tanh(h @ params[f"w{i}"] + params[f"b{i}"][None, :])
    return h @ params["w_out"] + params["b_out"]

  def draw(key, task, n):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in))
    return x, teacher(task, x) + noise * jax.random.normal(kn, (n,))

  def sample_task(key):
    k1, k2, k_eval = jax.random.split(key, 3)
    return {
      "w1": 2.0 * jax.random.normal(k1, (d_in, teacher_hidden)) / math.sqrt(d_in),
      "w2": jax.random.normal(k2, (teacher_hidden,)) / math.sqrt(teacher_hidden),
      "eval_key": jax.random.key_data(k_eval).astype(jnp.uint32),
    }

  def init_params(key, task):
    del task
    keys = jax.random.split(key, depth + 1)
    params, fan_in = {}, d_in
    for i in range(1, depth + 1):
      params[f"w{i}"] = jax.random.normal(keys[i - 1], (fan_in, hidden)) / math.sqrt(fan_in)
      params[f"b{i}"] = jnp.zeros((hidden,))
      fan_in = hidden
    params["w_out"] = jax.random.normal(keys[depth], (hidden,)) / math.sqrt(hidden)
    params["b_out"] = jnp.zeros(())
    return params

  def sample_batch(key, task):
    return draw(key, task, batch_size)

  def loss(params, task, batch):
    x, y = batch
    return jnp.mean((student(params, x) - y) ** 2)

  def eval_loss(params, task):
    key = jax.random.wrap_key_data(task["eval_key"])
    return loss(params, task, draw(key, task, eval_size))

  return TaskFamily("mlp_regression", sample_task, init_params, sample_batch, loss, eval_loss)


def default_families() -> tuple[TaskFamily, ...]:
  """The two task families of the documented run."""
  return (quadratic_family(), mlp_regression_family())


# ---------------------------------------------------------------------------
# Meta-training.
# ---------------------------------------------------------------------------


class TaskCarry(NamedTuple):
  """One task of the meta-batch, carried from truncation to truncation."""

  task: Any
  params: Any
  opt_state: Any
  truncation: jax.Array  # int32: truncations done in the current run.


def make_lopt(cfg: Config, key: jax.Array | None = None) -> mfo.transforms.ReparamTransformation:
  """The learned optimizer of the example, with initial weights from ``cfg.seed``."""
  key = jax.random.PRNGKey(cfg.seed) if key is None else key
  return mfo.transforms.mlp_lopt(
    key,
    hidden_sizes=cfg.hidden_sizes,
    step_mult=cfg.step_mult,
    magnitude_scale=cfg.magnitude_scale,
  )


def _fresh(family: TaskFamily, lopt, key: jax.Array) -> tuple[Any, Any, Any]:
  k_task, k_init = jax.random.split(key)
  task = family.sample_task(k_task)
  params = family.init_params(k_init, task)
  return task, params, lopt.init(params)


def init_carries(
  family: TaskFamily, lopt, key: jax.Array, n_tasks: int, truncations: int
) -> TaskCarry:
  """``n_tasks`` fresh tasks, their runs staggered over the ``truncations`` of a run."""
  task, params, opt_state = jax.vmap(lambda k: _fresh(family, lopt, k))(
    jax.random.split(key, n_tasks)
  )
  stagger = jnp.arange(n_tasks, dtype=jnp.int32) % truncations
  return TaskCarry(task, params, opt_state, stagger)


def _truncation_loss(family: TaskFamily, run: Callable, unroll: int) -> Callable:
  """``(weights, carry, key) -> (meta_loss, (params_T, opt_state_T, final_loss))``."""

  def fn(weights, carry, key):
    keys = jax.random.split(key, unroll + 1)
    data = jax.vmap(family.sample_batch, in_axes=(0, None))(keys, carry.task)
    # The task's constants travel in the batch: inner_loss(params, meta, batch)
    # sees only explicit inputs, as the forward-over-reverse rule needs.
    tasks = jax.tree.map(lambda x: jnp.broadcast_to(x, (unroll + 1, *jnp.shape(x))), carry.task)
    batches = (tasks, data)
    inner = jax.tree.map(lambda x: x[:unroll], batches)
    last_task, last_data = jax.tree.map(lambda x: x[unroll], batches)
    params_T, state_T, losses = run(weights, carry.params, carry.opt_state, inner)
    final = family.loss(params_T, last_task, last_data)
    # Mean log loss over the steps this truncation's updates produced: every
    # task counts alike whatever its loss scale, and late progress counts.
    after = jnp.concatenate([losses[1:], final[None]])
    return jnp.mean(jnp.log(after + 1e-12)), (params_T, state_T, final)

  return fn


def make_meta_step(
  families: Sequence[TaskFamily],
  lopt,
  outer_opt: optax.GradientTransformation,
  cfg: Config,
  *,
  mode: str | None = None,
  unroll: int | None = None,
) -> Callable:
  """``step(weights, outer_state, carries, key) -> (weights, outer_state, carries, metrics)``.

  ``carries`` is a tuple with one batched :class:`TaskCarry` per family. The
  meta-gradient is the mean over the tasks of each family (``jax.vmap`` of
  ``jax.value_and_grad`` of the truncation loss), then over the families.
  Finished runs are replaced by new tasks.
  """
  mode = cfg.mode if mode is None else mode
  unroll = cfg.unroll if unroll is None else unroll
  losses = []
  for fam in families:
    run = mfo.unroll(
      lambda p, w, batch, fam=fam: fam.loss(p, batch[0], batch[1]),
      lopt,
      hyperparams_fn=lambda w: w,
      mode=mode,
      return_losses=True,
    )
    losses.append(jax.value_and_grad(_truncation_loss(fam, run, unroll), has_aux=True))

  def step(weights, outer_state, carries, key):
    keys = jax.random.split(key, 2 * len(families))
    grads, metrics, new_carries = [], {}, []
    for i, (fam, vg, carry) in enumerate(zip(families, losses, carries)):
      n = jax.tree.leaves(carry.truncation)[0].shape[0]
      (value, (params, state, final)), g = jax.vmap(vg, in_axes=(None, 0, 0))(
        weights, carry, jax.random.split(keys[2 * i], n)
      )
      g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
      # Clip each family's meta-gradient separately: the family with the
      # larger log-loss gradients (the quadratics) must not drown the other.
      g, _ = optax.clip_by_global_norm(cfg.meta_clip).update(g, optax.EmptyState())
      grads.append(g)
      metrics[f"{fam.name}/meta_loss"] = jnp.mean(value)
      metrics[f"{fam.name}/final_loss"] = jnp.mean(final)
      # Replace the tasks whose run is over by fresh ones.
      truncation = carry.truncation + 1
      done = truncation >= cfg.truncations
      fresh = jax.vmap(lambda k, fam=fam: _fresh(fam, lopt, k))(
        jax.random.split(keys[2 * i + 1], n)
      )
      old = (carry.task, params, state)

      def pick(new, cur, done=done):
        return jnp.where(done.reshape((-1,) + (1,) * (cur.ndim - 1)), new, cur)

      task, params, state = jax.tree.map(pick, fresh, old)
      new_carries.append(TaskCarry(task, params, state, jnp.where(done, 0, truncation)))
    grad = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
    metrics["meta_grad_norm"] = optax.tree.norm(grad)
    updates, outer_state = outer_opt.update(grad, outer_state, weights)
    weights = optax.apply_updates(weights, updates)
    return weights, outer_state, tuple(new_carries), metrics

  return step


def _outer_opt(cfg: Config) -> optax.GradientTransformation:
  # Truncated unrolls occasionally give a huge meta-gradient (a step that
  # blew up an inner run): the step clips it; skip non-finite ones altogether.
  return optax.apply_if_finite(optax.adam(cfg.meta_lr), 10)


def meta_train(
  cfg: Config,
  families: Sequence[TaskFamily] | None = None,
  *,
  progress: bool = True,
  log_every: int = 10,
) -> dict[str, Any]:
  """Meta-trains the learned optimizer; returns its weights and the training records.

  Returns:
    ``{"lopt": the optimizer, "weights": trained weights, "init_weights": the
    initial ones, "records": [{"step", "meta_loss", "<family>/meta_loss",
    "<family>/final_loss", "meta_grad_norm"}, ...] every ``log_every`` steps,
    "seconds": wall time including compilation}``.
  """
  families = default_families() if families is None else tuple(families)
  lopt = make_lopt(cfg)
  outer_opt = _outer_opt(cfg)
  weights = lopt.hyperparams
  outer_state = outer_opt.init(weights)
  key = jax.random.PRNGKey(cfg.seed + 1)
  key, *ks = jax.random.split(key, len(families) + 1)
  carries = tuple(
    init_carries(f, lopt, k, cfg.tasks_per_family, cfg.truncations) for f, k in zip(families, ks)
  )
  step = jax.jit(make_meta_step(families, lopt, outer_opt, cfg))
  iterator = range(cfg.meta_steps)
  if progress:
    from tqdm.auto import tqdm

    iterator = tqdm(iterator, desc="meta-training", unit="step")
  records, start = [], time.perf_counter()
  for i in iterator:
    key, sub = jax.random.split(key)
    weights, outer_state, carries, metrics = step(weights, outer_state, carries, sub)
    if i % log_every == 0 or i == cfg.meta_steps - 1:
      rec = {"step": i, **{k: float(v) for k, v in metrics.items()}}
      rec["meta_loss"] = float(np.mean([rec[f"{f.name}/meta_loss"] for f in families]))
      records.append(rec)
      if progress:
        iterator.set_postfix(meta_loss=f"{rec['meta_loss']:.3f}")
  return {
    "lopt": lopt,
    "weights": weights,
    "init_weights": lopt.hyperparams,
    "records": records,
    "seconds": time.perf_counter() - start,
  }


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def run_optimizer(
  family: TaskFamily,
  opt: optax.GradientTransformation,
  task: Any,
  key: jax.Array,
  steps: int,
  hyperparams: Any = None,
) -> jax.Array:
  """Trains one task with ``opt``; returns the held-out loss before each step and at the end, shape ``(steps + 1,)``."""
  k_init, k_data = jax.random.split(key)
  params = family.init_params(k_init, task)

  def body(carry, k):
    params, state = carry
    grads = jax.grad(family.loss)(params, task, family.sample_batch(k, task))
    kw = {} if hyperparams is None else {"hyperparams": hyperparams}
    updates, state = opt.update(grads, state, params, **kw)
    return (optax.apply_updates(params, updates), state), family.eval_loss(params, task)

  # fold_in, not split: a shorter run sees the same batches as a prefix of a longer one.
  data_keys = jax.vmap(lambda t: jax.random.fold_in(k_data, t))(jnp.arange(steps))
  (params, _), losses = jax.lax.scan(body, (params, opt.init(params)), data_keys)
  return jnp.concatenate([losses, family.eval_loss(params, task)[None]])


def _geo_mean(losses: np.ndarray) -> float:
  return float(np.exp(np.mean(np.log(np.maximum(losses, 1e-30)))))


def evaluate(
  cfg: Config,
  lopt,
  weights: dict[str, jax.Array],
  families: Sequence[TaskFamily] | None = None,
  *,
  init_weights: dict[str, jax.Array] | None = None,
) -> dict[str, Any]:
  """Held-out comparison of the learned optimizer with Adam at each grid learning rate.

  Held-out tasks come from seeds disjoint from meta-training. Each run is
  ``cfg.eval_horizon`` steps long (twice the training horizon by default).
  At the training horizon and at the end, Adam's learning rate is tuned per
  family on the same held-out tasks (the lowest geometric-mean loss at that
  step), which favours the baseline.

  Returns:
    Per family: ``"step_<n>"`` for each reporting step ``n``, with
    ``tuned_adam_lr``, ``geo_mean_loss`` (name -> geometric mean over tasks
    of the loss after ``n`` steps, for ``learned``, ``learned_init``,
    ``adam_tuned`` and every grid rate), ``lopt_beats_tuned_adam`` and
    ``lopt_win_fraction`` (the fraction of tasks on which the learned
    optimizer ends lower than tuned Adam); and ``curves`` (name -> geometric
    mean over tasks of the held-out loss at every step; ``adam_tuned`` is
    tuned for the end of the run, ``curves_tuned_adam_lr``).
  """
  families = default_families() if families is None else tuple(families)
  out = {}
  adam = mfo.transforms.adam(cfg.adam_lrs[0])
  for i, fam in enumerate(families):
    key = jax.random.fold_in(jax.random.PRNGKey(10_000 + cfg.seed), i)
    k_tasks, k_runs = jax.random.split(key)
    tasks = jax.vmap(fam.sample_task)(jax.random.split(k_tasks, cfg.eval_tasks))
    run_keys = jax.random.split(k_runs, cfg.eval_tasks)

    def many(opt, hp, fam=fam, tasks=tasks, run_keys=run_keys):
      f = lambda t, k: run_optimizer(fam, opt, t, k, cfg.eval_horizon, hyperparams=hp)
      return jax.vmap(f)(tasks, run_keys)  # (tasks, steps + 1)

    # One program per family: the learned optimizer with each set of weights
    # and Adam at each learning rate, vmapped.
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def all_curves(stacked_weights, lrs, many=many):
      lopt_curves = jax.vmap(lambda w: many(lopt, w))(stacked_weights)
      adam_curves = jax.vmap(lambda lr: many(adam, {"learning_rate": lr}))(lrs)
      return lopt_curves, adam_curves

    named = {"learned": weights}
    if init_weights is not None:
      named["learned_init"] = init_weights
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *named.values())
    lopt_curves, adam_curves = all_curves(stacked, jnp.asarray(cfg.adam_lrs))
    curves = dict(zip(named, np.asarray(lopt_curves)))
    adam_curves = np.asarray(adam_curves)  # (lrs, tasks, steps + 1)
    summaries = {
      f"step_{step}": _compare(curves, adam_curves, cfg.adam_lrs, step)
      for step in sorted({cfg.unroll * cfg.truncations, cfg.eval_horizon})
    }
    last = summaries[f"step_{cfg.eval_horizon}"]
    curves["adam_tuned"] = adam_curves[cfg.adam_lrs.index(last["tuned_adam_lr"])]
    out[fam.name] = {
      **summaries,
      "initial_geo_mean": _geo_mean(curves["learned"][:, 0]),
      "curves_tuned_adam_lr": last["tuned_adam_lr"],
      "curves": {name: np.exp(np.mean(np.log(c), axis=0)).tolist() for name, c in curves.items()},
    }
  return out


def _compare(
  curves: dict[str, np.ndarray], adam_curves: np.ndarray, lrs: Sequence[float], step: int
) -> dict[str, Any]:
  """The learned optimizer against Adam tuned for the loss after ``step`` steps."""
  adam = {f"adam_lr={lr:g}": _geo_mean(c[:, step]) for lr, c in zip(lrs, adam_curves)}
  best = int(np.nanargmin(list(adam.values())))
  geo = {name: _geo_mean(c[:, step]) for name, c in curves.items()}
  geo["adam_tuned"] = list(adam.values())[best]
  learned, tuned = curves["learned"][:, step], adam_curves[best][:, step]
  return {
    "tuned_adam_lr": lrs[best],
    "geo_mean_loss": {**geo, **adam},
    "lopt_beats_tuned_adam": bool(geo["learned"] < geo["adam_tuned"]),
    "lopt_win_fraction": float(np.mean(learned < tuned)),
  }


def meta_step_memory(
  cfg: Config, unroll: int, families: Sequence[TaskFamily] | None = None
) -> dict[str, int]:
  """Compiled temporary memory (bytes) of one meta-step, mixflow vs standard mode.

  ``mfo.compiled_memory``: deterministic, nothing is run. Compiled with XLA's
  default flags (the fast-compile options change compiled memory).
  """
  families = default_families() if families is None else tuple(families)
  lopt = make_lopt(cfg)
  outer_opt = _outer_opt(cfg)
  weights = lopt.hyperparams
  ks = jax.random.split(jax.random.PRNGKey(0), len(families))
  carries = tuple(
    init_carries(f, lopt, k, cfg.tasks_per_family, cfg.truncations) for f, k in zip(families, ks)
  )
  args = (weights, outer_opt.init(weights), carries, jax.random.PRNGKey(1))
  out = {}
  for mode in ("mixflow", "standard"):
    step = make_meta_step(families, lopt, outer_opt, cfg, mode=mode, unroll=unroll)
    out[mode] = mfo.compiled_memory(jax.jit(step), *args).temp_bytes
  return out


# ---------------------------------------------------------------------------
# Plot and command line.
# ---------------------------------------------------------------------------


def plot_curves(
  records: Sequence[dict[str, Any]],
  evaluation: dict[str, Any],
  path: str | pathlib.Path,
  train_horizon: int | None = None,
) -> None:
  """Meta-training loss and held-out loss curves, one panel per family.

  ``train_horizon`` (inner steps per training run) is marked on the held-out
  panels: beyond it the learned optimizer runs longer than it was trained for.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(evaluation)
  fig, axes = plt.subplots(1, 1 + len(names), figsize=(5 * (1 + len(names)), 4))
  steps = [r["step"] for r in records]
  for i, name in enumerate(names):
    values = np.asarray([r[f"{name}/meta_loss"] for r in records])
    axes[0].plot(steps, values, color=f"C{i}", alpha=0.3, lw=0.8)
    window = min(10, len(values))  # Running mean over `window` records.
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    axes[0].plot(steps[window - 1 :], smooth, color=f"C{i}", label=name)
  axes[0].set(title="meta-training", xlabel="meta-step", ylabel="meta-loss (mean log inner loss)")
  axes[0].legend()
  styles = {
    "learned": dict(color="C3", lw=2),
    "learned_init": dict(color="C3", ls=":"),
    "adam_tuned": dict(color="C0", lw=2),
  }
  for ax, name in zip(axes[1:], names):
    ev = evaluation[name]
    for curve, values in ev["curves"].items():
      label = {
        "learned": "mlp_lopt (meta-trained)",
        "learned_init": "mlp_lopt (initial weights)",
        "adam_tuned": f"Adam, tuned lr={ev['curves_tuned_adam_lr']:g}",
      }[curve]
      ax.plot(values, label=label, **styles[curve])
    if train_horizon is not None and train_horizon < len(values) - 1:
      ax.axvline(train_horizon, color="gray", ls="--", lw=0.8, label="training horizon")
    ax.set_yscale("log")
    ax.set(title=f"held-out {name}", xlabel="inner step", ylabel="loss (geometric mean)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip())


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  d = Config()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=d.meta_steps, help="meta-training steps")
  p.add_argument("--unroll", type=int, default=d.unroll, help="inner steps per truncation")
  p.add_argument("--truncations", type=int, default=d.truncations, help="truncations per run")
  p.add_argument("--tasks", type=int, default=d.tasks_per_family, help="tasks per family")
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--eval-tasks", type=int, default=d.eval_tasks, help="held-out tasks per family")
  p.add_argument(
    "--eval-steps",
    type=int,
    default=None,
    help="held-out run length (default: the training horizon)",
  )
  p.add_argument(
    "--hidden",
    default=",".join(map(str, d.hidden_sizes)),
    help="hidden sizes of the learned optimizer",
  )
  p.add_argument(
    "--adam-lrs", default=",".join(f"{x:g}" for x in d.adam_lrs), help="Adam learning-rate grid"
  )
  p.add_argument("--mode", choices=("mixflow", "standard"), default=d.mode)
  p.add_argument(
    "--memory-unrolls",
    default=",".join(map(str, d.memory_unrolls)),
    help="comma-separated unroll lengths for the memory measurement ('' to skip)",
  )
  p.add_argument("--out", default="docs", help="directory for lopt_curves.png / lopt_results.json")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Meta-trains, evaluates, measures memory; writes the plot and the JSON results."""
  argv_list = list(sys.argv[1:] if argv is None else argv)
  a = _parse(argv_list)
  cfg = Config(
    meta_steps=a.steps,
    unroll=a.unroll,
    truncations=a.truncations,
    tasks_per_family=a.tasks,
    seed=a.seed,
    eval_tasks=a.eval_tasks,
    eval_steps=a.eval_steps,
    hidden_sizes=_ints(a.hidden),
    adam_lrs=tuple(float(x) for x in a.adam_lrs.split(",") if x.strip()),
    mode=a.mode,
    memory_unrolls=_ints(a.memory_unrolls),
  )
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  trained = meta_train(cfg, progress=not a.no_progress)
  evaluation = evaluate(
    cfg, trained["lopt"], trained["weights"], init_weights=trained["init_weights"]
  )
  memory = {}
  for unroll in cfg.memory_unrolls:
    m = meta_step_memory(cfg, unroll)
    memory[str(unroll)] = {**m, "standard_over_mixflow": m["standard"] / max(m["mixflow"], 1)}
  results = {
    "config": dataclasses.asdict(cfg),
    "command": " ".join(["python examples/learned_optimizer.py", *argv_list]),
    "platform": f"{jax.default_backend()}, {os.cpu_count()} CPU cores, jax {jax.__version__}",
    "meta_train_seconds": trained["seconds"],
    "total_seconds": time.perf_counter() - start,
    "meta_training": trained["records"],
    "held_out": evaluation,
    "meta_step_temp_bytes": memory,
  }
  (out / "lopt_results.json").write_text(json.dumps(results, indent=1) + "\n")
  plot_curves(trained["records"], evaluation, out / "lopt_curves.png", cfg.unroll * cfg.truncations)
  for name, ev in evaluation.items():
    for key, summary in ev.items():
      if not key.startswith("step_"):
        continue
      f = summary["geo_mean_loss"]
      print(
        f"{name}, loss after {key[5:]} steps (geometric mean over {cfg.eval_tasks} held-out "
        f"tasks): learned {f['learned']:.4g} (initial weights {f['learned_init']:.4g}), "
        f"tuned Adam (lr={summary['tuned_adam_lr']:g}) {f['adam_tuned']:.4g}; learned lower "
        f"on {100 * summary['lopt_win_fraction']:.0f}% of tasks"
      )
  for unroll, m in memory.items():
    print(
      f"meta-step temp memory, unroll {unroll}: mixflow {m['mixflow'] / 2**20:.2f} MiB, "
      f"standard {m['standard'] / 2**20:.2f} MiB ({m['standard_over_mixflow']:.2f}x)"
    )
  return results


if __name__ == "__main__":
  main()
