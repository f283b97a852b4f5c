"""Misuse gets a clear error that names the problem and the fix, or a correct result."""

import dataclasses
import warnings

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.experimental import checkify

import mixflow_optax as mfo
from mixflow_optax import _config

_OPT = mfo.transforms.sgd(0.1)
# NumPy, so that each test gets its own default float dtype (float64 in F64TestCase).
_XS = np.linspace(0.5, 1.5, 12).reshape(3, 4)
_W0 = np.array([0.3, -0.2, 0.5, 0.1])


def _loss(w, meta, x):
  return jnp.mean((x * w - 1.0) ** 2 + 0.1 * jnp.sin(w * x) ** 2)


def _hp(meta):
  return {"learning_rate": jnp.exp(meta)}


def _run(fn=_loss, **kw):
  return mfo.unroll(fn, _OPT, **kw)


def _mo(**kw):
  return mfo.meta_optimizer(_loss, _loss, _OPT, optax.sgd(0.1), **kw)


# A straight-through normalisation: forward u / |u|, backward the identity. Its
# "gradient" is not the derivative of any loss, so the inner Hessian the mixflow
# rule relies on is not symmetric.
@jax.custom_vjp
def _ste_normalize(u):
  return u / jnp.linalg.norm(u)


_ste_normalize.defvjp(lambda u: (u / jnp.linalg.norm(u), None), lambda _, g: (g,))


def _ste_loss(w, meta, x):
  target, weights = jnp.array([0.6, -0.8, 0.0, 0.0]), jnp.array([1.0, 3.0, 0.5, 2.0])
  return jnp.sum(weights * (_ste_normalize(w * x) - target) ** 2)


class CheckMetaGradientTest(helpers.F64TestCase):
  def _check(self, inner, **kw):
    return mfo.check_meta_gradient(
      inner, _loss, _OPT, jnp.log(0.3), _W0, _XS, _XS[0], hyperparams_fn=_hp, **kw
    )

  def test_normal_loss_passes(self):
    result = self._check(_loss, rtol=1e-10, atol=1e-12)
    self.assertTrue(result.ok)
    self.assertLess(result.max_abs_diff, 1e-12)
    chex.assert_trees_all_close(result.mixflow, result.standard, rtol=1e-10)

  def test_straight_through_estimator_is_flagged(self):
    with self.assertRaisesRegex(mfo.MetaGradientMismatchError, r"mode='standard'.*"):
      self._check(_ste_loss)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      result = self._check(_ste_loss, on_mismatch="warn")
    self.assertFalse(result.ok)
    self.assertGreater(result.max_rel_diff, 0.1)
    self.assertTrue(any("custom_jvp/custom_vjp" in str(c.message) for c in caught))


class EmptyStepAxisTest(helpers.TestCase):
  @parameterized.named_parameters(("every_step_stored", None), ("checkpoint_every_two", 2))
  def test_zero_steps(self, checkpoint_every):
    run = _run(checkpoint_every=checkpoint_every)
    with self.assertRaisesRegex(ValueError, r"T = 0.*at least one step"):
      run(0.0, _W0, _OPT.init(_W0), _XS[:0])

  def test_meta_step_does_not_take_a_zero_step(self):
    mo = _mo()
    with self.assertRaisesRegex(ValueError, "T = 0"):
      mo.step(mo.init(jnp.zeros(()), _W0), _XS[:0], _XS[0])


class OptionTypesTest(helpers.TestCase):
  @parameterized.named_parameters(
    *helpers.named_product(
      name=("remat", "save_inner_grads", "has_model_state", "check_finite"),
      builder=("unroll", "meta_optimizer"),
    )
  )
  def test_booleans_only(self, name, builder):
    build = _run if builder == "unroll" else _mo
    with self.assertRaisesRegex(TypeError, f"{name} must be True or False, got 'no'"):
      build(**{name: "no"})

  def test_return_losses_boolean_only(self):
    with self.assertRaisesRegex(TypeError, "return_losses must be True or False, got 1"):
      _run(return_losses=1)

  @parameterized.named_parameters(
    ("reset_inner", "reset_inner"), ("batched_tasks", "batched_tasks")
  )
  def test_meta_only_booleans(self, name):
    with self.assertRaisesRegex(TypeError, f"{name} must be True or False"):
      _mo(**{name: "yes"})

  @parameterized.named_parameters(
    ("bool", True),
    ("empty_tuple", ()),
    ("empty_list", []),
    ("zero_inner_level", (2, 0)),
    ("string", "4"),
    ("zero", 0),
  )
  def test_checkpoint_every(self, bad):
    for build in (_run, _mo):
      with self.assertRaisesRegex(ValueError, "checkpoint_every must be a positive int"):
        build(checkpoint_every=bad)

  def test_checkpoint_every_accepts_ints_lists_arrays(self):
    for good in (2, [2], (2, 1), np.array([2])):
      _run(checkpoint_every=good)

  @parameterized.named_parameters(("string", "2"), ("zero", 0), ("float", 1.5))
  def test_unroll_steps(self, bad):
    for build in (_run, _mo):
      with self.assertRaisesRegex(ValueError, "unroll_steps must be a positive int"):
        build(unroll_steps=bad)

  def test_unroll_steps_bool_as_lax_scan(self):
    # lax.scan takes unroll=True (unroll fully) and False (1); so does unroll_steps.
    out = _run(unroll_steps=True)(0.0, _W0, _OPT.init(_W0), _XS)
    chex.assert_trees_all_close(out, _run()(0.0, _W0, _OPT.init(_W0), _XS), rtol=1e-6)

  def test_same_mistake_same_type_in_unroll_and_meta_optimizer(self):
    with self.assertRaises(TypeError):
      _run(has_model_state=True)(0.0, _W0, _OPT.init(_W0), _XS)
    mo = mfo.meta_optimizer(
      lambda p, m, b, s: (_loss(p, m, b), s), _loss, _OPT, optax.sgd(0.1), has_model_state=True
    )
    with self.assertRaises(TypeError):
      mo.init(jnp.zeros(()), _W0)


class DonationTest(helpers.TestCase):
  def test_init_copies_the_callers_arrays(self):
    mo = _mo()
    meta, params = jnp.asarray(0.1), jnp.array(_W0)
    state = mo.init(meta, params)
    jax.jit(mo.step, donate_argnums=0)(state, _XS, _XS[0])
    self.assertFalse(meta.is_deleted())
    self.assertFalse(params.is_deleted())
    mo.init(meta, params)  # re-init from the caller's arrays still works


class LossOutputTest(helpers.TestCase):
  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_loss_and_metrics_without_flag_in_unroll(self, mode):
    run = _run(lambda w, m, x: (_loss(w, m, x), {"acc": jnp.ones(())}), mode=mode)
    with self.assertRaisesRegex(TypeError, r"returned a tuple of 2.*has_model_state=True"):
      run(0.0, _W0, _OPT.init(_W0), _XS)

  def test_loss_and_metrics_without_flag_in_fwdrev_grad(self):
    with self.assertRaisesRegex(TypeError, r"returned a tuple of 2.*has_aux=True"):
      mfo.fwdrev_grad(lambda w: (jnp.sum(w**2), {"n": 1.0}))(_W0)

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_model_state_loss_without_state(self, mode):
    run = _run(lambda w, m, x, s: _loss(w, m, x), has_model_state=True, mode=mode)
    with self.assertRaisesRegex(TypeError, r"has_model_state=True.*\(loss, new_model_state\)"):
      run(0.0, _W0, _OPT.init(_W0), _XS, {"s": jnp.zeros(())})

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_non_scalar_inner_loss_same_message(self, mode):
    run = _run(lambda w, m, x: (w * x) ** 2, mode=mode)
    with self.assertRaisesRegex(TypeError, r"must return a real scalar loss.*shape \(4,\)"):
      jax.grad(lambda m: jnp.sum(run(m, _W0, _OPT.init(_W0), _XS)[0]))(0.0)

  def test_no_tracer_type_names(self):
    with self.assertRaisesRegex(TypeError, "it returned an array of shape") as cm:
      jax.grad(lambda w: jnp.sum(mfo.fwdrev_grad(jnp.sum, has_aux=True)(w)[0]))(_W0)
    self.assertNotIn("Tracer", str(cm.exception))


class ForwardModeOfMetaLossTest(helpers.F64TestCase):
  """Under jax.jvp / jacfwd the plain inner gradient is forward-over-reverse: it works."""

  def _meta_loss(self, mode):
    run = _run(mode=mode, hyperparams_fn=_hp)
    return lambda m: jnp.sum(run(m, _W0, _OPT.init(_W0), _XS)[0] ** 2)

  def test_jvp_and_jacfwd_of_unroll(self):
    want = jax.grad(self._meta_loss("standard"))(0.1)
    mixflow = self._meta_loss("mixflow")
    chex.assert_trees_all_close(jax.jvp(mixflow, (0.1,), (1.0,))[1], want, rtol=1e-12)
    chex.assert_trees_all_close(jax.jacfwd(mixflow)(0.1), want, rtol=1e-12)

  def test_jvp_of_fwdrev_grad(self):
    f = lambda a: jnp.sum(mfo.fwdrev_grad(lambda w, a: jnp.sum(a * jnp.sin(w) ** 2))(_W0, a))
    g = lambda a: jnp.sum(jax.grad(lambda w, a: jnp.sum(a * jnp.sin(w) ** 2))(_W0, a))
    chex.assert_trees_all_close(jax.jvp(f, (2.0,), (1.0,)), jax.jvp(g, (2.0,), (1.0,)))


class CheckFiniteTest(helpers.TestCase):
  def test_bare_unroll_differentiated_without_checkify(self):
    run = _run(check_finite=True)
    meta_loss = lambda m: jnp.sum(run(m, _W0, _OPT.init(_W0), _XS)[0])
    with self.assertRaisesRegex(ValueError, r"check_finite=True.*checkify.checkify"):
      jax.grad(meta_loss)(0.1)
    err, g = checkify.checkify(jax.grad(meta_loss))(0.1)
    err.throw()
    self.assertTrue(bool(jnp.isfinite(g)))


class MetaStateTest(helpers.TestCase):
  @parameterized.named_parameters(("none", None), ("float", 1.0))
  def test_step_before_init(self, state):
    with self.assertRaisesRegex(TypeError, r"MetaState made by this meta-optimizer's init"):
      _mo().step(state, _XS, _XS[0])

  def test_state_of_another_meta_optimizer(self):
    mo = mfo.meta_optimizer(_loss, _loss, mfo.transforms.adam(0.1), optax.adam(0.1))
    state = _mo().init(jnp.zeros(()), _W0)  # SGD's empty states
    with self.assertRaisesRegex(TypeError, r"_state was not made by this meta-optimizer"):
      mo.step(state, _XS, _XS[0])


class BatchedTasksTest(helpers.TestCase):
  def test_missing_or_mismatched_task_axis(self):
    mo = _mo(batched_tasks=True, reset_inner=True)
    state = mo.init(jnp.zeros(()), _W0)
    with self.assertRaisesRegex(
      ValueError, r"batched_tasks=True.*inner_batches: 3.*outer_batch: 4"
    ):
      mo.step(state, _XS, _XS[0])
    with self.assertRaisesRegex(
      ValueError, r"batched_tasks=True.*inner_batches: 2.*outer_batch: 3"
    ):
      mo.step(state, jnp.stack([_XS] * 2), jnp.stack([_XS[0]] * 3))


class ArgumentsTest(helpers.TestCase):
  def test_uncalled_factory(self):
    with self.assertRaisesRegex(TypeError, r"inner_opt is 'adam'.*call it.*adam\(1e-3\)"):
      mfo.unroll(_loss, mfo.transforms.adam)
    with self.assertRaisesRegex(TypeError, r"outer_opt is 'adam'.*call it"):
      mfo.meta_optimizer(_loss, _loss, _OPT, optax.adam)

  def test_string_leaf_in_params(self):
    params = {"name": "layer0", "w": _W0}
    with self.assertRaisesRegex(TypeError, r"params leaf \['name'\] is a str.*eqx.partition"):
      _run()(0.0, params, (), _XS)
    with self.assertRaisesRegex(TypeError, r"params leaf \['name'\] is a str"):
      _mo().init(jnp.zeros(()), params)
    with self.assertRaisesRegex(TypeError, r"meta_params leaf \['tag'\] is a str"):
      _mo().init({"tag": "x"}, _W0)
    with self.assertRaisesRegex(TypeError, r"argument 0 leaf \['name'\] is a str"):
      mfo.fwdrev_grad(lambda p: jnp.sum(p["w"]))(params)

  def test_fwdrev_grad_keyword_arguments(self):
    def f(x, scale=1.0, square=False):
      y = jnp.sin(x) ** 2 if square else jnp.sin(x)  # a Python flag stays static
      return jnp.sum(scale * y)

    for square in (False, True):
      chex.assert_trees_all_close(
        mfo.fwdrev_grad(f)(_W0, scale=2.0, square=square),
        jax.grad(f)(_W0, scale=2.0, square=square),
      )
    # An outer transformation differentiates through keyword arguments, as with jax.grad.
    meta = lambda grad: lambda s: jnp.sum(grad(f)(_W0, scale=s, square=True) ** 2)
    chex.assert_trees_all_close(
      jax.grad(meta(mfo.fwdrev_grad))(2.0), jax.grad(meta(jax.grad))(2.0), rtol=1e-5
    )


# An operation with a first derivative but no second one: a host callback with a
# custom_jvp whose tangent is another callback.
def _cb(fn, x):
  return jax.pure_callback(fn, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


@jax.custom_jvp
def _host_sin(x):
  return _cb(np.sin, x)


@_host_sin.defjvp
def _host_sin_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return _host_sin(x), _cb(np.cos, x) * dx


class ForwardModeErrorTest(helpers.TestCase):
  @parameterized.named_parameters(("raise", "raise"), ("reverse", "reverse"))
  def test_no_suggestion_for_an_operation_without_second_derivative(self, fallback):
    run = _run(lambda w, m, x: jnp.sum(_host_sin(w * x)) * m, fallback=fallback)
    meta_loss = lambda m: jnp.sum(run(m, _W0, _OPT.init(_W0), _XS)[0])
    with self.assertRaisesRegex(mfo.ForwardModeError, "cannot be differentiated twice") as cm:
      jax.grad(meta_loss)(0.1)
    self.assertNotIn("pass fallback='reverse'", str(cm.exception))


class MemoryConfigTest(helpers.TestCase):
  """``unroll`` and ``meta_optimizer`` share one memory-settings object."""

  def test_one_object_built_and_checked_once(self):
    cfg = _config.memory_config("x", remat=True, save_inner_grads=False, checkpoint_every=[4, 2])
    self.assertEqual(cfg, _config.MemoryConfig(True, False, (4, 2), 1))
    self.assertIs(cfg.step_policy(), jax.checkpoint_policies.nothing_saveable)
    self.assertIsNone(_config.MemoryConfig(remat=False).step_policy())
    with self.assertRaises(dataclasses.FrozenInstanceError):
      cfg.remat = False  # type: ignore[misc]

  def test_unroll_and_meta_optimizer_reject_the_same_bad_options(self):
    opt, loss = mfo.transforms.sgd(0.1), lambda w, m, x: jnp.sum((w - x) ** 2)
    for build in (
      lambda **kw: mfo.unroll(loss, opt, **kw),
      lambda **kw: mfo.meta_optimizer(loss, loss, opt, optax.sgd(0.1), **kw),
    ):
      for bad in ({"remat": "no"}, {"checkpoint_every": 0}, {"unroll_steps": "2"}):
        with self.subTest(build=build, bad=bad):
          with self.assertRaises((TypeError, ValueError)):
            build(**bad)


if __name__ == "__main__":
  absltest.main()
