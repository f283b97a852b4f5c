"""Per-step hyperparameters (learned schedules) and prefix-tree (per-module) hyperparameters."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

T = 4
KNOTS = jnp.asarray([0.0, 3.0, 7.0])


def _schedule(meta, step):
  """A learned piecewise-linear log learning rate over the inner steps."""
  return {"learning_rate": jnp.exp(jnp.interp(step, KNOTS, meta["log_lr_knots"]))}


def _meta():
  return {"log_lr_knots": jnp.log(jnp.asarray([0.05, 0.1, 0.02]))}


def _inner_loss(params, meta, batch):
  del meta
  return helpers.outer_loss(params, batch)


def _stock_direction(name):
  # The optimizer at learning rate 1, whose update the schedule rescales per step (stock optax).
  return {"sgd": optax.sgd(1.0), "adam": optax.adam(1.0)}[name]


def _mfo_opt(name):
  return {"sgd": mfo.transforms.sgd(0.1), "adam": mfo.transforms.adam(0.1)}[name]


def _bptt_meta_loss(name, offset=0):
  """Plain BPTT: jax.grad inside a lax.scan of stock optax steps scaled by the schedule."""
  opt = _stock_direction(name)

  def meta_loss(meta, params0, batches, outer):
    def step(carry, xs):
      params, state = carry
      t, batch = xs
      grads = jax.grad(_inner_loss)(params, meta, batch)
      updates, state = opt.update(grads, state, params)
      lr = _schedule(meta, offset + t)["learning_rate"]
      updates = jax.tree.map(lambda u: lr * u, updates)
      return (optax.apply_updates(params, updates), state), None

    steps = jnp.arange(T, dtype=jnp.int32)
    (params, _), _ = jax.lax.scan(step, (params0, opt.init(params0)), (steps, batches))
    return helpers.outer_loss(params, outer)

  return meta_loss


def _unroll_meta_loss(name, mode, offset=0):
  opt = _mfo_opt(name)
  run = mfo.unroll(_inner_loss, opt, hyperparams_fn=_schedule, hyperparams_per_step=True, mode=mode)

  def meta_loss(meta, params0, batches, outer):
    params, _ = run(meta, params0, opt.init(params0), batches, step_offset=offset)
    return helpers.outer_loss(params, outer)

  return meta_loss


class PerStepHyperparamsTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *helpers.named_product(opt=("sgd", "adam"), mode=("mixflow", "standard"))
  )
  def test_equals_plain_bptt(self, opt, mode):
    params, batches, outer = helpers.exactness_problem(T)
    got = jax.jit(jax.value_and_grad(_unroll_meta_loss(opt, mode, offset=2)))(
      _meta(), params, batches, outer
    )
    want = jax.jit(jax.value_and_grad(_bptt_meta_loss(opt, offset=2)))(
      _meta(), params, batches, outer
    )
    chex.assert_trees_all_close(got, want, **helpers.TIGHT)
    # Every knot is reached (t + 2 in [2, 6) covers both segments): no zero gradient.
    self.assertTrue(np.all(np.abs(got[1]["log_lr_knots"][:2]) > 0))

  def test_equals_finite_differences(self):
    params, batches, outer = helpers.exactness_problem(T)
    f = jax.jit(_unroll_meta_loss("adam", "mixflow"))
    knots = _meta()["log_lr_knots"]
    grads = jax.grad(f)(_meta(), params, batches, outer)["log_lr_knots"]
    direction = jnp.asarray([1.0, -0.5, 0.25])
    fd = helpers.central_fd(
      lambda h: f({"log_lr_knots": knots + h * direction}, params, batches, outer), 0.0, 1e-5
    )
    np.testing.assert_allclose(grads @ direction, fd, rtol=1e-6)

  def test_schedule_sees_the_step_index(self):
    seen = []

    def hyperparams_fn(meta, step):
      seen.append(step)
      return {"learning_rate": 0.1 * (step + 1).astype(jnp.float64)}

    run = mfo.unroll(
      lambda w, m, x: jnp.sum(w * x),
      mfo.transforms.sgd(0.1),
      hyperparams_fn=hyperparams_fn,
      hyperparams_per_step=True,
    )
    opt_state = mfo.transforms.sgd(0.1).init(jnp.zeros(()))
    w, _ = run(None, jnp.zeros(()), opt_state, jnp.ones(3), step_offset=jnp.asarray(5, jnp.int32))
    # Gradient 1 at every step, learning rates 0.6, 0.7, 0.8.
    np.testing.assert_allclose(w, -(0.6 + 0.7 + 0.8), rtol=1e-12)
    self.assertEqual(seen[0].dtype, jnp.int32)

  def _meta_optimizer(self, mode, **kwargs):
    return mfo.meta_optimizer(
      _inner_loss,
      lambda p, m, b: helpers.outer_loss(p, b),
      _mfo_opt("adam"),
      optax.sgd(1.0),
      hyperparams_fn=_schedule,
      hyperparams_per_step=True,
      mode=mode,
      **kwargs,
    )

  def test_forward_mode_equals_reverse(self):
    params, batches, outer = helpers.exactness_problem(T)
    states = {}
    for mode in ("mixflow", "forward"):
      mo = self._meta_optimizer(mode, reset_inner=True)
      states[mode], metrics = jax.jit(mo.step)(mo.init(_meta(), params), batches, outer)
    chex.assert_trees_all_close(
      states["forward"].meta_params, states["mixflow"].meta_params, **helpers.TIGHT
    )
    self.assertEqual(metrics["hyperparams"]["learning_rate"].shape, (T,))

  @parameterized.named_parameters(("mixflow", "mixflow"), ("forward", "forward"))
  def test_online_runs_continue_the_schedule(self, mode):
    # Online, meta-step k runs inner steps k*T .. k*T + T - 1: the second meta-gradient is that
    # of plain BPTT with the schedule offset by T, from the first step's inner state.
    params, batches, outer = helpers.exactness_problem(T)
    mo = self._meta_optimizer(mode)
    step = jax.jit(mo.step)
    state, _ = step(mo.init(_meta(), params), batches, outer)
    new_state, metrics = step(state, batches, outer)
    want = jax.grad(_bptt_meta_loss_from_state(state))(state.meta_params, batches, outer)
    got = jax.tree.map(jnp.subtract, state.meta_params, new_state.meta_params)  # sgd(1.0)
    chex.assert_trees_all_close(got, want, **helpers.TIGHT)
    want_lr = _schedule(state.meta_params, T + jnp.arange(T))["learning_rate"]
    np.testing.assert_allclose(metrics["hyperparams"]["learning_rate"], want_lr, rtol=1e-14)


def _bptt_meta_loss_from_state(state):
  """Plain BPTT from a meta-state's carried params and Adam state, schedule offset by T."""
  opt = optax.adam(1.0)

  def meta_loss(meta, batches, outer):
    def step(carry, xs):
      params, adam_state = carry
      t, batch = xs
      grads = jax.grad(_inner_loss)(params, meta, batch)
      updates, adam_state = opt.update(grads, adam_state, params)
      lr = _schedule(meta, T + t)["learning_rate"]
      return (
        optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates)),
        adam_state,
      ), None

    init = state.inner_state  # the same (ScaleByAdamState, EmptyState) as optax.adam's
    (params, _), _ = jax.lax.scan(
      step, (state.params, init), (jnp.arange(T, dtype=jnp.int32), batches)
    )
    return helpers.outer_loss(params, outer)

  return meta_loss


class PrefixHyperparamsTest(helpers.F64TestCase):
  def _params(self):
    return {
      "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
      "Dense_1": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)},
    }

  @parameterized.named_parameters(
    ("sgd", mfo.transforms.sgd(0.1, momentum=0.9)),
    ("adamw", mfo.transforms.adamw(0.1, weight_decay=0.1)),
    ("muon", mfo.transforms.muon(0.1)),  # hyperparameters routed through optax.partition
  )
  def test_prefix_equals_full_tree(self, opt):
    params = self._params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    prefix = {"Dense_0": jnp.asarray(0.1), "Dense_1": jnp.asarray(0.01)}
    full = {k: jax.tree.map(lambda _, v=v: v, params[k]) for k, v in prefix.items()}
    state = opt.init(params)
    got = opt.update(grads, state, params, hyperparams={"learning_rate": prefix})
    want = opt.update(grads, state, params, hyperparams={"learning_rate": full})
    chex.assert_trees_all_close(got, want, **helpers.TIGHT)

  def test_nnx_state_with_a_dict_prefix(self):
    from flax import nnx

    class Model(nnx.Module):
      def __init__(self):
        self.Dense_0 = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        self.Dense_1 = nnx.Linear(3, 1, rngs=nnx.Rngs(1))

    _, params = nnx.split(Model(), nnx.Param)
    opt = mfo.transforms.adam(0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(
      grads,
      opt.init(params),
      params,
      hyperparams={"learning_rate": {"Dense_0": 0.1, "Dense_1": 0.01}},
    )
    flat = {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(updates)}
    # Adam's first update is -lr * sign(g).
    np.testing.assert_allclose(flat["Dense_0/kernel"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(flat["Dense_1/bias"], -0.01, rtol=1e-6)

  def test_meta_gradient_through_a_prefix(self):
    # d/d(lr0) with one rate per module equals the sum of the per-tensor derivatives.
    params = self._params()
    x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
    batches = jnp.stack([x, 2 * x])

    def loss(p, meta, x):
      h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None, :])
      return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None, :] - 1.0) ** 2)

    opt = mfo.transforms.sgd(0.1)

    def meta_loss(lrs):
      run = mfo.unroll(loss, opt, hyperparams_fn=lambda m: {"learning_rate": m})
      p, _ = run(lrs, params, opt.init(params), batches)
      return loss(p, None, x)

    prefix = {"Dense_0": jnp.asarray(0.1), "Dense_1": jnp.asarray(0.2)}
    full = {k: jax.tree.map(lambda _, v=v: v, params[k]) for k, v in prefix.items()}
    g_prefix, g_full = jax.jit(lambda a, b: (jax.grad(meta_loss)(a), jax.grad(meta_loss)(b)))(
      prefix, full
    )
    for k in prefix:
      np.testing.assert_allclose(g_prefix[k], sum(jax.tree.leaves(g_full[k])), rtol=1e-12)

  def test_a_tree_that_is_not_a_prefix_is_a_clear_error(self):
    params = self._params()
    opt = mfo.transforms.sgd(0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    with self.assertRaisesRegex(ValueError, r"value at \['Dense_2'\].*top-level paths"):
      opt.update(
        grads,
        opt.init(params),
        params,
        hyperparams={"learning_rate": {"Dense_0": 0.1, "Dense_1": 0.1, "Dense_2": 0.1}},
      )
    with self.assertRaisesRegex(ValueError, r"parameter \['Dense_1'\]\['bias'\] has no value"):
      opt.update(grads, opt.init(params), params, hyperparams={"learning_rate": {"Dense_0": 0.1}})


if __name__ == "__main__":
  absltest.main()
