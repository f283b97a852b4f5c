"""Carried model state (has_model_state) and the opt-in non-finite check (check_finite)."""

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized
from jax.experimental import checkify

import mixflow_optax as mfo

# A model with a *differentiable* state: a running (EMA) estimate of the
# feature scale, used to normalise the features and updated by every forward
# pass without stop_gradient. The meta-gradient flows through it.


def _features(params, x, scale):
  return jnp.tanh(x @ params["w"]) / jnp.sqrt(scale[None, :] + 0.1)


def _stateful_loss(params, meta, batch, state):
  x, y = batch
  h = jnp.tanh(x @ params["w"])
  scale = 0.7 * state["scale"] + 0.3 * jnp.mean(h**2, axis=0)
  pred = _features(params, x, scale) @ params["v"]
  weights = jax.nn.sigmoid(meta["logits"])
  return jnp.mean(weights * (pred - y) ** 2), {"scale": scale}


def _outer(params, meta, batch, state):
  x, y = batch
  return jnp.mean((_features(params, x, state["scale"]) @ params["v"] - y) ** 2)


def _problem(T=4):
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {"w": jax.random.normal(k[0], (2, 3)), "v": jax.random.normal(k[1], (3,))}
  inner = (jax.random.normal(k[2], (T, 5, 2)), jax.random.normal(k[3], (T, 5)))
  outer = (jax.random.normal(k[4], (5, 2)), jax.random.normal(k[5], (5,)))
  meta = {"logits": jnp.linspace(-1.0, 1.0, 5), "log_lr": jnp.log(0.05)}
  state = {"scale": jnp.ones((3,))}
  return params, meta, state, inner, outer


def _hp(meta):
  return {"learning_rate": jnp.exp(meta["log_lr"])}


def _plain_meta_loss(meta, params, state, inner, outer, opt_state=None):
  """Plain BPTT: a Python loop of stock optax Adam steps, jax.grad inside."""
  opt = optax.adam(jnp.exp(meta["log_lr"]))
  p, s = params, (opt.init(params) if opt_state is None else opt_state)
  for t in range(jax.tree.leaves(inner)[0].shape[0]):
    batch = jax.tree.map(lambda x, t=t: x[t], inner)
    g, state = jax.grad(_stateful_loss, has_aux=True)(p, meta, batch, state)
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
  return _outer(p, meta, outer, state)


class ModelStateTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *helpers.named_grid(
      mode={"mixflow": "mixflow", "standard": "standard"},
      remat={"remat": True, "no_remat": False},
    )
  )
  def test_unroll_meta_gradient_through_state_equals_plain_bptt(self, mode, remat):
    params, meta, state, inner, outer = _problem()
    opt = mfo.transforms.adam(0.05)
    run = mfo.unroll(
      _stateful_loss, opt, hyperparams_fn=_hp, mode=mode, remat=remat, has_model_state=True
    )

    def meta_loss(meta, params, state):
      p, _, st = run(meta, params, opt.init(params), inner, state)
      return _outer(p, meta, outer, st)

    got = jax.jit(jax.grad(meta_loss, argnums=(0, 1, 2)))(meta, params, state)
    want = jax.jit(jax.grad(_plain_meta_loss, argnums=(0, 1, 2)))(meta, params, state, inner, outer)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-13)

  def test_state_derivative_is_not_negligible(self):
    """Guards the test above: dropping the state's derivative changes the meta-gradient."""
    params, meta, state, inner, outer = _problem()

    def frozen_loss(meta, batch, state, p):
      return _stateful_loss(p, meta, batch, jax.lax.stop_gradient(state))

    opt = mfo.transforms.adam(0.05)
    run_frozen = mfo.unroll(
      lambda p, m, b, st: frozen_loss(m, b, st, p), opt, hyperparams_fn=_hp, has_model_state=True
    )

    def meta_loss(meta):
      p, _, st = run_frozen(meta, params, opt.init(params), inner, state)
      return _outer(p, meta, outer, jax.lax.stop_gradient(st))

    got = jax.grad(meta_loss)(meta)["log_lr"]
    want = jax.grad(_plain_meta_loss)(meta, params, state, inner, outer)["log_lr"]
    self.assertGreater(abs(float(got - want)), 1e-6 * abs(float(want)))

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_meta_optimizer_carries_state_online(self, mode):
    params, meta, state, inner, outer = _problem()
    mo = mfo.meta_optimizer(
      _stateful_loss,
      _outer,
      mfo.transforms.adam(0.05),
      optax.sgd(1.0),
      hyperparams_fn=_hp,
      mode=mode,
      has_model_state=True,
    )
    s0 = mo.init(meta, params, state)
    s1, metrics = jax.jit(mo.step)(s0, inner, outer)
    want = jax.grad(_plain_meta_loss)(meta, params, state, inner, outer)
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, b: a - b, meta, s1.meta_params), want, rtol=1e-10, atol=1e-13
    )
    # Online: the next step starts from the carried params, Adam moments and
    # model state, as plain training would.
    s2, _ = jax.jit(mo.step)(s1, inner, outer)
    want2 = jax.grad(_plain_meta_loss)(
      s1.meta_params, s1.params, s1.model_state, inner, outer, s1.inner_state
    )
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, b: a - b, s1.meta_params, s2.meta_params),
      want2,
      rtol=1e-10,
      atol=1e-13,
    )
    self.assertGreater(float(jnp.max(jnp.abs(s1.model_state["scale"] - 1.0))), 1e-3)

  def test_reset_restores_state(self):
    params, meta, state, inner, outer = _problem()
    mo = mfo.meta_optimizer(
      _stateful_loss,
      _outer,
      mfo.transforms.sgd(0.05),
      optax.sgd(0.1),
      has_model_state=True,
      reset_inner=True,
    )
    s1, _ = mo.step(mo.init(meta, params, state), inner, outer)
    chex.assert_trees_all_equal(s1.model_state, state)
    chex.assert_trees_all_equal(s1.params, params)


class ModelStateBadInputTest(helpers.TestCase):
  def test_missing_model_state(self):
    params, meta, state, inner, _ = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(_stateful_loss, opt, has_model_state=True)
    with self.assertRaisesRegex(TypeError, "with the initial model state"):
      run(meta, params, opt.init(params), inner)

  def test_model_state_without_flag(self):
    params, meta, state, inner, _ = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(lambda p, m, b: _stateful_loss(p, m, b, state)[0], opt)
    with self.assertRaisesRegex(TypeError, "has_model_state=True"):
      run(meta, params, opt.init(params), inner, state)

  def test_state_changing_structure(self):
    params, meta, state, inner, _ = _problem()
    opt = mfo.transforms.sgd(0.1)

    def bad(p, m, b, st):
      loss, new = _stateful_loss(p, m, b, st)
      return loss, {"scale": new["scale"], "extra": jnp.zeros(())}

    run = mfo.unroll(bad, opt, has_model_state=True)
    with self.assertRaisesRegex(TypeError, "same tree structure"):
      run(meta, params, opt.init(params), inner, state)

  def test_meta_optimizer_init_needs_state(self):
    params, meta, state, _, _ = _problem()
    mo = mfo.meta_optimizer(
      _stateful_loss, _outer, mfo.transforms.sgd(0.1), optax.sgd(0.1), has_model_state=True
    )
    with self.assertRaisesRegex(TypeError, "model_state"):
      mo.init(meta, params)
    plain = mfo.meta_optimizer(
      lambda p, m, b: 0.0, lambda p, m, b: 0.0, mfo.transforms.sgd(0.1), optax.sgd(0.1)
    )
    with self.assertRaisesRegex(TypeError, "has_model_state=True"):
      plain.init(meta, params, state)


# check_finite: the opt-in NaN check names the step and the term.


def _zero_feature_problem():
  """The zero-gradient trap: a feature that is zero in every inner batch."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(k[0], (4, 6, 3)).at[..., 2].set(0.0)
  y = jax.random.normal(k[1], (4, 6))
  w0 = jnp.zeros((3,))
  outer = (jax.random.normal(k[2], (6, 3)), jnp.ones((6,)))
  return w0, (x, y), outer


def _lin_loss(w, meta, batch):
  x, y = batch
  return jnp.mean((x @ (w * meta["scale"]) - y) ** 2)


def _lin_meta():
  return {"scale": jnp.ones((3,)), "log_lr": jnp.log(0.1)}


class CheckFiniteTest(helpers.F64TestCase):
  def _mo(self, inner_opt, inner_loss=_lin_loss, outer_loss=_lin_loss, **kw):
    return mfo.meta_optimizer(
      inner_loss, outer_loss, inner_opt, optax.sgd(0.1), check_finite=True, **kw
    )

  def test_stock_adam_zero_gradient_names_step_and_term(self):
    w0, inner, outer = _zero_feature_problem()
    # Stock optax: d sqrt(v)/dv is infinite at v = 0. The last step's update is
    # met first by the backward pass, so that is the step reported.
    mo = self._mo(optax.adam(0.1))
    with self.assertRaisesRegex(
      checkify.JaxRuntimeError, r"inner step 3: the cotangent of the inner gradient g_t"
    ):
      mo.step(mo.init(_lin_meta(), w0), inner, outer)
    # The same without the check: a silent NaN meta-gradient.
    plain = mfo.meta_optimizer(_lin_loss, _lin_loss, optax.adam(0.1), optax.sgd(0.1))
    state, metrics = jax.jit(plain.step)(plain.init(_lin_meta(), w0), inner, outer)
    self.assertTrue(bool(jnp.isnan(metrics["meta_grad_norm"])))

  def test_finite_run_is_unchanged(self):
    w0, inner, outer = _zero_feature_problem()
    hp = lambda m: {"learning_rate": jnp.exp(m["log_lr"])}
    checked = self._mo(mfo.transforms.adam(0.1), hyperparams_fn=hp)
    plain = mfo.meta_optimizer(
      _lin_loss, _lin_loss, mfo.transforms.adam(0.1), optax.sgd(0.1), hyperparams_fn=hp
    )
    s_checked, m_checked = checked.step(checked.init(_lin_meta(), w0), inner, outer)
    s_plain, m_plain = jax.jit(plain.step)(plain.init(_lin_meta(), w0), inner, outer)
    chex.assert_trees_all_close(s_checked, s_plain, rtol=1e-13)
    chex.assert_trees_all_close(m_checked, m_plain, rtol=1e-13)
    self.assertTrue(bool(jnp.isfinite(m_checked["meta_grad_norm"])))

  @parameterized.named_parameters(("every_step_stored", None), ("checkpoint_every_three", 3))
  def test_non_finite_inner_loss_names_the_step(self, checkpoint_every):
    w0, (x, y), outer = _zero_feature_problem()
    y = y.at[2, 0].set(jnp.nan)  # a corrupted label in the third inner batch
    mo = self._mo(mfo.transforms.sgd(0.1), checkpoint_every=checkpoint_every)
    with self.assertRaisesRegex(checkify.JaxRuntimeError, r"inner step 2: the inner loss"):
      mo.step(mo.init(_lin_meta(), w0), (x, y), outer)

  def test_non_finite_outer_loss(self):
    w0, inner, (x, y) = _zero_feature_problem()
    mo = self._mo(mfo.transforms.sgd(0.1))
    with self.assertRaisesRegex(checkify.JaxRuntimeError, "the outer loss is non-finite"):
      mo.step(mo.init(_lin_meta(), w0), inner, (x, y.at[0].set(jnp.inf)))

  def test_hyperparams_fn_names_the_meta_parameter_leaf(self):
    w0, inner, outer = _zero_feature_problem()
    # sqrt at 0: a finite forward value with an infinite derivative.
    mo = self._mo(
      mfo.transforms.sgd(0.1),
      hyperparams_fn=lambda m: {"learning_rate": 0.1 + jnp.sqrt(m["lr_extra"])},
    )
    meta = {"scale": jnp.ones((3,)), "lr_extra": jnp.zeros(())}
    with self.assertRaisesRegex(checkify.JaxRuntimeError, r"meta_params leaf \['lr_extra'\]"):
      mo.step(mo.init(meta, w0), inner, outer)

  def test_second_order_term_names_the_carry(self):
    w0, inner, outer = _zero_feature_problem()

    def loss(w, meta, batch):  # |w|^1.5: finite gradient, infinite curvature at w = 0
      return _lin_loss(w, meta, batch) + jnp.sum(jnp.abs(w[2]) ** 1.5)

    mo = self._mo(mfo.transforms.sgd(0.1), inner_loss=loss)
    with self.assertRaisesRegex(
      checkify.JaxRuntimeError, r"inner step 3: the cotangent of the step's input carry"
    ):
      mo.step(mo.init(_lin_meta(), w0), inner, outer)

  def test_under_jit_with_checkify(self):
    w0, inner, outer = _zero_feature_problem()
    mo = self._mo(optax.adam(0.1))
    err, _ = jax.jit(checkify.checkify(mo.step))(mo.init(_lin_meta(), w0), inner, outer)
    with self.assertRaisesRegex(checkify.JaxRuntimeError, "inner step 3"):
      err.throw()

  def test_batched_tasks(self):
    w0, (x, y), outer = _zero_feature_problem()
    tasks = jax.tree.map(lambda a: jnp.stack([a, a]), ((x, y), outer))
    tasks = (tasks[0], (tasks[1][0], tasks[1][1].at[1, 0].set(jnp.nan)))
    mo = self._mo(mfo.transforms.sgd(0.1), reset_inner=True, batched_tasks=True)
    with self.assertRaisesRegex(checkify.JaxRuntimeError, "the outer loss is non-finite"):
      mo.step(mo.init(_lin_meta(), w0), *tasks)


if __name__ == "__main__":
  absltest.main()
