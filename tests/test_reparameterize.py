"""``mfo.transforms.reparameterize`` over the optax optimizers it can wrap.

For every ``reparameterize`` entry of tests/registry.py (the support table of
docs/optimizers.md): the wrapped
optimizer follows the stock trajectory with the stock state, a
``hyperparams=`` override equals constructing the stock optimizer with that
value, and the meta-gradient with respect to the learning rate equals plain
autodiff through the stock optimizer built with a traced learning rate. For
the aliases that treat every tensor independently, per-parameter values equal
running each tensor with its own value. Then the documented limits and errors.
"""

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import registry
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

R = mfo.transforms.reparameterize
# Every entry works with scalar hyperparameters and gives exact (stock) meta-gradients.
OPTIMIZERS = registry.REPARAMETERIZED_OPTIMIZERS


def _run(opt, hyperparams=None, steps=2, params=None, batch=None):
  """``steps`` eager steps; passes the loss (polyak_sgd, lbfgs need it) as extra args."""
  params = helpers.layer_params() if params is None else params
  batch = helpers.layer_batch() if batch is None else batch
  opt = optax.with_extra_args_support(opt)
  state = opt.init(params)
  kw = {} if hyperparams is None else {"hyperparams": hyperparams}
  for _ in range(steps):
    value, grads = jax.value_and_grad(helpers.layer_loss)(params, batch)
    updates, state = opt.update(
      grads,
      state,
      params,
      value=value,
      grad=grads,
      value_fn=lambda p: helpers.layer_loss(p, batch),
      **kw,
    )
    params = optax.apply_updates(params, updates)
  # PRNG keys (noisy_sgd) compare by their data.
  is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return params, jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, state)


class SupportedTest(helpers.F64TestCase):
  @parameterized.named_parameters(*((n, n) for n in OPTIMIZERS))
  def test_trajectory_override_and_meta_gradient_match_stock(self, name):
    entry = OPTIMIZERS[name]
    factory, kwargs, rate = entry.stock_fn, entry.kwargs, entry.rate
    opt = entry.make()
    self.assertIsInstance(opt, mfo.transforms.ReparamTransformation)
    self.assertIn(rate, opt.hyperparams)
    self.assertNotIn("key", opt.hyperparams)
    # Defaults: the stock trajectory and state.
    chex.assert_trees_all_close(_run(opt), _run(factory(**kwargs)), **helpers.TIGHT)
    # An override equals construction with that value.
    new = {**kwargs, rate: 0.5 * kwargs[rate]}
    chex.assert_trees_all_close(_run(opt, {rate: new[rate]}), _run(factory(**new)), **helpers.TIGHT)

    # The meta-gradient is that of the stock arithmetic.
    def meta_loss(make, lr):
      params, _ = _run(*make(lr))
      return helpers.layer_loss(params, helpers.layer_batch())

    ours = jax.grad(functools.partial(meta_loss, lambda lr: (opt, {rate: lr})))(kwargs[rate])
    stock = jax.grad(
      functools.partial(meta_loss, lambda lr: (factory(**{**kwargs, rate: lr}), None))
    )(kwargs[rate])
    self.assertTrue(np.isfinite(ours))
    np.testing.assert_allclose(ours, stock, rtol=1e-10, atol=1e-14)

  @parameterized.named_parameters(*((n, n) for n, o in OPTIMIZERS.items() if o.leafwise))
  def test_per_parameter_values_equal_separate_runs(self, name):
    opt = OPTIMIZERS[name].make()
    values = {k: 0.5 * v for k, v in opt.hyperparams.items() if k in ("learning_rate", "b1")}
    mixed = {k: {"w": v, "b": opt.hyperparams[k]} for k, v in values.items()}
    # Fixed gradients: each tensor's updates depend only on its own values.
    grads_seq = helpers.grad_sequence()
    u_mixed = helpers.updates_for(opt, grads_seq, hyperparams=mixed)
    u_w = helpers.updates_for(opt, grads_seq, hyperparams=values)
    u_b = helpers.updates_for(opt, grads_seq)
    for u, uw, ub in zip(u_mixed, u_w, u_b):
      chex.assert_trees_all_close(u["w"], uw["w"], **helpers.TIGHT)
      chex.assert_trees_all_close(u["b"], ub["b"], **helpers.TIGHT)
    self.assertFalse(np.allclose(u_w[-1]["w"], u_b[-1]["w"]))  # Not vacuous.

  def test_per_element_values_where_elementwise(self):
    opt = R(optax.yogi)(learning_rate=0.05)
    rates = {"w": jnp.asarray([[0.1, 0.2], [0.3, 0.05], [0.0, 1.0]]), "b": jnp.asarray(0.07)}
    params, grads = helpers.layer_params(), helpers.grad_sequence(1)[0]
    u, _ = opt.update(grads, opt.init(params), params, hyperparams={"learning_rate": rates})
    unit, _ = opt.update(grads, opt.init(params), params, hyperparams={"learning_rate": 1.0})
    chex.assert_trees_all_close(u, jax.tree.map(jnp.multiply, rates, unit), **helpers.TIGHT)

  def test_jit_does_not_retrace_and_hyperparams(self):
    opt = R(optax.yogi)(learning_rate=1e-3, b1=0.9)
    self.assertEqual(opt.hyperparams, {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-3})
    params, grads = helpers.layer_params(), helpers.grad_sequence(2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(g, s, hp):
      return opt.update(g, s, params, hyperparams=hp)

    chex.clear_trace_counter()
    _, s = update(grads[0], opt.init(params), {"learning_rate": jnp.asarray(0.1)})
    u, _ = update(grads[1], s, {"learning_rate": jnp.asarray(0.2)})
    ref = optax.yogi(0.2)
    _, rs = optax.yogi(0.1).update(grads[0], ref.init(params), params)
    chex.assert_trees_all_close(u, ref.update(grads[1], rs, params)[0], **helpers.TIGHT)

  def test_inside_mfo_chain_and_unroll(self):
    opt = mfo.transforms.chain(optax.clip_by_global_norm(1.0), R(optax.yogi)(learning_rate=0.05))
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.yogi(0.05))
    chex.assert_trees_all_close(_run(opt), _run(ref), **helpers.TIGHT)
    run = mfo.unroll(
      lambda p, m, b: helpers.layer_loss(p, b), opt, hyperparams_fn=lambda lr: {"learning_rate": lr}
    )
    x, y = helpers.layer_batch()
    batches = (jnp.stack([x, x]), jnp.stack([y, y]))
    params = helpers.layer_params()
    p, _ = run(jnp.asarray(0.05), params, opt.init(params), batches)
    chex.assert_trees_all_close(p, _run(ref)[0], **helpers.TIGHT)


class LimitsTest(helpers.F64TestCase):
  def test_value_dependent_control_flow_names_the_argument(self):
    opt = R(optax.adafactor)(learning_rate=0.05)
    with self.assertRaisesRegex(ValueError, r"\['min_dim_size_to_factor'\].*static_args"):
      opt.init(helpers.layer_params())

  def test_per_parameter_values_need_a_leafwise_optimizer(self):
    params, grads = helpers.layer_params(), helpers.grad_sequence(1)[0]
    for factory in (optax.contrib.muon, optax.noisy_sgd):
      kwargs = {"key": 0} if factory is optax.noisy_sgd else {}
      opt = R(factory, static_args=("key",))(0.05, **kwargs) if kwargs else R(factory)(0.05)
      with self.assertRaisesRegex(ValueError, r"\['learning_rate'\].*Pass scalars"):
        opt.update(
          grads, opt.init(params), params, hyperparams={"learning_rate": {"w": 0.1, "b": 0.2}}
        )

  def test_per_element_values_on_per_tensor_optimizer_suggest_hand_written(self):
    params, grads = helpers.layer_params(), helpers.grad_sequence(1)[0]
    opt = R(optax.lamb)(0.05)
    rates = {"w": jnp.full((3, 2), 0.1), "b": 0.2}
    with self.assertRaisesRegex(ValueError, "mixflow_optax.transforms.lamb"):
      opt.update(grads, opt.init(params), params, hyperparams={"b1": rates})

  def test_bad_static_args(self):
    with self.assertRaisesRegex(ValueError, "not arguments"):
      R(optax.adam, static_args=("beta1",))

  def test_inherits_stock_numerics_at_zero_gradients(self):
    """Documented: stock optax's sqrt(0) gives NaN; the hand-written adam does not."""
    params, batch = helpers.layer_params(), helpers.layer_batch(zeros="some")

    def meta_loss(opt, lr):
      p, _ = _run(opt, {"learning_rate": lr}, 2, params, batch)
      return helpers.layer_loss(p, batch)

    self.assertTrue(np.isnan(jax.grad(functools.partial(meta_loss, R(optax.adam)(0.05)))(0.05)))
    self.assertTrue(
      np.isfinite(jax.grad(functools.partial(meta_loss, mfo.transforms.adam(0.05)))(0.05))
    )

  def test_unsupported_for_meta_gradients(self):
    """lbfgs: reverse mode of a while loop. (radam's NaN: tests/test_silent_answers.py.)"""
    params, batch = helpers.layer_params(), helpers.layer_batch()

    def meta_loss(opt, steps, lr):
      p, _ = _run(opt, {"learning_rate": lr}, steps, params, batch)
      return helpers.layer_loss(p, batch)

    with self.assertRaisesRegex(ValueError, "while_loop"):
      jax.grad(functools.partial(meta_loss, R(optax.lbfgs)(0.05), 1))(0.05)

  def test_init_only_arguments_have_no_effect_in_update(self):
    """rprop's learning_rate only sets the initial step sizes (in init)."""
    opt = R(optax.rprop)(learning_rate=0.05)
    chex.assert_trees_all_close(_run(opt), _run(optax.rprop(0.05)), **helpers.TIGHT)
    chex.assert_trees_all_close(_run(opt, {"learning_rate": 0.5}), _run(opt), **helpers.TIGHT)


if __name__ == "__main__":
  absltest.main()
