"""The Equinox recipe: partition the model, combine it inside the loss.

An Equinox module holds its activation functions and other static fields as
pytree leaves, so it cannot be the ``params`` of an unroll whole (every leaf of
``params`` is differentiated and updated). ``eqx.partition(model,
eqx.is_inexact_array)`` splits it into the arrays (``params``) and the rest
(``static``); the loss rebuilds it with ``eqx.combine(params, static)``.
"""

import chex
import equinox as eqx
import helpers
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest

import mixflow_optax as mfo

T = 3


def _problem():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  model = eqx.nn.MLP(2, 1, width_size=8, depth=1, activation=jax.nn.tanh, key=keys[0])
  x = jax.random.normal(keys[1], (T + 1, 5, 2))
  y = jnp.sin(x[..., :1]) + 0.1 * jax.random.normal(keys[2], (T + 1, 5, 1))
  return model, (x[:T], y[:T]), (x[T], y[T])


def _recipe(static):
  def loss(params, log_lr, batch):
    model = eqx.combine(params, static)
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  return loss


def _meta_loss(loss, opt, inner, outer, mode):
  run = mfo.unroll(loss, opt, mode=mode, hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)})

  def meta_loss(log_lr, params):
    params_T, _ = run(log_lr, params, opt.init(params), inner)
    return loss(params_T, log_lr, outer)

  return meta_loss


def _bptt(loss, inner, outer):
  """Plain backpropagation through stock optax.adam, step by step."""

  def meta_loss(log_lr, params):
    stock = optax.adam(jnp.exp(log_lr))
    state = stock.init(params)
    for t in range(T):
      batch = jax.tree.map(lambda a, t=t: a[t], inner)
      updates, state = stock.update(jax.grad(loss)(params, log_lr, batch), state, params)
      params = optax.apply_updates(params, updates)
    return loss(params, log_lr, outer)

  return meta_loss


class EquinoxRecipeTest(helpers.F64TestCase):
  def test_meta_gradient_is_exact(self):
    model, inner, outer = _problem()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss, opt, log_lr = _recipe(static), mfo.transforms.adam(0.05), jnp.log(0.05)
    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))(log_lr, params)
    mixflow = grad(_meta_loss(loss, opt, inner, outer, "mixflow"))
    chex.assert_trees_all_close(
      mixflow, grad(_meta_loss(loss, opt, inner, outer, "standard")), rtol=1e-11, atol=1e-14
    )
    chex.assert_trees_all_close(mixflow, grad(_bptt(loss, inner, outer)), rtol=1e-10, atol=1e-13)
    self.assertGreater(float(jnp.abs(mixflow[0])), 0.0)

  def test_whole_module_as_params_names_the_fix(self):
    model, inner, _ = _problem()
    opt = mfo.transforms.sgd(0.1)
    loss = lambda m, meta, batch: jnp.mean((jax.vmap(m)(batch[0]) - batch[1]) ** 2)
    with self.assertRaisesRegex(TypeError, r"not an array.*eqx.partition.*eqx.combine"):
      mfo.unroll(loss, opt)(0.0, model, opt.init(eqx.filter(model, eqx.is_array)), inner)


if __name__ == "__main__":
  absltest.main()
