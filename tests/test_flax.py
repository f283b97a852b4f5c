"""Flax recipes: NNX (split/merge) and Linen models inside mfo.meta_optimizer."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized
from flax import nnx


class _NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(1, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))


def _data(T=3, n=8, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  x = jax.random.uniform(k[0], (T + 1, n, 1), minval=-2, maxval=2)
  y = jnp.sin(x) + 0.1 * jax.random.normal(k[1], x.shape)
  return (x[:T], y[:T]), (x[T], y[T])


def _build(framework):
  """(params, apply(params, x)) for a Flax model, the way users write it."""
  if framework == "nnx":
    model = _NnxMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply(params, x):
      return nnx.merge(graphdef, params)(x)

    return params, apply
  model = _LinenMLP()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
  return params, model.apply


class FlaxRecipeTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.product(framework=("nnx", "linen"), mode=("mixflow", "standard"))
  def test_per_parameter_learning_rates(self, framework, mode):
    import mixflow_optax as mfo

    params, apply = _build(framework)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    inner, outer = _data()

    def loss(p, meta, batch):
      x, y = batch
      return jnp.mean((apply(p, x) - y) ** 2)

    # Per-parameter (per-tensor) log learning rates: a pytree like params.
    meta = jax.tree.map(lambda p: jnp.log(0.05) * jnp.ones(()), params)
    mo = mfo.meta_optimizer(
      loss,
      loss,
      mfo.transforms.adam(0.05),
      optax.sgd(1.0),
      hyperparams_fn=lambda m: {"learning_rate": jax.tree.map(jnp.exp, m)},
      mode=mode,
    )
    new_state, metrics = jax.jit(mo.step)(mo.init(meta, params), inner, outer)
    got = jax.tree.map(lambda a, b: a - b, meta, new_state.meta_params)

    def plain(m):
      opt = optax.adam(1.0)
      p, s = params, opt.init(params)
      for t in range(3):
        g = jax.grad(loss)(p, None, jax.tree.map(lambda x, t=t: x[t], inner))
        u, s = opt.update(g, s, p)
        u = jax.tree.map(lambda uu, lr: jnp.exp(lr) * uu, u, m)
        p = optax.apply_updates(p, u)
      return loss(p, None, outer)

    want = jax.jit(jax.grad(plain))(meta)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_equal_structs(new_state.params, params)


if __name__ == "__main__":
  absltest.main()
