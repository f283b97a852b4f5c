"""Tests of benchmarks/real_data_lm_mixture.py (learned data-mixture weights) without a full run.

The domain grouping and held-out files, the mixture sampler, the domain weights and the FLOP
accounting; the benchmark itself is run by ``python -m benchmarks.real_data_lm_mixture``.
"""

import pathlib
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import real_data_lm as lm  # noqa: E402
from benchmarks import real_data_lm_mixture as mix  # noqa: E402


class DomainTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("top_level_module", "os.py", "top"),
    ("named_package", "encodings/cp1252.py", "encodings"),
    ("nested_named_package", "email/mime/text.py", "email"),
    ("other_package", "json/decoder.py", "other"),
    ("test_suite", "test/test_os.py", "test"),
  )
  def test_domain_of(self, rel, expected):
    self.assertEqual(mix.domain_of(pathlib.PurePath(rel)), expected)

  def test_domains_and_held_out_files_are_disjoint(self):
    corpus = mix.load_corpus(0)
    groups = {k: set(v) for k, v in corpus.files.items()}
    self.assertEqual(sum(map(len, groups.values())), len(set.union(*groups.values())))
    self.assertEqual(set(corpus.domains), set(mix.DOMAINS))
    for split, ids in (("held_valid", corpus.valid), ("held_test", corpus.test)):
      self.assertGreaterEqual(ids.size, mix.HELD_OUT_CHARS)
      for rel in corpus.files[split]:  # held out: ordinary code only
        self.assertIn(mix.domain_of(pathlib.PurePath(rel)), mix.CODE_DOMAINS)
        self.assertNotIn("test", rel)
    for name in mix.DOMAINS:
      self.assertGreater(corpus.domains[name].size, 100 * lm.Config().seq_len, name)
    other = mix.load_corpus(1)
    self.assertNotEqual(corpus.files["held_test"], other.files["held_test"])
    np.testing.assert_array_equal(mix.load_corpus(0).test, corpus.test)  # deterministic


class SamplerTest(helpers.TestCase):
  def test_windows_come_from_the_drawn_domain(self):
    cfg = lm.Config(seq_len=4)
    domains = {d: np.full(50, i, np.uint8) for i, d in enumerate(mix.DOMAINS)}
    corpus = mix.Corpus(domains, np.zeros(10, np.uint8), np.zeros(10, np.uint8), {})
    sample, log_p = mix._sampler(corpus, cfg)
    np.testing.assert_allclose(
      np.exp(log_p), np.full(len(mix.DOMAINS), 1 / len(mix.DOMAINS)), rtol=1e-6
    )
    windows, domain = sample(jax.random.PRNGKey(0), log_p, (3, 8))
    self.assertEqual(windows.shape, (3, 8, 5))
    np.testing.assert_array_equal(windows, np.broadcast_to(domain[..., None], windows.shape))
    only = jnp.where(jnp.arange(len(mix.DOMAINS)) == 6, 0.0, -jnp.inf)
    _, domain = sample(jax.random.PRNGKey(1), only, (16,))
    np.testing.assert_array_equal(domain, np.full(16, 6))

  def test_domain_weights_are_ones_at_zero_and_average_one(self):
    np.testing.assert_allclose(mix.domain_weights(jnp.zeros(5)), np.ones(5), rtol=1e-6)
    w = mix.domain_weights(jnp.array([0.3, -1.0, 2.0]))
    self.assertAlmostEqual(float(jnp.mean(w)), 1.0, places=5)


class ComputeTest(helpers.TestCase):
  @parameterized.product(recipe=[1e9, 7.3e10, 4.1e11], eval_cost=[0.0, 5e8, 4e9])
  def test_baseline_gets_at_least_the_recipe_flops(self, recipe, eval_cost):
    budget = mix.Budget()
    flops = {"train_step": 7.8e8, "eval": eval_cost}
    steps = mix.baseline_steps(flops, recipe, budget)
    per_point = steps * flops["train_step"] + mix.num_evals(steps, budget.eval_every) * eval_cost
    self.assertGreaterEqual(len(mix.GRID) * per_point, recipe)
    # The fewest such steps.
    fewer = (steps - 1) * flops["train_step"]
    fewer += mix.num_evals(steps - 1, budget.eval_every) * eval_cost
    self.assertLess(len(mix.GRID) * fewer, recipe)


if __name__ == "__main__":
  absltest.main()
