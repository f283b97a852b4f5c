"""Tests of benchmarks/real_data_lm.py (the LM real-data benchmark) that need no training run.

The data splits, the vocabulary, the schedules, the grid, the verdict rule and the FLOP
accounting; the benchmark itself is run by ``python -m benchmarks.real_data_lm``.
"""

import math
import pathlib
import sys

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mixflow_optax as mfo  # noqa: E402
from benchmarks import real_data_lm as lm  # noqa: E402


class DataTest(helpers.TestCase):
  def test_encode_is_the_fixed_vocabulary(self):
    ids = lm.encode("def f(x):\n\treturn 'é'\n")
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual("".join(lm.VOCAB[i] for i in ids[:10]), "def f(x):\n")
    self.assertEqual(ids[10], lm.UNK)  # a tab is outside the vocabulary
    self.assertTrue(np.all((ids >= 0) & (ids < lm.VOCAB_SIZE)))

  def test_splits_are_disjoint_files_and_change_with_the_seed(self):
    a, b = lm.load_splits(0), lm.load_splits(1)
    for splits in (a, b):
      names = [set(splits.files[k]) for k in ("train", "valid", "test")]
      self.assertEqual(sum(map(len, names)), len(set.union(*names)))
      self.assertEqual(len(set.union(*names)), len(lm.stdlib_files()))
      self.assertGreaterEqual(splits.valid.size, 150_000)
      self.assertGreater(splits.train.size, 10 * splits.valid.size)
    self.assertNotEqual(a.files["test"], b.files["test"])
    np.testing.assert_array_equal(lm.load_splits(0).test, a.test)  # deterministic

  def test_tiled_windows_cover_every_character_once(self):
    ids = np.arange(100)
    windows = lm.tiled_windows(ids, 11)
    np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 1 + 10 * len(windows)))
    self.assertEqual(len(windows), 9)


class ScheduleTest(helpers.TestCase):
  def test_cosine_warms_up_then_decays_to_zero(self):
    shape = lm.schedule_shape("cosine", steps=100, warmup=10)
    values = np.asarray(jax.vmap(shape)(jnp.arange(101)))
    np.testing.assert_allclose(values[0], 0.1, rtol=1e-6)
    self.assertAlmostEqual(float(values[9]), math.cos(math.pi * 0.09) * 0.5 + 0.5, places=5)
    self.assertTrue(np.all(np.diff(values[10:]) <= 0))
    self.assertAlmostEqual(float(values[100]), 0.0, places=6)
    self.assertEqual(float(lm.schedule_shape("constant", 100, 10)(57)), 1.0)
    with self.assertRaisesRegex(ValueError, "'constant' or 'cosine'"):
      lm.schedule_shape("linear", 100, 10)

  def test_grid_points_are_log_spaced_cell_centres(self):
    points = lm.grid_points((1e-3, 1e-1), 2)
    np.testing.assert_allclose(points, [10**-2.5, 10**-1.5])
    np.testing.assert_allclose(lm.grid_points((1e-3, 1e-1), 1), [1e-2])


class VerdictTest(helpers.TestCase):
  def test_the_shared_rule_on_test_loss(self):
    self.assertEqual(lm.verdict([1.0] * 9 + [1.2], [1.1] * 10), "wins")
    # Better mean on 6 of 10 seeds: chance explains it.
    self.assertEqual(lm.verdict([0.5] * 6 + [1.2] * 4, [1.1] * 10), "ties")
    self.assertEqual(lm.verdict([1.2] * 9 + [1.0], [1.1] * 10), "loses")


class RecipeTest(helpers.TestCase):
  def test_per_step_schedule_equals_the_schedule_as_learning_rate(self):
    # The results in docs/bench/real_data were measured with the schedule passed as Adam's
    # learning rate (its step count as the index); the per-step form gives the same run.
    cfg = lm.Config(d_model=16, num_layers=1, num_heads=2, seq_len=8, batch_size=2)
    budget = lm.Budget(steps=12, eval_every=4, meta_every=4, warmup=3, valid_windows=4)
    shape = lm.schedule_shape("cosine", budget.steps, budget.warmup)
    inner_loss = lambda params, meta, batch: lm.loss_fn(params, batch, cfg)
    as_learning_rate = mfo.meta_optimizer(
      inner_loss,
      inner_loss,
      mfo.transforms.adam(shape),
      optax.adam(budget.outer_lr),
      hyperparams_fn=lambda m: {"learning_rate": lambda count: jnp.exp(m) * shape(count)},
      mode="forward",
      carry_tangents=True,
    )
    per_step = lm.learned_rate_optimizer(cfg, budget)
    params = lm.init_params(jax.random.PRNGKey(0), cfg)
    batches = jax.random.randint(jax.random.PRNGKey(1), (3, 4, 2, 9), 0, lm.VOCAB_SIZE)
    states = [mo.init(jnp.log(jnp.float32(5e-3)), params) for mo in (as_learning_rate, per_step)]
    for k in range(3):
      states = [
        mo.step(state, batches[k], batches[k, 0])[0]
        for mo, state in zip((as_learning_rate, per_step), states)
      ]
    chex.assert_trees_all_close(states[0].params, states[1].params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(states[0].meta_params, states[1].meta_params, rtol=1e-6)


class FlopsTest(helpers.TestCase):
  def test_meta_step_costs_about_three_plain_steps_per_inner_step(self):
    cfg = lm.Config(d_model=16, num_layers=1, num_heads=2, seq_len=8, batch_size=2)
    budget = lm.Budget(steps=4, eval_every=2, meta_every=2, valid_windows=4)
    counts = lm.flop_counts(cfg, budget)
    ratio = counts["meta_inner_step"] / counts["train_step"]
    # One training step and one Jacobian-vector product of it (the carried tangent).
    self.assertBetween(ratio, 2.0, 4.5)
    self.assertGreater(counts["meta_outer"], 0.0)
    self.assertAlmostEqual(
      counts["meta_step"], counts["meta_outer"] + 2 * counts["meta_inner_step"], delta=1.0
    )


if __name__ == "__main__":
  absltest.main()
