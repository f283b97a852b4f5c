"""The meta-training loop: sample_batches, meta_train, applied hyperparameters, export_optimizer."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

import mixflow_optax as mfo

T = 3


def _loss(params, meta, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def _data(n=32, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (n, 2))
  return x, jnp.sin(x[:, 0]) + 0.1 * jax.random.normal(k2, (n,))


def _params():
  return helpers.mlp_problem(T)[0]


def _hyperparams(meta):
  return {"learning_rate": {"w": jnp.exp(meta["log_lr_w"]), "v": jnp.exp(meta["log_lr_v"])}}


def _meta():
  return {"log_lr_w": jnp.log(0.05), "log_lr_v": jnp.log(0.1)}


def _meta_optimizer():
  return mfo.meta_optimizer(
    _loss, _loss, mfo.transforms.adam(0.1), optax.adam(0.05), hyperparams_fn=_hyperparams
  )


def _batches_fn(data):
  def batches_fn(key):
    k_inner, k_outer = jax.random.split(key)
    return mfo.sample_batches(k_inner, data, 8, steps=T), mfo.sample_batches(k_outer, data, 16)

  return batches_fn


class SampleBatchesTest(helpers.TestCase):
  def test_shapes_indices_and_no_replacement(self):
    data = {"x": jnp.arange(30.0).reshape(10, 3), "y": jnp.arange(10)}
    sample = jax.jit(
      mfo.sample_batches, static_argnums=2, static_argnames=("steps", "with_indices")
    )
    batches, idx = sample(jax.random.key(0), data, 10, steps=4, with_indices=True)
    self.assertEqual(batches["x"].shape, (4, 10, 3))
    self.assertEqual(idx.dtype, jnp.int32)
    np.testing.assert_array_equal(batches["y"], idx)
    np.testing.assert_array_equal(batches["x"], data["x"][idx])
    for row in np.asarray(idx):  # batch_size = N: every step is a permutation
      self.assertEqual(sorted(row.tolist()), list(range(10)))
    self.assertFalse(np.array_equal(idx[0], idx[1]))  # each step draws its own batch
    self.assertEqual(mfo.sample_batches(jax.random.key(1), data, 3)["x"].shape, (3, 3))

  def test_errors(self):
    data = (jnp.zeros((5, 2)), jnp.zeros(5))
    with self.assertRaisesRegex(ValueError, "batch_size=6 is larger than the 5 examples"):
      mfo.sample_batches(jax.random.key(0), data, 6)
    with self.assertRaisesRegex(ValueError, "same leading example axis"):
      mfo.sample_batches(jax.random.key(0), (jnp.zeros((5, 2)), jnp.zeros(4)), 2)


class MetaTrainTest(helpers.TestCase):
  def test_loop_eval_best_state_and_history(self):
    data, held_out = _data(), _data(seed=1)
    mo = _meta_optimizer()
    state0 = mo.init(_meta(), _params())
    evals = []

    def eval_fn(state):
      value = float(_loss(state.params, None, held_out))
      evals.append(value)
      return {"held_out": value, "count": state.count}

    result = mfo.meta_train(
      mo,
      state0,
      _batches_fn(data),
      6,
      key=jax.random.key(0),
      eval_fn=eval_fn,
      eval_every=2,
      best_metric="held_out",
      progress=False,
    )
    # The same loop written by hand, key by key.
    step, state, key = jax.jit(mo.step), state0, jax.random.key(0)
    for _ in range(6):
      key, sub = jax.random.split(key)
      state, _ = step(state, *_batches_fn(data)(sub))
    chex.assert_trees_all_close(result.state, state, rtol=1e-6)
    # state0 was not donated away.
    self.assertEqual(int(state0.count), 0)
    hist = result.history
    np.testing.assert_array_equal(hist["eval_step"], [2, 4, 6])
    np.testing.assert_allclose(hist["eval/held_out"], evals, rtol=1e-6)
    best = int(np.argmin(evals))
    self.assertEqual(result.best_step, [2, 4, 6][best])
    self.assertAlmostEqual(result.best_value, evals[best], places=6)
    self.assertEqual(int(result.best_state.count), result.best_step)
    self.assertIsInstance(result.best_state.params["w"], np.ndarray)
    self.assertEqual(hist["outer_loss"].shape, (6,))
    self.assertEqual(hist["inner_losses"].shape, (6, T))
    # The applied hyperparameters, one readable key per module.
    lr_w = hist["hyperparams/learning_rate/w"]
    self.assertEqual(lr_w.shape, (6,))
    np.testing.assert_allclose(lr_w[0], 0.05, rtol=1e-6)
    self.assertNotAlmostEqual(float(lr_w[-1]), 0.05)

  def test_without_eval(self):
    mo = _meta_optimizer()
    result = mfo.meta_train(
      mo, mo.init(_meta(), _params()), _batches_fn(_data()), 2, key=jax.random.key(0), jit=False
    )
    self.assertIsNone(result.best_state)
    self.assertNotIn("eval_step", result.history)

  def test_errors(self):
    mo = _meta_optimizer()
    state = mo.init(_meta(), _params())
    kwargs = dict(key=jax.random.key(0), progress=False)
    run = lambda n=1, **kw: mfo.meta_train(mo, state, _batches_fn(_data()), n, **kwargs, **kw)
    with self.assertRaisesRegex(ValueError, "must return a non-empty dict"):
      run(eval_fn=lambda s: 1.0)
    with self.assertRaisesRegex(ValueError, r"best_metric='acc' is not a key.*\['loss'\]"):
      run(eval_fn=lambda s: {"loss": 1.0}, best_metric="acc")
    with self.assertRaisesRegex(ValueError, "say which one"):
      run(eval_fn=lambda s: {"loss": 1.0, "acc": 0.5})
    with self.assertRaisesRegex(ValueError, "best_mode must be"):
      run(eval_fn=lambda s: {"loss": 1.0}, best_mode="lowest")
    with self.assertRaisesRegex(ValueError, "need eval_fn"):
      run(eval_every=2)
    with self.assertRaisesRegex(ValueError, "num_steps"):
      run(0)


class AppliedHyperparamsTest(helpers.TestCase):
  def test_metrics_report_the_hyperparameters_before_the_update(self):
    mo = _meta_optimizer()
    state = mo.init(_meta(), _params())
    new_state, metrics = jax.jit(mo.step)(state, *_batches_fn(_data())(jax.random.key(0)))
    chex.assert_trees_all_close(metrics["hyperparams"], _hyperparams(state.meta_params))
    self.assertFalse(
      np.allclose(
        metrics["hyperparams"]["learning_rate"]["w"],
        _hyperparams(new_state.meta_params)["learning_rate"]["w"],
      )
    )

  def test_absent_without_hyperparams_fn(self):
    mo = mfo.meta_optimizer(
      lambda p, m, b: _loss(p, m, b) * m, _loss, mfo.transforms.sgd(0.1), optax.sgd(0.1)
    )
    _, metrics = mo.step(
      mo.init(jnp.asarray(1.0), _params()), *_batches_fn(_data())(jax.random.key(0))
    )
    self.assertNotIn("hyperparams", metrics)


class ExportOptimizerTest(helpers.F64TestCase):
  def _trajectory(self, tx, steps=4):
    params, _, _ = helpers.mlp_problem(T)
    data = _data()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(_loss)(params, None, data)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    out = []
    for _ in range(steps):
      params, state = step(params, state)
      out.append(params)
    return out

  def test_equals_the_inner_optimizer_with_those_hyperparameters(self):
    meta = {"log_lr_w": jnp.log(0.03), "log_lr_v": jnp.log(0.2)}
    tx = mfo.export_optimizer(mfo.transforms.adam(0.1), _hyperparams, meta)
    # Stock optax with the same per-module learning rates.
    ref = optax.multi_transform({"w": optax.adam(0.03), "v": optax.adam(0.2)}, {"w": "w", "v": "v"})
    chex.assert_trees_all_close(self._trajectory(tx), self._trajectory(ref), **helpers.TIGHT)

  def test_per_step_schedule(self):
    knots = jnp.asarray([0.0, 2.0])
    schedule = lambda m, step: {"learning_rate": jnp.exp(jnp.interp(step, knots, m))}
    meta = jnp.log(jnp.asarray([0.1, 0.01]))
    tx = mfo.export_optimizer(mfo.transforms.sgd(0.1), schedule, meta, per_step=True)
    # Learning rates 0.1, sqrt(0.1 * 0.01), 0.01, then held at 0.01 beyond the last knot.
    lrs = [0.1, np.sqrt(1e-3), 0.01, 0.01]
    ref = optax.sgd(lambda count: jnp.asarray(lrs)[count])
    chex.assert_trees_all_close(self._trajectory(tx), self._trajectory(ref), **helpers.TIGHT)

  def test_inside_nnx_optimizer(self):
    from flax import nnx

    class Model(nnx.Module):
      def __init__(self):
        self.Dense_0 = nnx.Linear(2, 4, rngs=nnx.Rngs(0))
        self.Dense_1 = nnx.Linear(4, 1, rngs=nnx.Rngs(1))

      def __call__(self, x):
        return self.Dense_1(jnp.tanh(self.Dense_0(x)))[:, 0]

    x, y = _data()
    hyperparams_fn = lambda m: {
      "learning_rate": {"Dense_0": jnp.exp(m[0]), "Dense_1": jnp.exp(m[1])}
    }
    tx = mfo.export_optimizer(
      mfo.transforms.adam(0.1), hyperparams_fn, jnp.log(jnp.asarray([0.01, 0.05]))
    )
    ref = optax.multi_transform(
      {"a": optax.adam(0.01), "b": optax.adam(0.05)},
      lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: "a" if path[0].key == "Dense_0" else "b", p
      ),
    )
    finals = []
    for t in (tx, ref):
      model = Model()
      opt = nnx.Optimizer(model, t, wrt=nnx.Param)
      for _ in range(3):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
      finals.append(nnx.state(model, nnx.Param))
    # float32 parameters (nnx.Linear's default), float64 learning rates: agreement to rounding.
    chex.assert_trees_all_close(finals[0], finals[1], rtol=1e-6, atol=1e-7)

  def test_errors(self):
    with self.assertRaisesRegex(TypeError, "mixflow_optax optimizer whose hyperparameters"):
      mfo.export_optimizer(optax.adam(0.1), _hyperparams, _meta())


if __name__ == "__main__":
  absltest.main()
