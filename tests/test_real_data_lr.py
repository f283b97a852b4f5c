"""Tests of benchmarks/real_data_lr.py (learned learning-rate schedules on digits) at tiny sizes.

The full benchmark (3 seeds, minutes) is not run here; these check its pieces: the splits, the
schedule, the equal-FLOPs accounting (baseline >= recipe, and the linear-in-T extrapolation of
the meta-step's FLOPs against a fully unrolled program), the early-stopped training runs and
the verdict rule.
"""

import math
import pathlib
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mixflow_optax as mfo  # noqa: E402
from benchmarks import real_data_lr as lr_bench  # noqa: E402


class RealDataLrTest(helpers.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data = lr_bench.digits_splits(0)

  def test_splits_are_disjoint_and_sized(self):
    sizes = {k: len(v[1]) for k, v in self.data.items()}
    self.assertEqual(sizes, {"train": 1000, "val": 400, "test": 397})
    other = lr_bench.digits_splits(1)
    self.assertFalse(np.array_equal(self.data["test"][0], other["test"][0]))

  def test_schedule_interpolates_log_rates(self):
    hfn = lr_bench.make_schedule(11, depth=1)
    meta = {"l0": jnp.log(jnp.array([1e-3, 1e-2, 1e-3])), "l1": jnp.log(jnp.full(3, 4e-3))}
    at = lambda t: hfn(meta, jnp.int32(t))["learning_rate"]  # noqa: E731
    np.testing.assert_allclose(at(0)["l0"], 1e-3, rtol=1e-5)
    np.testing.assert_allclose(at(5)["l0"], 1e-2, rtol=1e-5)
    np.testing.assert_allclose(
      at(2)["l0"], math.exp(math.log(1e-3) + 0.4 * math.log(10)), rtol=1e-5
    )
    np.testing.assert_allclose(at(7)["l1"], 4e-3, rtol=1e-5)

  def test_baseline_gets_at_least_the_recipes_flops(self):
    for recipe, run in [(10.0, 3.0), (12.0, 3.0), (5.0, 7.0), (1e12, 7.5e8)]:
      n = lr_bench.baseline_runs(recipe, run)
      self.assertGreaterEqual(n * run, recipe)
      self.assertEqual(n % 2, 0)  # a constant and a cosine run per grid point
      self.assertLess((n - 2) * run, recipe)
    with self.assertRaisesRegex(ValueError, "FLOPs must be positive"):
      lr_bench.baseline_runs(0.0, 1.0)

  def test_meta_step_flops_extrapolate_linearly_in_T(self):
    costs = lr_bench.flop_costs(self.data, population=2, steps=3, depth=1)
    # Per member, a meta-gradient inner step costs more than a plain step (forward + reverse).
    self.assertGreater(costs["meta_per_inner_step"], 2 * costs["plain_step"])
    # The extrapolation from T=1, 2 equals the FLOPs of the program unrolled at T=3.
    params = lr_bench.init_mlp(jax.random.PRNGKey(0), 1)
    mo = lr_bench._meta_optimizer(3, 1, 2, unroll_steps=True)
    members = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    state = mo.init(lr_bench._meta0(1e-3, 1), members)
    (xtr, ytr), (xva, yva) = self.data["train"], self.data["val"]
    b = lr_bench.BATCH
    inner = (jnp.broadcast_to(xtr[:b], (2, 3, b, 64)), jnp.broadcast_to(ytr[:b], (2, 3, b)))
    outer = (jnp.broadcast_to(xva, (2,) + xva.shape), jnp.broadcast_to(yva, (2,) + yva.shape))
    unrolled = lr_bench._flops(mo.step, state, inner, outer)
    np.testing.assert_allclose(costs["meta_step"], unrolled, rtol=0.02)

  def test_exported_constant_schedule_equals_optax_adam(self):
    # All knots at log(3e-3): the exported learned optimizer is Adam(3e-3), run for run.
    hfn = lr_bench.make_schedule(10, depth=1)
    tx = mfo.export_optimizer(
      mfo.transforms.adam(1e-3), hfn, lr_bench._meta0(3e-3, 1), per_step=True
    )
    keys = jax.random.split(jax.random.PRNGKey(3), 1)
    kw = {"steps": 10, "eval_every": 5, "depth": 1}
    ours = lr_bench.train_curves(lambda _: tx, self.data, jnp.zeros(1), keys, **kw)[0]
    ref = lr_bench.train_curves(optax.adam, self.data, jnp.full(1, 3e-3), keys, **kw)[0]
    self.assertIn(ours["stop_step"], (5, 10))
    np.testing.assert_allclose(ours["val_nll"], ref["val_nll"], rtol=1e-4)
    np.testing.assert_allclose(ours["test_nll"], ref["test_nll"], rtol=1e-4)

  def test_adam_factory(self):
    sched = lr_bench.adam_factory("cosine", 10)
    self.assertIsInstance(sched(1e-3), optax.GradientTransformation)
    with self.assertRaisesRegex(ValueError, "constant' or 'cosine"):
      lr_bench.adam_factory("linear", 10)

  def test_verdict_rule(self):
    res = lambda r, b: [{"recipe": x, "baseline": y} for x, y in zip(r, b)]  # noqa: E731
    self.assertEqual(lr_bench.verdict(res([1] * 9 + [3], [2] * 10)), "wins")
    # Better mean but better on one seed only: not a win.
    self.assertEqual(lr_bench.verdict(res([0.1] + [2.05] * 9, [2] * 10)), "ties")
    self.assertEqual(lr_bench.verdict(res([3] * 9 + [1], [2] * 10)), "loses")


if __name__ == "__main__":
  absltest.main()
