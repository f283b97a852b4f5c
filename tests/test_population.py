"""Populations of inner learners: meta_optimizer(..., population_size=P, reset_every=K)."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

P, T = 3, 2
CHECK = pathlib.Path(__file__).resolve().parent / "population_sharding_check.py"


def _problem(P=P, seed=0):
  """Members' params (P, ...), inner batches (P, T, ...), outer batches (P, ...), meta."""
  params, meta, _ = helpers.mlp_problem(T, seed=seed)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
  members = jax.tree.map(
    lambda x: x[None] + 0.3 * jax.random.normal(keys[0], (P,) + x.shape), params
  )
  xs = jax.random.normal(keys[1], (P, T, 4, 2))
  inner = (xs, jnp.sin(xs[..., 0]))
  xo = jax.random.normal(keys[2], (P, 4, 2))
  outer = (xo, jnp.sin(xo[..., 0]))
  return members, inner, outer, meta


def _outer_loss(params, meta, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def _meta_optimizer(outer_opt, **kwargs):
  return mfo.meta_optimizer(
    helpers.weighted_mlp_loss,
    _outer_loss,
    mfo.transforms.adam(0.1),
    outer_opt,
    hyperparams_fn=helpers.lr_hyperparams,
    **kwargs,
  )


def _member(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


class PopulationExactnessTest(helpers.F64TestCase):
  def _single_steps(self, outer_opt, members, inner, outer, meta, mode="mixflow"):
    single = _meta_optimizer(outer_opt, mode=mode)
    step = jax.jit(single.step)
    return [
      step(single.init(meta, _member(members, i)), _member(inner, i), _member(outer, i))
      for i in range(P)
    ]

  @parameterized.named_parameters(("mixflow", "mixflow"), ("forward", "forward"))
  def test_meta_gradient_is_the_mean_of_the_members(self, mode):
    members, inner, outer, meta = _problem()
    mo = _meta_optimizer(optax.sgd(1.0), population_size=P, mode=mode)
    state, metrics = jax.jit(mo.step)(mo.init(meta, members), inner, outer)
    singles = self._single_steps(optax.sgd(1.0), members, inner, outer, meta, mode)
    # sgd(1.0): meta - new meta is the meta-gradient.
    want = jax.tree.map(
      lambda *ms: jnp.mean(jnp.stack(ms), axis=0), *[s.meta_params for s, _ in singles]
    )
    chex.assert_trees_all_close(state.meta_params, want, **helpers.TIGHT)
    for i, (single_state, single_metrics) in enumerate(singles):
      chex.assert_trees_all_close(_member(state.params, i), single_state.params, **helpers.TIGHT)
      np.testing.assert_allclose(
        metrics["member_outer_loss"][i], single_metrics["outer_loss"], rtol=1e-12
      )
    self.assertEqual(metrics["inner_losses"].shape, (P, T))
    np.testing.assert_allclose(
      metrics["outer_loss"], jnp.mean(metrics["member_outer_loss"]), rtol=1e-12
    )
    np.testing.assert_array_equal(state.member_age, [T] * P)

  def test_outer_per_member_adam_is_the_mean_of_the_members_updates(self):
    members, inner, outer, meta = _problem()
    mo = _meta_optimizer(optax.adam(0.1), population_size=P, outer_per_member=True)
    state, _ = jax.jit(mo.step)(mo.init(meta, members), inner, outer)
    singles = self._single_steps(optax.adam(0.1), members, inner, outer, meta)
    updates = [jax.tree.map(jnp.subtract, s.meta_params, meta) for s, _ in singles]
    want = jax.tree.map(lambda m, *us: m + jnp.mean(jnp.stack(us), axis=0), meta, *updates)
    chex.assert_trees_all_close(state.meta_params, want, **helpers.TIGHT)
    for i, (single_state, _) in enumerate(singles):
      chex.assert_trees_all_close(
        _member(state.outer_state, i), single_state.outer_state, **helpers.TIGHT
      )
    # Not the same as one Adam on the mean meta-gradient (first step: -lr * sign).
    shared = _meta_optimizer(optax.adam(0.1), population_size=P)
    shared_state, _ = jax.jit(shared.step)(shared.init(meta, members), inner, outer)
    self.assertGreater(
      float(jnp.max(jnp.abs(shared_state.meta_params["logits"] - state.meta_params["logits"]))),
      1e-3,
    )


class StaggeredResetTest(helpers.F64TestCase):
  def test_members_reset_on_schedule_to_their_initial_state(self):
    num, K, steps = 4, 3, 6
    members, inner, outer, meta = _problem(P=num)
    mo = _meta_optimizer(optax.sgd(0.0), population_size=num, reset_every=K)
    mo_step = jax.jit(mo.step)
    state = mo.init(meta, members)
    ages = np.zeros(num, int)
    for count in range(1, steps + 1):
      state, metrics = mo_step(state, inner, outer)
      np.testing.assert_array_equal(metrics["member_age"], ages)
      due = np.array([(count + i * K // num) % K == 0 for i in range(num)])
      self.assertLessEqual(due.sum(), -(-num // K))
      ages = np.where(due, 0, ages + T)
      np.testing.assert_array_equal(state.member_age, ages)
      for i in np.flatnonzero(due):
        chex.assert_trees_all_equal(_member(state.params, i), _member(members, i))
        chex.assert_trees_all_equal(_member(state.inner_state, i), mo_init_inner(members, i))
      for i in np.flatnonzero(~due):
        self.assertFalse(np.allclose(_member(state.params, i)["w"], _member(members, i)["w"]))

  def test_per_step_hyperparameters_use_the_member_age(self):
    members, inner, outer, meta = _problem(P=2)
    schedule = lambda m, step: {"learning_rate": jnp.exp(m["log_lr"]) / (1.0 + step)}
    mo = mfo.meta_optimizer(
      helpers.weighted_mlp_loss,
      _outer_loss,
      mfo.transforms.sgd(0.1),
      optax.sgd(0.0),
      hyperparams_fn=schedule,
      hyperparams_per_step=True,
      population_size=2,
      reset_every=2,
    )
    step = jax.jit(mo.step)
    state = mo.init(meta, members)
    state, _ = step(state, inner, outer)  # member 1 resets after this step
    _, metrics = step(state, inner, outer)
    np.testing.assert_array_equal(metrics["member_age"], [T, 0])
    ages = np.array([[T, T + 1], [0, 1]])
    np.testing.assert_allclose(
      metrics["hyperparams"]["learning_rate"], 0.1 / (1.0 + ages), rtol=1e-12
    )


def mo_init_inner(members, i):
  return mfo.transforms.adam(0.1).init(_member(members, i))


class PopulationErrorsTest(helpers.TestCase):
  def test_errors(self):
    members, inner, outer, meta = _problem()
    mo = _meta_optimizer(optax.sgd(0.1), population_size=P)
    with self.assertRaisesRegex(
      ValueError, r"leading member axis of length 3.*jax.vmap\(init_fn\)"
    ):
      mo.init(meta, _member(members, 0))
    state = mo.init(meta, members)
    with self.assertRaisesRegex(ValueError, r"inner_batches.*\(P, T, \.\.\.\)"):
      mo.step(state, _member(inner, 0), outer)
    with self.assertRaisesRegex(ValueError, "alternatives"):
      _meta_optimizer(optax.sgd(0.1), population_size=P, batched_tasks=True, reset_inner=True)
    with self.assertRaisesRegex(ValueError, "pass population_size"):
      _meta_optimizer(optax.sgd(0.1), reset_every=2)
    with self.assertRaisesRegex(ValueError, "reset_every=1"):
      _meta_optimizer(optax.sgd(0.1), population_size=P, reset_inner=True)
    with self.assertRaisesRegex(ValueError, "population_size"):
      _meta_optimizer(optax.sgd(0.1), population_size=0)


class PopulationShardingTest(helpers.TestCase):
  def test_members_sharded_over_four_devices(self):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
      f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    )
    root = str(CHECK.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
      filter(None, [root, str(CHECK.parent), env.get("PYTHONPATH")])
    )
    proc = subprocess.run(
      [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    self.assertEqual(summary["devices"], 4)
    self.assertLess(summary["max_rel_err"], 1e-10)
    self.assertTrue(summary["params_sharded"], summary)
    self.assertTrue(summary["meta_params_replicated"], summary)


if __name__ == "__main__":
  absltest.main()
