r"""Real data: learning per-example loss weights against 40% flipped labels (digits).

scikit-learn's digits (1,797 8x8 images, 10 classes, shipped with the package):
1,000 training images of which 40% have their label replaced by another class, a
clean validation set of 200 and a test set of 597. An MLP (64-128-10, ReLU) is
trained with Adam on minibatches of 100.

**Recipe** (MixFlow reverse mode: one meta-parameter per training example):

1. Meta-learn per-example weights :math:`w_i = \sigma(\eta_i)` online: each
   meta-step takes ``T`` inner Adam steps on the weighted training loss
   :math:`\sum_i w_i \ell_i / B` and one outer Adam step on the clean validation
   loss, :math:`\eta \leftarrow \eta - \alpha\, \mathrm{Adam}(\nabla_\eta
   V(\theta_T(\eta)))`.
2. Retrain from scratch on the training set weighted by the learned :math:`w`,
   early-stopped on validation accuracy.

**Baseline**: plain training with Adam, a grid over the learning rate, each grid
point early-stopped on the same validation set, with as many training steps as
the recipe's FLOPs buy.

Run ``python -m benchmarks.real_data_noisy`` (3 seeds, about a minute each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixflow_optax as mfo
from benchmarks import _real_data

NOISE = 0.4
N_TRAIN, N_VAL = 1000, 200
BATCH = 100
HIDDEN = 128
INNER_LR = 3e-3  # Adam's rate inside the recipe (meta-training and retrain), fixed a priori.
T = 4  # inner steps per meta-step
META_STEPS = 100
META_LR = 0.1  # outer Adam on the weight logits
RETRAIN_STEPS = 500
EVAL_EVERY = 25
GRID = (
  3e-4,
  1e-3,
  3e-3,
)  # the baseline's learning rates (half-decades; the best is interior on every seed)


class Data(NamedTuple):
  x_train: jax.Array
  y_train: jax.Array  # noisy labels
  flipped: np.ndarray  # which training labels were flipped (for reporting only)
  x_val: jax.Array
  y_val: jax.Array
  x_test: jax.Array
  y_test: jax.Array


def load(seed: int, noise: float = NOISE) -> Data:
  """Digits split ``N_TRAIN / N_VAL / rest`` by ``seed``, training labels flipped at ``noise``."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(x))
  tr, va, te = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_VAL], perm[N_TRAIN + N_VAL :]
  y_train = y[tr].copy()
  flipped = rng.random(N_TRAIN) < noise
  y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, flipped.sum())) % 10
  arrays = (x[tr], y_train, x[va], y[va], x[te], y[te])
  xt, yt, xv, yv, xs, ys = (jnp.asarray(a) for a in arrays)
  return Data(xt, yt, flipped, xv, yv, xs, ys)


def init_mlp(key: jax.Array, features: int = 64, classes: int = 10) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (features, HIDDEN)) / np.sqrt(features),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, classes)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(classes),
  }


def predict(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  hidden = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
  return hidden @ params["w2"] + params["b2"][None, :]


def cross_entropy(params, x, y) -> jax.Array:
  """Per-example cross entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(predict(params, x), y)


@jax.jit
def accuracy(params, x, y) -> jax.Array:
  return jnp.mean(jnp.argmax(predict(params, x), -1) == y)


def weighted_loss(params, weights, batch) -> jax.Array:
  """Training loss with per-example weights, normalised by the batch's total weight."""
  x, y, idx = batch
  w = weights[idx]
  return jnp.sum(w * cross_entropy(params, x, y)) / jnp.maximum(jnp.sum(w), 1e-6)


def train_step_fn(lr: float):
  """``(params, opt_state, weights, batch) -> (params, opt_state)``: one plain Adam step."""
  opt = optax.adam(lr)

  def step(params, opt_state, weights, batch):
    grads = jax.grad(weighted_loss)(params, weights, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return opt, step


class Trained(NamedTuple):
  val_accuracy: float  # at the early-stopping point
  test_accuracy: float  # at the early-stopping point
  step: int  # the early-stopping point


def train_early_stopped(
  data: Data, lr: float, steps: int, key: jax.Array, weights: jax.Array | None = None
) -> Trained:
  """Adam on the (weighted) training set; the state with the best validation accuracy."""
  weights = jnp.ones(N_TRAIN) if weights is None else weights
  opt, step = train_step_fn(lr)
  step = jax.jit(step)
  key, init_key = jax.random.split(key)
  params = init_mlp(init_key)
  opt_state = opt.init(params)
  best = Trained(-1.0, float("nan"), 0)
  for i in range(steps):
    key, sub = jax.random.split(key)
    batch = mfo.sample_batches(sub, (data.x_train, data.y_train), BATCH, with_indices=True)
    (x, y), idx = batch
    params, opt_state = step(params, opt_state, weights, (x, y, idx))
    if (i + 1) % EVAL_EVERY == 0:
      val = float(accuracy(params, data.x_val, data.y_val))
      if val > best.val_accuracy:
        best = Trained(val, float(accuracy(params, data.x_test, data.y_test)), i + 1)
  return best


def weight_meta_optimizer(*, unroll_steps: int | bool = 1) -> mfo.MetaOptimizer:
  """The recipe's meta-optimizer: per-example weight logits, outer loss on clean data."""

  def inner_loss(params, logits, batch):
    x, y, idx = batch
    return jnp.sum(jax.nn.sigmoid(logits[idx]) * cross_entropy(params, x, y)) / BATCH

  def outer_loss(params, logits, batch):
    return jnp.mean(cross_entropy(params, *batch))

  return mfo.meta_optimizer(
    inner_loss,
    outer_loss,
    mfo.transforms.adam(INNER_LR),
    optax.adam(META_LR),
    unroll_steps=unroll_steps,
  )


def meta_batches(data: Data, key: jax.Array):
  """``T`` training minibatches with their example ids, and one validation minibatch."""
  k_inner, k_outer = jax.random.split(key)
  (x, y), idx = mfo.sample_batches(
    k_inner, (data.x_train, data.y_train), BATCH, steps=T, with_indices=True
  )
  outer = mfo.sample_batches(k_outer, (data.x_val, data.y_val), BATCH)
  return (x, y, idx), outer


def learn_weights(data: Data, key: jax.Array, meta_steps: int = META_STEPS) -> mfo.MetaTrainResult:
  """Step 1 of the recipe: the learned weights are ``sigmoid(result.state.meta_params)``."""
  mo = weight_meta_optimizer()
  key, init_key = jax.random.split(key)
  state = mo.init(jnp.zeros(N_TRAIN), init_mlp(init_key))
  return mfo.meta_train(
    mo,
    state,
    lambda k: meta_batches(data, k),
    meta_steps,
    key=key,
    eval_fn=lambda s: {"val_accuracy": accuracy(s.params, data.x_val, data.y_val)},
    eval_every=EVAL_EVERY // T,
    best_metric="val_accuracy",
    best_mode="max",
    progress=False,
  )


def compute(data: Data, meta_steps: int, retrain_steps: int) -> dict[str, float]:
  """FLOPs of the recipe and of one plain training step (loops unrolled for the analysis)."""
  key = jax.random.PRNGKey(0)
  params = init_mlp(key)
  mo = weight_meta_optimizer(unroll_steps=True)
  state = mo.init(jnp.zeros(N_TRAIN), params)
  meta_step = _real_data.flops(mo.step, state, *meta_batches(data, key))
  opt, step = train_step_fn(INNER_LR)
  (x, y), idx = mfo.sample_batches(key, (data.x_train, data.y_train), BATCH, with_indices=True)
  train_step = _real_data.flops(step, params, opt.init(params), jnp.ones(N_TRAIN), (x, y, idx))
  recipe = meta_steps * meta_step + retrain_steps * train_step
  return {"meta_step": meta_step, "train_step": train_step, "recipe": recipe}


def run(seed: int, *, quick: bool = False) -> dict[str, Any]:
  """One seed: the recipe and the equal-compute baseline; test accuracies and details."""
  from sklearn.metrics import roc_auc_score

  meta_steps, retrain_steps = (
    (META_STEPS // 4, RETRAIN_STEPS // 4) if quick else (META_STEPS, RETRAIN_STEPS)
  )
  data = load(seed)
  key_meta, key_retrain, key_base = jax.random.split(jax.random.PRNGKey(seed), 3)
  t0 = time.perf_counter()
  learned = learn_weights(data, key_meta, meta_steps)
  weights = jax.nn.sigmoid(learned.state.meta_params)
  retrained = train_early_stopped(data, INNER_LR, retrain_steps, key_retrain, weights)
  recipe_seconds = time.perf_counter() - t0

  flops = compute(data, meta_steps, retrain_steps)
  # The baseline gets at least the recipe's compute: round its steps up.
  steps_per_point = math.ceil(flops["recipe"] / flops["train_step"] / len(GRID))
  t0 = time.perf_counter()
  grid = {lr: train_early_stopped(data, lr, steps_per_point, key_base) for lr in GRID}
  baseline_seconds = time.perf_counter() - t0
  best_lr = max(grid, key=lambda lr: grid[lr].val_accuracy)  # chosen on validation
  return {
    "seed": seed,
    "recipe": retrained.test_accuracy,
    "baseline": grid[best_lr].test_accuracy,
    "recipe_flops": flops["recipe"],
    "baseline_flops": steps_per_point * len(GRID) * flops["train_step"],
    "recipe_seconds": recipe_seconds,
    "baseline_seconds": baseline_seconds,
    "meta_step_cost": flops["meta_step"] / flops["train_step"],
    "baseline_grid": {str(lr): r._asdict() for lr, r in grid.items()},
    "baseline_best_lr": best_lr,
    "baseline_steps_per_point": steps_per_point,
    "meta_best_val_accuracy": learned.best_value,
    "retrain": retrained._asdict(),
    "weights_auroc_clean_vs_flipped": float(roc_auc_score(~data.flipped, np.asarray(weights))),
    "mean_weight_clean": float(np.mean(np.asarray(weights)[~data.flipped])),
    "mean_weight_flipped": float(np.mean(np.asarray(weights)[data.flipped])),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
  parser.add_argument("--quick", action="store_true", help="a quarter of the steps (smoke test)")
  args = parser.parse_args(argv)
  rows = []
  for seed in args.seeds:
    row = run(seed, quick=args.quick)
    print(
      f"seed {seed}: recipe {row['recipe']:.3f}, baseline {row['baseline']:.3f} "
      f"(lr {row['baseline_best_lr']}, {row['baseline_steps_per_point']} steps per grid point), "
      f"weights AUROC {row['weights_auroc_clean_vs_flipped']:.3f}",
      flush=True,
    )
    rows.append(row)
  summary = _real_data.summarise(
    "noisy labels (digits, 40% flipped)", "test accuracy", rows, higher_is_better=True
  )
  if not args.quick:
    print("wrote", _real_data.write("noisy_labels", summary))
  print(_real_data.TABLE_HEADER + "\n" + _real_data.markdown_row(summary))
  return summary


if __name__ == "__main__":
  main()
