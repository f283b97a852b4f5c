"""Flax recipes: NNX (split/merge) and Linen models inside mfo.meta_optimizer."""

import chex
import flax.linen as nn
import helpers
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


class _NnxBNMLP(nnx.Module):
  """An MLP with BatchNorm: non-parameter state (nnx.BatchStat) updated in training."""

  def __init__(self, rngs: nnx.Rngs):
    # No bias before BatchNorm (it would be cancelled; its gradient is round-off).
    self.l1 = nnx.Linear(1, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.8, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.bn(self.l1(x))))


class _LinenBNMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Dense(16, use_bias=False)(x))
    return nn.Dense(1)(jnp.tanh(h))


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


def _build_bn(framework):
  """(params, stats, train(params, stats, x) -> (y, stats), evaluate(params, stats, x))."""
  if framework == "nnx":
    model = _NnxBNMLP(nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def train(params, stats, x):
      # copy=True: a functional step; BatchNorm updates its own copy of the stats.
      model = nnx.merge(graphdef, params, stats, copy=True)  # training mode
      y = model(x)
      return y, nnx.state(model, nnx.BatchStat)  # the updated running statistics

    def evaluate(params, stats, x):
      model = nnx.merge(graphdef, params, stats, copy=True)
      model.eval()  # running statistics
      return model(x)

    return params, stats, train, evaluate
  model = _LinenBNMLP()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 1)), train=False)

  def train(params, stats, x):
    y, updates = model.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return y, updates["batch_stats"]

  def evaluate(params, stats, x):
    return model.apply({"params": params, "batch_stats": stats}, x, train=False)

  return variables["params"], variables["batch_stats"], train, evaluate


def _bn_losses(train, evaluate):
  """Inner loss in training mode (returns the new statistics), outer loss in evaluation mode."""

  def inner_loss(p, meta, batch, stats):
    x, y = batch
    pred, stats = train(p, stats, x)
    return jnp.mean((pred - y) ** 2), stats

  def outer_loss(p, meta, batch, stats):
    x, y = batch
    return jnp.mean((evaluate(p, stats, x) - y) ** 2)

  return inner_loss, outer_loss


class FlaxRecipeTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *helpers.named_product(framework=("nnx", "linen"), mode=("mixflow", "standard"))
  )
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

  @parameterized.named_parameters(
    *helpers.named_product(framework=("nnx", "linen"), mode=("mixflow", "standard"))
  )
  def test_batchnorm_statistics_are_carried_and_differentiated(self, framework, mode):
    """BatchNorm: running statistics carried through the unroll; meta-gradient exact."""
    import mixflow_optax as mfo

    params, stats, train, evaluate = _build_bn(framework)
    params, stats = jax.tree.map(lambda p: p.astype(jnp.float64), (params, stats))
    inner, outer = _data()

    inner_loss, outer_loss = _bn_losses(train, evaluate)

    meta = jnp.log(0.05)
    mo = mfo.meta_optimizer(
      inner_loss,
      outer_loss,
      mfo.transforms.adam(0.05),
      optax.sgd(1.0),
      hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)},
      mode=mode,
      has_model_state=True,
    )
    new_state, metrics = jax.jit(mo.step)(mo.init(meta, params, stats), inner, outer)
    got = meta - new_state.meta_params

    def plain(m):
      opt = optax.adam(jnp.exp(m))
      p, s, st = params, opt.init(params), stats
      for t in range(3):
        batch = jax.tree.map(lambda x, t=t: x[t], inner)
        g, st = jax.grad(inner_loss, has_aux=True)(p, None, batch, st)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
      return outer_loss(p, None, outer, st), (p, st)

    (want_loss, (want_p, want_stats)), want = jax.jit(jax.value_and_grad(plain, has_aux=True))(meta)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(metrics["outer_loss"], want_loss, rtol=1e-10)
    # The statistics moved (the test would not notice a frozen state otherwise)
    # and are carried into the next step exactly like plain training does.
    chex.assert_trees_all_close(new_state.model_state, want_stats, rtol=1e-10)
    chex.assert_trees_all_close(new_state.params, want_p, rtol=1e-10)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), stats, new_state.model_state)
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)
    # Evaluation uses the carried statistics: with the initial ones the outer
    # loss would differ. (Flax stops gradients through its running-statistics
    # update, so they carry values, not derivatives; a model state that is a
    # differentiable function of params is differentiated exactly: test_unroll.)
    self.assertGreater(abs(float(outer_loss(want_p, None, outer, stats) - want_loss)), 1e-6)


class FlaxConvergenceTest(helpers.TestCase):
  """Smoke tests in float32, the way the recipes run in practice."""

  def test_batchnorm_learning_rate_converges(self):
    """Smoke: online learning-rate learning on an NNX BatchNorm model improves the loss."""
    import mixflow_optax as mfo

    params, stats, train, evaluate = _build_bn("nnx")

    inner_loss, outer_loss = _bn_losses(train, evaluate)

    mo = mfo.meta_optimizer(
      inner_loss,
      outer_loss,
      mfo.transforms.sgd(0.01),
      optax.adam(0.05),
      hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)},
      has_model_state=True,
    )
    state = mo.init(jnp.log(0.002), params, stats)

    def body(state, key):
      inner, outer = _data(T=4, n=32, seed=key)
      return mo.step(state, inner, outer)

    seeds = jnp.arange(200)
    final, metrics = jax.jit(lambda s: jax.lax.scan(body, s, seeds))(state)
    losses = metrics["outer_loss"]
    self.assertTrue(bool(jnp.all(jnp.isfinite(losses))))
    self.assertLess(float(jnp.mean(losses[-20:])), 0.5 * float(jnp.mean(losses[:20])))
    self.assertGreater(float(final.meta_params), float(jnp.log(0.004)))  # learned: 2x larger


if __name__ == "__main__":
  absltest.main()
