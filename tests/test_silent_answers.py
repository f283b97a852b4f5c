"""No silent wrong answers: each case ends in a correct result or an error that names the fix."""

import functools
import re
import warnings

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo
from mixflow_optax import _check_grad
from mixflow_optax._checks import hyperparams_without_effect

R = mfo.transforms.reparameterize
# NumPy, so that each test gets its own default float dtype (float64 in F64TestCase).
_XS = np.linspace(0.5, 1.5, 24).reshape(6, 4)
_W0 = np.array([0.3, -0.2, 0.5, 0.1])


def _loss(w, meta, x):
  return jnp.mean((x * w - 1.0) ** 2 + 0.1 * jnp.sin(w * x) ** 2)


def _loss_ignoring_last(w, meta, x):
  # The last feature is 0: w[3]'s gradient is exactly 0 at every step.
  return _loss(w, meta, x * jnp.array([1.0, 1.0, 1.0, 0.0]))


def _lr(meta):
  return {"learning_rate": jnp.exp(meta)}


def _meta_loss(opt, inner=_loss, steps=6, mode="standard", hyperparams_fn=_lr):
  run = mfo.unroll(inner, opt, hyperparams_fn=hyperparams_fn, mode=mode)
  return lambda m: _loss(run(m, _W0, opt.init(_W0), _XS[:steps])[0], None, _XS[0])


def _central_difference(f, x, h=1e-5):
  return (f(x + h) - f(x - h)) / (2 * h)


class CheckMetaGradientNonFiniteTest(helpers.F64TestCase):
  """A NaN or inf meta-gradient can never pass the check."""

  def _check(self, opt, inner=_loss_ignoring_last, **kw):
    return mfo.check_meta_gradient(
      inner, _loss, opt, jnp.log(0.05), _W0, _XS[:3], _XS[0], hyperparams_fn=_lr, **kw
    )

  def test_nan_in_both_modes_fails_and_names_the_stock_optimizer(self):
    opt = R(optax.adam)(0.05)  # sqrt(0) of the never-updated entry: NaN in both modes
    result = self._check(opt, on_mismatch="ignore")
    self.assertFalse(result.ok)
    self.assertTrue(np.isnan(result.max_abs_diff))
    self.assertTrue(np.isnan(result.mixflow["meta_params"]))
    self.assertEqual(result.worst_leaf, "meta_params")
    with self.assertRaisesRegex(
      mfo.MetaGradientMismatchError,
      r"NaN/inf with mode='mixflow' and mode='standard'.*stock optax\.adam.*"
      r"finite differences.*check_finite=True",
    ):
      self._check(opt)

  def test_hand_written_version_passes_there(self):
    self.assertTrue(self._check(mfo.transforms.adam(0.05), rtol=1e-10, atol=1e-12).ok)

  def test_nan_in_mixflow_only_points_at_the_rule(self):
    mixflow = {"meta_params": jnp.asarray(np.nan), "params": jnp.ones(2)}
    standard = {"meta_params": jnp.asarray(1.0), "params": jnp.ones(2)}
    cmp = _check_grad._compare(mixflow, standard, 1e-4, 1e-6)
    self.assertFalse(cmp.ok)
    self.assertEqual(cmp.non_finite, ("meta_params", False, True))
    message = _check_grad._non_finite_message(*cmp.non_finite, mfo.transforms.sgd(0.1))
    self.assertIn("finite with mode='standard'", message)

  @parameterized.parameters(np.inf, -np.inf, np.nan)
  def test_non_finite_in_both_never_ok(self, bad):
    tree = {"meta_params": jnp.asarray([1.0, bad]), "params": jnp.ones(2)}
    cmp = _check_grad._compare(tree, tree, 1e-4, 1e-6)
    self.assertFalse(cmp.ok)
    self.assertTrue(np.isnan(cmp.max_rel))

  def test_warn_mode_warns_with_the_non_finite_message(self):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      result = self._check(R(optax.adam)(0.05), on_mismatch="warn")
    self.assertFalse(result.ok)
    self.assertTrue(any("cannot pass" in str(c.message) for c in caught))


class CheckMetaGradientFiguresTest(helpers.TestCase):
  def test_elements_within_atol_do_not_make_max_rel_diff_large(self):
    # 1e-9 against 1e-8 differs by 90% but is within atol: it must not be reported as 0.9.
    mixflow = {"meta_params": jnp.asarray([1e-9, 1.0]), "params": jnp.zeros(1)}
    standard = {"meta_params": jnp.asarray([1e-8, 1.0]), "params": jnp.zeros(1)}
    cmp = _check_grad._compare(mixflow, standard, 1e-4, 1e-6)
    self.assertTrue(cmp.ok)
    self.assertEqual(cmp.max_rel, 0.0)

  # 1 + 1.005e-4: relative difference 1.005e-4 > rtol, but within atol + rtol |b|.
  @parameterized.parameters((1.0 + 5e-5, True), (1.0 + 5e-4, False), (1.0 + 1.005e-4, True))
  def test_ok_exactly_when_max_rel_diff_within_rtol(self, value, ok):
    mixflow = {"meta_params": np.asarray([value]), "params": np.zeros(1)}
    standard = {"meta_params": np.asarray([1.0]), "params": np.zeros(1)}
    cmp = _check_grad._compare(mixflow, standard, 1e-4, 1e-6)
    self.assertEqual(cmp.ok, ok)
    self.assertEqual(cmp.max_rel <= 1e-4, ok)

  def test_zero_standard_past_atol_is_infinite_relative(self):
    cmp = _check_grad._compare({"m": jnp.ones(1)}, {"m": jnp.zeros(1)}, 1e-4, 1e-6)
    self.assertFalse(cmp.ok)
    self.assertEqual(cmp.max_rel, np.inf)

  @parameterized.named_parameters(
    ("negative_rtol", {"rtol": -1e-4}, ValueError),
    ("nan_atol", {"atol": float("nan")}, ValueError),
    ("inf_rtol", {"rtol": float("inf")}, ValueError),
    ("string_rtol", {"rtol": "1e-4"}, TypeError),
    ("bool_atol", {"atol": True}, TypeError),
  )
  def test_tolerances_must_be_non_negative_numbers(self, kw, error):
    with self.assertRaisesRegex(error, "non-negative"):
      mfo.check_meta_gradient(_loss, _loss, mfo.transforms.sgd(0.1), 0.1, _W0, _XS, _XS[0], **kw)

  def test_non_array_leaves_named_before_tracing(self):
    check = functools.partial(
      mfo.check_meta_gradient, _loss, _loss, mfo.transforms.sgd(0.1), inner_batches=_XS
    )
    with self.assertRaisesRegex(TypeError, r"params leaf \['name'\] is a str"):
      check(0.1, {"name": "layer0", "w": _W0}, outer_batch=_XS[0])
    with self.assertRaisesRegex(TypeError, r"meta_params leaf \['tag'\] is a str"):
      check({"tag": "x"}, _W0, outer_batch=_XS[0])
    with self.assertRaisesRegex(TypeError, r"meta_params leaf <root> has dtype int"):
      check(1, _W0, outer_batch=_XS[0])


class RadamTest(helpers.F64TestCase):
  """optax.radam's discarded rectification branch is NaN at steps 3-4; reparameterize's is not."""

  @parameterized.parameters(False, True)
  def test_same_trajectory_and_state_as_optax(self, nesterov):
    ours, stock = R(optax.radam)(0.05, nesterov=nesterov), optax.radam(0.05, nesterov=nesterov)
    w_a, s_a, w_b, s_b = _W0, ours.init(_W0), _W0, stock.init(_W0)
    for x in np.concatenate([_XS, _XS]):  # 12 steps: before and after the threshold
      u, s_a = ours.update(jax.grad(_loss)(w_a, None, x), s_a, w_a)
      w_a = optax.apply_updates(w_a, u)
      u, s_b = stock.update(jax.grad(_loss)(w_b, None, x), s_b, w_b)
      w_b = optax.apply_updates(w_b, u)
    chex.assert_trees_all_close((w_a, s_a), (w_b, s_b), rtol=1e-13, atol=1e-15)
    self.assertEqual(jax.tree.structure(s_a), jax.tree.structure(s_b))

  @parameterized.parameters(
    {"hyperparams_fn": _lr, "value": np.log(0.05)},
    {"hyperparams_fn": lambda m: {"learning_rate": 0.05, "b2": jax.nn.sigmoid(m)}, "value": 6.9},
  )
  def test_meta_gradient_finite_and_exact(self, hyperparams_fn, value):
    opt = R(optax.radam)(0.05)
    f = _meta_loss(opt, hyperparams_fn=hyperparams_fn)
    g = jax.grad(f)(value)
    self.assertTrue(np.isfinite(g))
    np.testing.assert_allclose(g, _central_difference(f, value), rtol=1e-6)
    mixflow = jax.grad(_meta_loss(opt, mode="mixflow", hyperparams_fn=hyperparams_fn))(value)
    np.testing.assert_allclose(mixflow, g, rtol=1e-12)

  def test_exact_at_zero_gradients(self):
    f = _meta_loss(R(optax.radam)(0.05), inner=_loss_ignoring_last)
    g = jax.grad(f)(np.log(0.05))
    np.testing.assert_allclose(g, _central_difference(f, np.log(0.05)), rtol=1e-6)

  def test_check_meta_gradient_passes(self):
    result = mfo.check_meta_gradient(
      _loss, _loss, R(optax.radam)(0.1), jnp.log(0.1), _W0, _XS, _XS[0], hyperparams_fn=_lr
    )
    self.assertTrue(result.ok)
    self.assertTrue(np.isfinite(result.standard["meta_params"]))


class IgnoredHyperparamsTest(helpers.F64TestCase):
  """A hyperparameter derived from meta_params that the update ignores has meta-gradient 0."""

  @parameterized.named_parameters(
    ("rprop_learning_rate", R(optax.rprop)(0.05), "learning_rate", r"rprop"),
    ("radam_threshold", R(optax.radam)(0.05), "threshold", r"comparison"),
    ("lion_b1", mfo.transforms.lion(0.05), "b1", r"sign"),
    ("lion_b2", mfo.transforms.lion(0.05), "b2", r"sign"),  # only the momentum, read via sign
  )
  def test_refused(self, opt, name, hint):
    run = mfo.unroll(_loss, opt, hyperparams_fn=lambda m: {name: jnp.exp(m) / 2})
    with self.assertRaisesRegex(ValueError, rf"\['{name}'\].*exactly 0.*{hint}"):
      run(jnp.log(0.1), _W0, opt.init(_W0), _XS)

  def test_refused_with_nested_params(self):
    params = {"a": {"w": _W0[:2]}, "b": [_W0[2:3], _W0[3:]]}
    loss = lambda p, m, x: _loss(jnp.concatenate([p["a"]["w"], *p["b"]]), m, x)
    opt = R(optax.rprop)(0.05)
    run = mfo.unroll(loss, opt, hyperparams_fn=_lr)
    with self.assertRaisesRegex(ValueError, r"\['learning_rate'\].*exactly 0"):
      run(jnp.log(0.1), params, opt.init(params), _XS)
    opt = mfo.transforms.adam(0.05)  # every hyperparameter used: runs
    run = mfo.unroll(
      loss, opt, hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m), "b2": 0.9 + m}
    )
    run(jnp.log(0.1), params, opt.init(params), _XS)

  def test_refused_in_meta_optimizer_and_check(self):
    opt = R(optax.rprop)(0.05)
    mo = mfo.meta_optimizer(_loss, _loss, opt, optax.sgd(0.1), hyperparams_fn=_lr)
    with self.assertRaisesRegex(ValueError, r"\['learning_rate'\].*exactly 0"):
      mo.step(mo.init(jnp.log(0.1), _W0), _XS, _XS[0])
    with self.assertRaisesRegex(ValueError, r"\['learning_rate'\].*exactly 0"):
      mfo.check_meta_gradient(_loss, _loss, opt, jnp.log(0.1), _W0, _XS, _XS[0], hyperparams_fn=_lr)

  def test_constants_and_stop_gradient_are_allowed(self):
    opt = R(optax.radam)(0.05)
    for fn in (
      lambda m: {"learning_rate": jnp.exp(m), "threshold": 4.0},
      lambda m: {"learning_rate": jnp.exp(m), "threshold": jax.lax.stop_gradient(5 + m)},
    ):
      run = mfo.unroll(_loss, opt, hyperparams_fn=fn)
      jax.grad(lambda m: jnp.sum(run(m, _W0, opt.init(_W0), _XS)[0]))(jnp.log(0.1))

  @parameterized.named_parameters(
    ("adam", mfo.transforms.adam(0.05)),
    ("sgd_momentum", mfo.transforms.sgd(0.05, momentum=0.9)),
    ("rmsprop", mfo.transforms.rmsprop(0.05)),
    ("yogi", R(optax.yogi)(0.05)),
    ("adafactor", R(optax.adafactor, "min_dim_size_to_factor")(0.05)),
  )
  def test_every_hyperparameter_of_these_is_used(self, opt):
    names = sorted(opt.hyperparams)
    run = mfo.unroll(_loss, opt, hyperparams_fn=lambda m: {k: jnp.exp(m) / 4 for k in names})
    run(jnp.log(0.1), _W0, opt.init(_W0), _XS[:1])

  def test_state_entries_read_later_count(self):
    # b2 reaches the update only through the second moment carried to the next step.
    opt = mfo.transforms.adam(0.05)
    fn = lambda m: {"b2": jax.nn.sigmoid(m)}
    self.assertEqual(hyperparams_without_effect(opt.update, fn, 3.0, _W0, opt.init(_W0)), [])
    # ...but a moment only ever read through a sign does not count (lion's b2, above).
    opt = mfo.transforms.lion(0.05)
    self.assertEqual(hyperparams_without_effect(opt.update, fn, 3.0, _W0, opt.init(_W0)), ["b2"])

  def test_inject_hyperparams_refused_at_init(self):
    opt = R(optax.inject_hyperparams(optax.adam))(0.05)
    with self.assertRaisesRegex(TypeError, r"inject_hyperparams.*reparameterize\(optax\.adam\)"):
      opt.init(_W0)


class ReparameterizeFactoryTest(helpers.TestCase):
  @parameterized.parameters(optax.chain, optax.named_chain)
  def test_chain_is_not_a_factory(self, factory):
    with self.assertRaisesRegex(TypeError, r"takes \*args.*mixflow_optax\.transforms\.chain"):
      R(factory)

  def test_source_is_recorded_for_stock_factories_only(self):
    self.assertEqual(_check_grad.optax_source(R(optax.adam)(0.1)), "optax.adam")
    self.assertIsNone(_check_grad.optax_source(mfo.transforms.adam(0.1)))
    mine = lambda learning_rate: optax.sgd(learning_rate)
    self.assertIsNone(_check_grad.optax_source(R(mine)(0.1)))


class InitOnlyArgumentTest(helpers.F64TestCase):
  @parameterized.parameters(
    (mfo.transforms.adagrad, "initial_accumulator_value"),
    (mfo.transforms.rmsprop, "initial_scale"),
  )
  def test_message_says_it_is_not_a_hyperparameter(self, factory, name):
    opt = factory(0.1)
    run = mfo.unroll(_loss, opt, hyperparams_fn=lambda m: {name: jnp.exp(m)})
    with self.assertRaisesRegex(ValueError, rf"\['{name}'\].*init.*opt_state") as cm:
      run(0.0, _W0, opt.init(_W0), _XS)
    self.assertNotIn("construct it with a value", str(cm.exception))

  def test_the_suggested_fix_works(self):
    # Learn adagrad's initial accumulator through the opt_state given to run.
    opt = mfo.transforms.adagrad(0.1)

    def meta_loss(mode):
      run = mfo.unroll(_loss, opt, mode=mode)

      def f(log_g0):
        state = opt.init(_W0)
        acc = jax.tree.map(lambda p: jnp.full_like(p, jnp.exp(log_g0)), _W0)
        state = (state[0]._replace(sum_of_squares=acc),) + tuple(state[1:])
        return _loss(run(log_g0, _W0, state, _XS)[0], None, _XS[0])

      return f

    g = jax.grad(meta_loss("mixflow"))(np.log(0.1))
    self.assertNotEqual(float(g), 0.0)
    np.testing.assert_allclose(g, jax.grad(meta_loss("standard"))(np.log(0.1)), rtol=1e-12)
    np.testing.assert_allclose(
      g, _central_difference(meta_loss("standard"), np.log(0.1)), rtol=1e-6
    )


class InitParamsTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("alias", mfo.transforms.adam(0.1), "chain"),
    ("reparameterized", R(optax.adam)(0.1), r"reparameterize\(adam\)"),
    ("named_chain", mfo.transforms.named_chain(("a", mfo.transforms.sgd(0.1))), "named_chain"),
  )
  def test_string_leaf_named_at_init(self, opt, owner):
    with self.assertRaisesRegex(TypeError, rf"{owner}\.init: params leaf \['name'\] is a str"):
      opt.init({"name": "layer0", "w": _W0})


def _attention_input(shape=(2, 10, 2, 4), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _attention(differentiation, q):
  out = mfo.nn.dot_product_attention(q, q, q, block_size=4, differentiation=differentiation)
  return jnp.sum(jnp.sin(out))


class AttentionForwardModeTest(helpers.F64TestCase):
  """Flash attention under jax.jvp switches itself to the plain path (same values)."""

  def test_bare_jvp_and_jacfwd(self):
    q, t = _attention_input(), _attention_input(seed=1)
    flash, plain = (functools.partial(_attention, d) for d in ("flash", "checkpoint"))
    for wrap in (lambda f: f, jax.jit):
      chex.assert_trees_all_close(
        wrap(lambda q, t: jax.jvp(flash, (q,), (t,)))(q, t),
        jax.jvp(plain, (q,), (t,)),
        rtol=1e-12,
      )
    chex.assert_trees_all_close(jax.jacfwd(flash)(q[0]), jax.jacfwd(plain)(q[0]), rtol=1e-12)
    vmapped = lambda q: jnp.sum(jax.vmap(flash)(q))
    chex.assert_trees_all_close(
      jax.jvp(vmapped, (q,), (t,)), jax.jvp(lambda q: jnp.sum(jax.vmap(plain)(q)), (q,), (t,))
    )

  def test_reverse_over_forward_and_forward_over_reverse(self):
    q, t = _attention_input(), _attention_input(seed=1)
    for d in ("flash", "checkpoint"):
      f = functools.partial(_attention, d)
      with self.subTest(d):
        chex.assert_trees_all_close(
          jax.grad(lambda q: jax.jvp(f, (q,), (t,))[1])(q),
          jax.jvp(jax.grad(f), (q,), (t,))[1],
          rtol=1e-10,
        )

  def _model(self, remat):
    def model(w, x):
      q = jnp.einsum("sd,dhk->shk", x, w)
      attend = lambda q: mfo.nn.dot_product_attention(q, q, q, block_size=4)
      return jnp.mean((jax.checkpoint(attend) if remat else attend)(q) ** 2)

    x = jax.random.normal(jax.random.key(0), (3, 8, 4))
    w = jax.random.normal(jax.random.key(1), (4, 2, 3)) * 0.3
    return model, w, x

  def test_meta_optimizer_forward_mode(self):
    model, w, x = self._model(remat=False)
    inner = lambda w, m, x: model(w, x) * jnp.exp(m)
    outer = lambda w, m, x: model(w, x)
    norms = {}
    for mode in ("forward", "standard"):
      mo = mfo.meta_optimizer(inner, outer, mfo.transforms.sgd(0.1), optax.sgd(0.1), mode=mode)
      norms[mode] = jax.jit(mo.step)(mo.init(jnp.zeros(()), w), x, x[0])[1]["meta_grad_norm"]
    np.testing.assert_allclose(norms["forward"], norms["standard"], rtol=1e-12)

  def test_inside_checkpoint_under_forward_mode_names_the_option(self):
    model, w, x = self._model(remat=True)
    inner = lambda w, m, x: model(w, x) * jnp.exp(m)
    mo = mfo.meta_optimizer(
      inner, lambda w, m, x: model(w, x), mfo.transforms.sgd(0.1), optax.sgd(0.1), mode="forward"
    )
    with self.assertRaisesRegex(mfo.ForwardModeError, r"differentiation='checkpoint'"):
      mo.step(mo.init(jnp.zeros(()), w), x, x[0])


class ForwardModeUserErrorTest(helpers.TestCase):
  # Not in an F64TestCase: with JAX 0.10, re-tracing a function that raises,
  # under jax.enable_x64, could leave float64 avals for a later float32 trace.
  def test_user_errors_under_forward_mode_stay_as_they_are(self):
    def outer(w, m, x):
      raise ValueError("my own bug")

    mo = mfo.meta_optimizer(_loss, outer, mfo.transforms.sgd(0.1), optax.sgd(0.1), mode="forward")
    with self.assertRaisesRegex(ValueError, "my own bug"):
      mo.step(mo.init(jnp.zeros(()), _W0), _XS, _XS[0])


class AttentionRankTest(helpers.TestCase):
  @parameterized.parameters(((4,),), ((10, 4),), ((1, 1, 1, 2, 4),))
  def test_only_3d_or_4d(self, shape):
    x = jnp.ones(shape)
    with self.assertRaisesRegex(ValueError, rf"got shape {re.escape(str(shape))}.*heads axis"):
      mfo.nn.dot_product_attention(x, x, x)

  def test_3d_still_works(self):
    q = _attention_input((10, 2, 4))
    chex.assert_trees_all_close(
      mfo.nn.dot_product_attention(q, q, q, block_size=4),
      jax.nn.dot_product_attention(q, q, q),
      atol=1e-5,
    )


class ForwardModeOptionsTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("remat", {"remat": "no"}, TypeError, "remat must be True or False"),
    ("save_inner_grads", {"save_inner_grads": 1}, TypeError, "save_inner_grads"),
    ("checkpoint_every", {"checkpoint_every": 0}, ValueError, "checkpoint_every"),
    ("offload", {"offload_carries": "x"}, TypeError, "offload_carries"),
    ("offload_no_remat", {"offload_carries": True, "remat": False}, ValueError, "remat=True"),
    ("unroll_steps", {"unroll_steps": 0}, ValueError, "unroll_steps"),
    ("fallback", {"fallback": "nope"}, ValueError, "fallback"),
  )
  def test_ignored_options_still_validated(self, kw, error, regex):
    with self.assertRaisesRegex(error, regex):
      mfo.meta_optimizer(
        _loss, _loss, mfo.transforms.sgd(0.1), optax.sgd(0.1), mode="forward", **kw
      )


# Found by trying further misuse (see the commit message for the list of cases tried).


class HyperparamValuesTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("string", lambda m: {"learning_rate": "0.1"}, r"as a str"),
    ("complex", lambda m: {"learning_rate": jnp.exp(m) + 0j}, r"as complex"),
  )
  def test_real_values_only(self, fn, regex):
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(_loss, opt, hyperparams_fn=fn)
    with self.assertRaisesRegex(TypeError, rf"\['learning_rate'\] {regex}.*real"):
      jax.grad(lambda m: jnp.sum(run(m, _W0, opt.init(_W0), _XS)[0]))(0.1)


class OuterLossValueTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("tuple", lambda p, m, b: (_loss(p, m, b), 1.0), r"got a tuple of 2"),
    ("integer", lambda p, m, b: jnp.sum(p > 0), r"dtype int32.*surrogate"),
    ("vector", lambda p, m, b: p, r"shape \(4,\)"),
  )
  def test_real_scalar_only(self, outer, regex):
    opt = mfo.transforms.sgd(0.1)
    mo = mfo.meta_optimizer(_loss, outer, opt, optax.sgd(0.1))
    with self.assertRaisesRegex(TypeError, rf"must return a real scalar.*{regex}"):
      mo.step(mo.init(jnp.zeros(()), _W0), _XS, _XS[0])
    with self.assertRaisesRegex(TypeError, rf"must return a real scalar.*{regex}"):
      mfo.check_meta_gradient(_loss, outer, opt, 0.1, _W0, _XS, _XS[0])


class OptStateStructureTest(helpers.TestCase):
  @parameterized.parameters(((),), (None,), ("sgd",))
  def test_state_of_another_optimizer(self, state):
    state = mfo.transforms.sgd(0.1).init(_W0) if state == "sgd" else state
    run = mfo.unroll(_loss, mfo.transforms.adam(0.1))
    with self.assertRaisesRegex(TypeError, r"opt_state does not have the structure.*init"):
      run(0.1, _W0, state, _XS)


class TrivialCheckTest(helpers.TestCase):
  def test_warns_when_meta_gradient_is_identically_zero(self):
    with self.assertWarnsRegex(RuntimeWarning, r"exactly 0 in both modes.*hyperparams_fn"):
      result = mfo.check_meta_gradient(_loss, _loss, mfo.transforms.sgd(0.1), 0.1, _W0, _XS, _XS[0])
    self.assertTrue(result.ok)


class LowPrecisionCheckTest(helpers.TestCase):
  def test_bfloat16_mismatch_blames_the_precision(self):
    params = jnp.asarray(_W0, jnp.bfloat16)
    with self.assertRaisesRegex(mfo.MetaGradientMismatchError, r"bfloat16.*float32 or float64"):
      mfo.check_meta_gradient(
        _loss, _loss, mfo.transforms.sgd(0.1), jnp.log(0.1), params, _XS, _XS[0], hyperparams_fn=_lr
      )


class EmptyParamsTest(helpers.TestCase):
  @parameterized.parameters(({},), ((),), ({"layers": []},))
  def test_nothing_to_train(self, params):
    opt = mfo.transforms.sgd(0.1)
    with self.assertRaisesRegex(ValueError, "no arrays: there is nothing"):
      mfo.unroll(lambda p, m, x: jnp.sum(x), opt)(0.1, params, opt.init(params), _XS)
    with self.assertRaisesRegex(ValueError, "no arrays: there is nothing"):
      mfo.meta_optimizer(_loss, _loss, opt, optax.sgd(0.1)).init(jnp.zeros(()), params)


class LearnedOptimizerStateTest(helpers.TestCase):
  def test_state_of_other_parameters(self):
    lopt = mfo.transforms.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(4,))
    with self.assertRaisesRegex(ValueError, r"gradient and state have different tree structures"):
      lopt.update(_W0, lopt.init({"a": _W0}), _W0)
    with self.assertRaisesRegex(ValueError, r"gradient and params have different tree structures"):
      lopt.update(_W0, lopt.init(_W0), {"a": _W0})


class ChunkedCrossEntropyLabelsTest(helpers.TestCase):
  def _args(self):
    h = jax.random.normal(jax.random.key(0), (3, 4))
    return h, jax.random.normal(jax.random.key(1), (4, 5))

  @parameterized.parameters(-1, -100, 5)
  def test_concrete_labels_out_of_range(self, bad):
    with self.assertRaisesRegex(ValueError, rf"\[0, 5\).*labels\[1\] = {bad}.*weight 0"):
      mfo.nn.chunked_cross_entropy(*self._args(), jnp.array([0, bad, 2]))

  @parameterized.parameters(-1, 5)
  def test_traced_labels_out_of_range_are_nan_not_another_class(self, bad):
    h, w = self._args()
    got = jax.jit(mfo.nn.chunked_cross_entropy)(h, w, jnp.array([0, bad, 2]))
    want = mfo.nn.chunked_cross_entropy(h, w, jnp.array([0, 1, 2]))
    self.assertTrue(np.isnan(got[1]))
    chex.assert_trees_all_close(got[::2], want[::2])

  @parameterized.parameters(0, -3, 2.5, True)
  def test_chunk_size(self, bad):
    with self.assertRaisesRegex((TypeError, ValueError), "chunk_size must be a positive int"):
      mfo.nn.chunked_cross_entropy(*self._args(), jnp.array([0, 1, 2]), chunk_size=bad)


class AttentionOptionsTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("block_zero", {"block_size": 0}, ValueError, "block_size must be a positive int"),
    ("block_float", {"block_size": 2.5}, ValueError, "block_size must be a positive int"),
    ("block_bool", {"block_size": True}, ValueError, "block_size must be a positive int"),
    ("causal_string", {"is_causal": "no"}, TypeError, "is_causal must be True or False"),
    ("window_negative", {"local_window_size": (-1, 2)}, ValueError, "local_window_size"),
    ("window_triple", {"local_window_size": (1, 2, 3)}, ValueError, "local_window_size"),
  )
  def test_options(self, kw, error, regex):
    x = jnp.ones((5, 2, 4))
    with self.assertRaisesRegex(error, regex):
      mfo.nn.dot_product_attention(x, x, x, **kw)


if __name__ == "__main__":
  absltest.main()
