"""The real-data experiments' shared protocol and the noisy-label task's pieces.

The experiments themselves run in the benchmark (``python -m benchmarks.real_data``); these tests
check what their verdicts rest on: the verdict rule, the equal-compute accounting (XLA counts a
loop body once, so a meta-step must be analysed unrolled), and the noisy-label split.
"""

import pathlib

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from benchmarks import _real_data, real_data, real_data_noisy


class VerdictTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("better_on_9_of_10", [0.9] * 9 + [0.7], [0.8] * 10, True, "wins"),
    ("better_on_5_of_5", [0.9] * 5, [0.8] * 5, True, "wins"),
    ("better_on_8_of_10_is_not_enough", [0.9] * 8 + [0.7] * 2, [0.8] * 10, True, "ties"),
    ("three_seeds_never_decide", [0.9] * 3, [0.8] * 3, True, "ties"),
    ("better_on_9_but_worse_mean", [0.81] * 9 + [0.0], [0.8] * 10, True, "ties"),
    ("worse_on_9_of_10", [0.7] * 9 + [0.9], [0.8] * 10, True, "loses"),
    ("lower_is_better", [2.0] * 9 + [2.2], [2.1] * 10, False, "wins"),
    ("tied_seeds_left_out", [0.9] * 5 + [0.8] * 5, [0.8] * 10, True, "wins"),
    ("equal", [1.0] * 10, [1.0] * 10, True, "ties"),
  )
  def test_verdict(self, recipe, baseline, higher_is_better, expected):
    self.assertEqual(
      _real_data.verdict(recipe, baseline, higher_is_better=higher_is_better), expected
    )

  def test_summary_and_table_row(self):
    rows = [
      {"seed": s, "recipe": r, "baseline": b, "recipe_flops": 1.0, "baseline_flops": 1.1}
      for s, r, b in [(0, 0.9, 0.8), (1, 0.95, 0.85), (2, 0.9, 0.92)]
    ]
    summary = _real_data.summarise("task", "accuracy", rows, higher_is_better=True)
    self.assertEqual(summary["verdict"], "ties")  # 3 seeds cannot decide
    self.assertAlmostEqual(summary["compute_ratio"], 1.0 / 1.1)
    row = _real_data.markdown_row(summary)
    self.assertIn("**ties**", row)
    self.assertIn("| 2 of 3 | 0.500 |", row)  # P(at least 2 of 3 fair coins) = 4/8
    # Gains (0.1, 0.1, -0.02): mean 0.06, sample std 0.0693, s.e. 0.04.
    self.assertIn("| +0.060 ± 0.040 |", row)
    self.assertIn("| 2 | 0.9000 | 0.9200 |", _real_data.per_seed_table(summary))

  def test_paired_gain_is_signed_so_positive_favours_the_recipe(self):
    loss = _real_data.paired([1.0, 2.0], [1.5, 1.5], higher_is_better=False)
    self.assertEqual(loss["better_seeds"], 1)
    self.assertAlmostEqual(loss["gain_mean"], 0.0)
    self.assertAlmostEqual(loss["gain_se"], 0.5)
    self.assertAlmostEqual(loss["sign_p"], 0.75)  # at least 1 of 2
    # 9 of 10 better: (C(10,9) + C(10,10)) / 2^10; a tied seed is left out of the test.
    nine = _real_data.paired([1.0] * 9 + [0.0], [0.0] * 9 + [0.5], higher_is_better=True)
    self.assertAlmostEqual(nine["sign_p"], 11 / 1024)
    tied = _real_data.paired([1.0] * 9 + [0.0], [0.0] * 10, higher_is_better=True)
    self.assertAlmostEqual(tied["sign_p"], 1 / 512)
    score = _real_data.paired([0.9], [0.8], higher_is_better=True)
    self.assertEqual((score["better_seeds"], score["gain_se"]), (1, 0.0))
    self.assertAlmostEqual(score["gain_mean"], 0.1)

  def test_lm_row_takes_the_stronger_baseline(self):
    result = {
      "seed": 0,
      "recipe": {"test_nats": 2.0, "flops": 10.0},
      "baselines": {
        "constant": {"test_nats": 1.9, "flops": 11.0},
        "cosine": {"test_nats": 2.1, "flops": 11.0},
      },
    }
    row = real_data.TASKS["lm"].row(result)
    self.assertEqual((row["recipe"], row["baseline"], row["baseline_flops"]), (2.0, 1.9, 11.0))


class TablePagesTest(helpers.TestCase):
  def test_pages_show_the_measured_table(self):
    # README.md and docs/real_data.md show docs/bench/real_data/table.md as measured.
    root = pathlib.Path(__file__).resolve().parents[1]
    table = (root / "docs/bench/real_data/table.md").read_text()
    for page in real_data.PAGES_WITH_TABLE:
      text = (root / page).read_text()
      self.assertEqual(real_data.fill_table(text, table), text, f"{page}: run --table-only")

  def test_fill_table_replaces_between_markers(self):
    page = "a\n<!-- real-data table -->\nold\n<!-- end real-data table -->\nb"
    self.assertEqual(
      real_data.fill_table(page, "new\n"),
      "a\n<!-- real-data table -->\nnew\n<!-- end real-data table -->\nb",
    )
    with self.assertRaisesRegex(ValueError, "markers"):
      real_data.fill_table("no table here", "new")


class NoisyLabelsTest(helpers.TestCase):
  def test_split_and_noise(self):
    data = real_data_noisy.load(0)
    self.assertEqual(data.x_train.shape, (real_data_noisy.N_TRAIN, 64))
    self.assertEqual(data.x_val.shape[0], real_data_noisy.N_VAL)
    self.assertEqual(data.x_train.shape[0] + data.x_val.shape[0] + data.x_test.shape[0], 1797)
    self.assertBetween(float(np.mean(data.flipped)), 0.35, 0.45)
    self.assertEqual(len(np.unique(np.asarray(data.y_train))), 10)

  def test_a_meta_step_is_counted_with_every_inner_step(self):
    # XLA's cost analysis counts a scan body once; the accounting must see all T inner steps.
    flops = real_data_noisy.compute(real_data_noisy.load(0), meta_steps=2, retrain_steps=3)
    self.assertGreater(flops["meta_step"], real_data_noisy.T * flops["train_step"])
    self.assertEqual(flops["recipe"], 2 * flops["meta_step"] + 3 * flops["train_step"])

  def test_weighted_loss_ignores_zero_weights(self):
    data = real_data_noisy.load(1)
    params = real_data_noisy.init_mlp(jax.random.PRNGKey(0))
    idx = jnp.arange(8)
    batch = (data.x_train[:8], data.y_train[:8], idx)
    weights = jnp.zeros(real_data_noisy.N_TRAIN).at[:4].set(1.0)
    half = (data.x_train[:4], data.y_train[:4], jnp.arange(4))
    np.testing.assert_allclose(
      real_data_noisy.weighted_loss(params, weights, batch),
      real_data_noisy.weighted_loss(params, jnp.ones(real_data_noisy.N_TRAIN), half),
      rtol=1e-6,
    )


class MixtureRowTest(helpers.TestCase):
  def test_compared_with_the_stronger_baseline(self):
    result = {"seed": 0, "recipe": 2.4, "baseline": 2.5, "natural_same_steps": 2.3}
    result.update(recipe_flops=1.0, baseline_flops=1.0)
    self.assertEqual(real_data.TASKS["lm_mixture"].row(result)["baseline"], 2.3)
