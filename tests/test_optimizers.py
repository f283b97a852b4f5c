"""Optax conformance of the hand-written optimizers beyond SGD/Adam/RMSProp.

Lion, NAdam(W), AdaBelief, AMSGrad, Adagrad, Adafactor and LAMB must be
drop-in replacements for the stock optax optimizers (trajectory, state tree,
dtypes, jit/scan/cond, optax wrappers, flax NNX), take ``hyperparams=``
overrides (scalar and per-parameter) through which gradients flow exactly,
stay finite where gradient entries are exactly zero, and offer the
``stop_gradient_denominator`` approximation on the Adam family. The tiny
problem and the runners are those of tests/test_transforms.py (tests/helpers.py).
"""

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
from absl.testing import absltest, parameterized
from flax import nnx

import mixflow_optax as mfo

T = mfo.transforms

_MATRICES_ONLY = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

# name -> (mixflow_optax factory, stock optax factory); each is called with
# keyword overrides (used by the hyperparameter tests).
_OPTIMIZERS = {
  "lion": (
    functools.partial(T.lion, learning_rate=0.03),
    functools.partial(optax.lion, learning_rate=0.03),
  ),
  "lion_mask": (
    functools.partial(T.lion, learning_rate=0.03, weight_decay=0.1, mask=_MATRICES_ONLY),
    functools.partial(optax.lion, learning_rate=0.03, weight_decay=0.1, mask=_MATRICES_ONLY),
  ),
  "nadam": (
    functools.partial(T.nadam, learning_rate=0.05),
    functools.partial(optax.nadam, learning_rate=0.05),
  ),
  "nadamw": (
    functools.partial(T.nadamw, learning_rate=0.05, weight_decay=0.1),
    functools.partial(optax.nadamw, learning_rate=0.05, weight_decay=0.1),
  ),
  "adabelief": (
    functools.partial(T.adabelief, learning_rate=0.05),
    functools.partial(optax.adabelief, learning_rate=0.05),
  ),
  "adabelief_nesterov": (
    functools.partial(T.adabelief, learning_rate=0.05, nesterov=True),
    functools.partial(optax.adabelief, learning_rate=0.05, nesterov=True),
  ),
  "amsgrad": (
    functools.partial(T.amsgrad, learning_rate=0.05),
    functools.partial(optax.amsgrad, learning_rate=0.05),
  ),
  "amsgrad_no_bias_correction": (
    functools.partial(
      T.amsgrad, learning_rate=0.05, bias_correction_mu=False, bias_correction_nu=False
    ),
    functools.partial(
      optax.amsgrad, learning_rate=0.05, bias_correction_mu=False, bias_correction_nu=False
    ),
  ),
  "adagrad": (
    functools.partial(T.adagrad, learning_rate=0.1),
    functools.partial(optax.adagrad, learning_rate=0.1),
  ),
  "adafactor": (
    functools.partial(T.adafactor, learning_rate=0.05),
    functools.partial(optax.adafactor, learning_rate=0.05),
  ),
  # Factored second moments on the 3x2 matrix, momentum and weight decay.
  "adafactor_factored": (
    functools.partial(
      T.adafactor, 0.05, min_dim_size_to_factor=2, momentum=0.5, weight_decay_rate=0.01
    ),
    functools.partial(
      optax.adafactor, 0.05, min_dim_size_to_factor=2, momentum=0.5, weight_decay_rate=0.01
    ),
  ),
  "lamb": (
    functools.partial(T.lamb, learning_rate=0.05, weight_decay=0.01),
    functools.partial(optax.lamb, learning_rate=0.05, weight_decay=0.01),
  ),
  # Muon on the matrix, AdamW on the bias (optax.partition state).
  "muon": (
    functools.partial(T.muon, learning_rate=0.05),
    functools.partial(optax.contrib.muon, learning_rate=0.05),
  ),
  "muon_weight_decay_adam_rate": (
    functools.partial(
      T.muon, learning_rate=0.05, weight_decay=0.1, adam_learning_rate=0.02, nesterov=False
    ),
    functools.partial(
      optax.contrib.muon,
      learning_rate=0.05,
      weight_decay=0.1,
      adam_learning_rate=0.02,
      nesterov=False,
    ),
  ),
}
_NAMES = tuple((name, name) for name in _OPTIMIZERS)

# Every hyperparameter of every optimizer, with a value to move it to.
_OVERRIDES = {
  "lion": {"learning_rate": 0.02, "b1": 0.8, "b2": 0.9, "weight_decay": 0.05},
  "lion_mask": {"weight_decay": 0.3},
  "nadam": {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "eps_root": 1e-6},
  "nadamw": {"b1": 0.8, "weight_decay": 0.2},
  "adabelief": {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "eps_root": 1e-6},
  "adabelief_nesterov": {"b1": 0.8},
  "amsgrad": {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "eps_root": 1e-6},
  "amsgrad_no_bias_correction": {"b2": 0.95},
  "adagrad": {"learning_rate": 0.02, "eps": 1e-3},
  "adafactor": {"learning_rate": 0.02, "decay_rate": 0.7, "eps": 1e-20, "clipping_threshold": 0.5},
  "adafactor_factored": {"decay_rate": 0.7, "momentum": 0.8, "weight_decay_rate": 0.1},
  "lamb": {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "weight_decay": 0.1},
  "muon": {"learning_rate": 0.02, "beta": 0.8, "eps": 1e-4, "weight_decay": 0.1, "adam_b1": 0.8},
  "muon_weight_decay_adam_rate": {"adam_learning_rate": 0.05, "adam_b2": 0.9},
}


def _pair(name):
  make, make_ref = _OPTIMIZERS[name]
  return make(), make_ref()


class ConformanceTest(helpers.F64TestCase):
  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()

  @parameterized.named_parameters(*_NAMES)
  def test_trajectory_and_state_match_optax(self, name):
    opt, ref = _pair(name)
    self.assertIsInstance(opt, T.ReparamTransformation)
    params, batch = helpers.layer_params(), helpers.layer_batch()
    self.assertEqual(jax.tree.structure(opt.init(params)), jax.tree.structure(ref.init(params)))
    # 12 jitted steps, traced once.
    (iterates, state), (ref_iterates, ref_state) = helpers.run_pair(
      opt, ref, params, batch, 12, wrap=chex.assert_max_traces(n=1)
    )
    chex.assert_trees_all_close(iterates, ref_iterates, **helpers.TIGHT)
    chex.assert_trees_all_equal_structs(state, ref_state)
    chex.assert_trees_all_close(state, ref_state, **helpers.TIGHT)
    self.assertLess(
      float(helpers.layer_loss(iterates[-1], batch)), 0.9 * float(helpers.layer_loss(params, batch))
    )

  @parameterized.named_parameters(*_NAMES)
  def test_overrides_equal_construction_and_jit_does_not_retrace(self, name):
    make, make_ref = _OPTIMIZERS[name]
    overrides = _OVERRIDES[name]
    opt = make()
    self.assertContainsSubset(set(overrides), set(opt.hyperparams))
    params, grads = helpers.layer_params(), helpers.grad_sequence(2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(g, s, p, hp):
      return opt.update(g, s, p, hyperparams=hp, unknown_extra_arg=1.0)

    # Defaults as arrays, then new values: one trace.
    state = opt.init(params)
    hp0 = {k: jnp.asarray(v) for k, v in opt.hyperparams.items()}
    _, s1 = update(grads[0], state, params, hp0)
    hp1 = {**hp0, **{k: jnp.asarray(v) for k, v in overrides.items()}}
    u2, s2 = update(grads[1], s1, params, hp1)
    ref = make_ref(**overrides)
    _, r1 = make_ref().update(grads[0], ref.init(params), params)
    chex.assert_trees_all_close((u2, s2), ref.update(grads[1], r1, params), **helpers.TIGHT)

  @parameterized.named_parameters(
    *helpers.named_product(name=_OPTIMIZERS, wrapper=("chain", "multi_steps", "inject_hyperparams"))
  )
  def test_inside_optax_wrappers(self, name, wrapper):
    make, make_ref = _OPTIMIZERS[name]
    params, batch = helpers.layer_params(), helpers.layer_batch()
    if wrapper == "chain":
      wrap = lambda t: optax.chain(optax.clip(1.0), t, optax.scale(0.5))
      results = (
        helpers.run(wrap(make()), params, batch, 3),
        helpers.run(wrap(make_ref()), params, batch, 3),
      )
    elif wrapper == "multi_steps":  # Branches with lax.cond: jit it.
      wrap = lambda t: optax.MultiSteps(t, every_k_schedule=2)
      results = helpers.run_pair(wrap(make()), wrap(make_ref()), params, batch, 4)
    else:
      # optax.inject_hyperparams would take the dtype class for a schedule.
      inject = functools.partial(optax.inject_hyperparams, static_args=("dtype_momentum",))
      if not name.startswith("adafactor"):
        inject = optax.inject_hyperparams
      opt = inject(make.func)(**make.keywords)
      ref = inject(make_ref.func)(**make_ref.keywords)
      results = helpers.run(opt, params, batch, 3), helpers.run(ref, params, batch, 3)
    chex.assert_trees_all_close(results[0], results[1], **helpers.TIGHT)

  @parameterized.named_parameters(*helpers.named_product(name=_OPTIMIZERS, dtype=helpers.DTYPES))
  def test_dtype_preserved(self, name, dtype):
    opt, ref = _pair(name)
    dtype = helpers.DTYPES[dtype]
    params = helpers.layer_params(dtype)
    grads = helpers.grad_sequence(1, dtype)[0]

    def two_steps(opt):
      _, state = opt.update(grads, opt.init(params), params)
      return opt.update(grads, state, params)

    # Abstract evaluation: exact dtypes, no compilation.
    out = jax.eval_shape(functools.partial(two_steps, opt))
    ref_out = jax.eval_shape(functools.partial(two_steps, ref))
    # The same shapes and dtypes as stock optax (bf16 updates stay bf16, except
    # where optax itself promotes, e.g. Adafactor's float32 momentum).
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    self.assertEqual(spec(out), spec(ref_out))

  @parameterized.named_parameters(*_NAMES)
  def test_state_through_scan_and_cond(self, name):
    opt = _OPTIMIZERS[name][0]()
    params, batch = helpers.layer_params(), helpers.layer_batch()
    preds = (True, False, True)

    def body(carry, pred):
      p, s = carry
      g = jax.grad(helpers.layer_loss)(p, batch)
      half = jax.tree.map(lambda x: 0.5 * x, g)
      u, s = jax.lax.cond(pred, lambda: opt.update(g, s, p), lambda: opt.update(half, s, p))
      return (optax.apply_updates(p, u), s), None

    scanned = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), jnp.asarray(preds))[0])
    p_scan, s_scan = scanned(params, opt.init(params))
    p, s = params, opt.init(params)  # The same steps, eagerly.
    for pred in preds:
      g = jax.grad(helpers.layer_loss)(p, batch)
      u, s = opt.update(jax.tree.map(lambda x: (1.0 if pred else 0.5) * x, g), s, p)
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_close((p_scan, s_scan), (p, s), **helpers.TIGHT)

  @parameterized.named_parameters(*_NAMES)
  def test_flax_nnx_optimizer(self, name):
    x, y = helpers.layer_batch()

    def loss_fn(model):
      return jnp.mean((jnp.tanh(model(x)) - y) ** 2)

    def train(tx, **kwargs):
      model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      for _ in range(2):
        optimizer.update(model, nnx.grad(loss_fn)(model), **kwargs)
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    make, make_ref = _OPTIMIZERS[name]
    chex.assert_trees_all_close(train(make()), train(make_ref()), **helpers.TIGHT)
    overrides = _OVERRIDES[name]
    chex.assert_trees_all_close(
      train(make(), hyperparams=overrides), train(make_ref(**overrides)), **helpers.TIGHT
    )


# Optimizers for which a per-parameter value of every hyperparameter equals
# running each tensor with its own value (all of them: each is per tensor).
class PerParameterTest(helpers.F64TestCase):
  @parameterized.named_parameters(*_NAMES)
  def test_per_parameter_values_equal_separate_runs(self, name):
    make = _OPTIMIZERS[name][0]
    overrides = _OVERRIDES[name]
    opt = make()
    grads_seq = helpers.grad_sequence()
    # "w" takes the overrides, "b" the defaults.
    mixed = {k: {"w": v, "b": opt.hyperparams[k]} for k, v in overrides.items()}
    u_mixed = helpers.updates_for(opt, grads_seq, hyperparams=mixed)
    u_w = helpers.updates_for(opt, grads_seq, hyperparams=overrides)
    u_b = helpers.updates_for(opt, grads_seq)
    for u, uw, ub in zip(u_mixed, u_w, u_b):
      chex.assert_trees_all_close(u["w"], uw["w"], **helpers.TIGHT)
      chex.assert_trees_all_close(u["b"], ub["b"], **helpers.TIGHT)

  @parameterized.named_parameters(
    ("lion", "lion"), ("nadam", "nadam"), ("amsgrad", "amsgrad"), ("adagrad", "adagrad")
  )
  def test_per_element_learning_rate(self, name):
    opt = _OPTIMIZERS[name][0]()
    grads_seq = helpers.grad_sequence()
    rates = {"w": jnp.asarray([[0.1, 0.2], [0.3, 0.05], [0.0, 1.0]]), "b": jnp.asarray(0.07)}
    u_rates = helpers.updates_for(opt, grads_seq, hyperparams={"learning_rate": rates})
    # Fixed parameters would be needed for linearity in the rate; compare the
    # first step, where the state is still the initial one.
    unit = helpers.updates_for(opt, grads_seq[:1], hyperparams={"learning_rate": 1.0})
    chex.assert_trees_all_close(
      u_rates[0], jax.tree.map(jnp.multiply, rates, unit[0]), **helpers.TIGHT
    )

  def test_trust_ratio_and_block_rms_reject_per_element_values(self):
    params, g = helpers.layer_params(), helpers.grad_sequence(1)[0]
    for opt, hp in (
      (T.scale_by_trust_ratio(), {"trust_coefficient": {"w": jnp.ones((3, 2)), "b": 1.0}}),
      (T.clip_by_block_rms(1.0), {"threshold": {"w": jnp.ones((3, 2)), "b": 1.0}}),
      (
        T.scale_by_factored_rms(min_dim_size_to_factor=2),
        {"decay_rate": {"w": jnp.full((3, 2), 0.8), "b": 0.8}},
      ),
    ):
      with self.assertRaisesRegex(ValueError, "scalar"):
        opt.update(g, opt.init(params), params, hyperparams=hp)


# name -> (factory of the hyperparameter value, hyperparameter, value).
_FD_CASES = (
  ("lion_learning_rate", lambda: T.lion(0.1), "learning_rate", 0.1),
  ("lion_weight_decay", lambda: T.lion(0.1), "weight_decay", 0.1),
  ("lion_smooth_b1", lambda: T.chain(T.scale_by_lion(mode="smooth"), T.scale(0.1)), "b1", 0.9),
  ("nadam_b1", lambda: T.nadam(0.1, eps=1e-3), "b1", 0.9),
  ("nadam_b2", lambda: T.nadam(0.1, eps=1e-3), "b2", 0.99),
  ("adabelief_b1", lambda: T.adabelief(0.1, eps=1e-3), "b1", 0.9),
  ("adabelief_b2", lambda: T.adabelief(0.1, eps=1e-3), "b2", 0.99),
  ("adabelief_eps_root", lambda: T.adabelief(0.1, eps=1e-3), "eps_root", 1e-3),
  ("amsgrad_b2", lambda: T.amsgrad(0.1, eps=1e-3), "b2", 0.99),
  ("amsgrad_eps", lambda: T.amsgrad(0.1, eps=1e-3), "eps", 1e-3),
  ("adagrad_eps", lambda: T.adagrad(0.1), "eps", 1e-2),
  ("adafactor_decay_rate", lambda: T.adafactor(0.1, min_dim_size_to_factor=2), "decay_rate", 0.8),
  (
    "adafactor_clipping",  # The fixed gradients make the unit-RMS clip active.
    lambda: T.adafactor(0.1, min_dim_size_to_factor=2, clipping_threshold=0.5),
    "clipping_threshold",
    0.5,
  ),
  (
    "adafactor_momentum",
    lambda: T.adafactor(0.1, momentum=0.5, dtype_momentum=jnp.float64),
    "momentum",
    0.5,
  ),
  ("lamb_b1", lambda: T.lamb(0.1, eps=1e-3), "b1", 0.9),
  ("lamb_weight_decay", lambda: T.lamb(0.1, weight_decay=0.1), "weight_decay", 0.1),
  ("muon_beta", lambda: T.muon(0.1), "beta", 0.9),
  ("muon_weight_decay", lambda: T.muon(0.1, weight_decay=0.1), "weight_decay", 0.1),
)


# Adafactor's decay schedule runs in float32 (as in optax), whatever the
# dtype of decay_rate: differences need a larger step and looser tolerance.
_FD_STEP_AND_RTOL = {"adafactor_decay_rate": (1e-3, 2e-3)}


class HyperparamGradientTest(helpers.F64TestCase):
  @parameterized.named_parameters(*_FD_CASES)
  def test_grad_matches_finite_differences(self, make, name, value):
    opt = make()
    grads_seq = helpers.grad_sequence()

    def f(h):
      return helpers.weighted_sum(helpers.updates_for(opt, grads_seq, hyperparams={name: h}))

    grad = jax.grad(f)(jnp.asarray(value))
    step, rtol = _FD_STEP_AND_RTOL.get(
      self._testMethodName.split("finite_differences_")[1], (1e-6, 1e-6)
    )
    fd = helpers.central_fd(f, jnp.asarray(value), step * value)
    np.testing.assert_allclose(grad, fd, rtol=rtol, atol=1e-9)
    self.assertGreater(abs(float(grad)), 1e-6)  # Not vacuous.

  def test_lion_sign_has_zero_derivative_in_b1_b2(self):
    opt = T.lion(0.1)
    grads_seq = helpers.grad_sequence()
    for name in ("b1", "b2"):
      grad = jax.grad(
        lambda h, name=name: helpers.weighted_sum(
          helpers.updates_for(opt, grads_seq, hyperparams={name: h})
        )
      )(jnp.asarray(0.9))
      self.assertEqual(float(grad), 0.0)


# ---------------------------------------------------------------------------
# Exactly-zero gradient entries: exact and finite where stock autodiff is NaN.
# ---------------------------------------------------------------------------

_TRAP_OPTIMIZERS = {
  "nadam": (T.nadam, optax.nadam),
  "adabelief_eps_root_0": (
    functools.partial(T.adabelief, eps=1e-8, eps_root=0.0),
    functools.partial(optax.adabelief, eps=1e-8, eps_root=0.0),
  ),
  "amsgrad": (T.amsgrad, optax.amsgrad),
  "adagrad_no_initial_accumulator": (
    functools.partial(T.adagrad, initial_accumulator_value=0.0),
    functools.partial(optax.adagrad, initial_accumulator_value=0.0),
  ),
  "adafactor": (
    functools.partial(T.adafactor, min_dim_size_to_factor=2),
    functools.partial(optax.adafactor, min_dim_size_to_factor=2),
  ),
  "lamb": (T.lamb, optax.lamb),
  "lion": (T.lion, optax.lion),
  "muon": (T.muon, optax.contrib.muon),
}
# Where plain autodiff through stock optax gives NaN (zeros="some": one dead
# input, so a row of the weight gradient is exactly 0; "all": every gradient).
_STOCK_IS_NAN = {
  ("nadam", "some"),
  ("nadam", "all"),
  ("adabelief_eps_root_0", "some"),
  ("adabelief_eps_root_0", "all"),
  ("amsgrad", "some"),
  ("amsgrad", "all"),
  ("adafactor", "all"),
  ("lamb", "some"),
  ("lamb", "all"),
  ("muon", "all"),
}


class ZeroGradientTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *helpers.named_product(name=_TRAP_OPTIMIZERS, zeros=("some", "all"))
  )
  def test_meta_gradient_wrt_learning_rate(self, name, zeros):
    make, make_ref = _TRAP_OPTIMIZERS[name]
    params, batch = helpers.layer_params(), helpers.layer_batch(zeros=zeros)
    if zeros == "all":
      params["b"] = jnp.zeros_like(params["b"])

    def meta_loss(factory, lr):
      iterates, _ = helpers.run(factory(lr), params, batch, 3)
      return helpers.layer_loss(iterates[-1], batch)

    lr = 0.05
    f = functools.partial(meta_loss, make)
    value, grad = jax.value_and_grad(f)(lr)
    ref_value, ref_grad = jax.value_and_grad(functools.partial(meta_loss, make_ref))(lr)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-15)  # Same forward.
    self.assertTrue(np.isfinite(grad), msg=f"grad={grad}")
    np.testing.assert_allclose(grad, helpers.central_fd(f, lr, 1e-6), rtol=1e-6, atol=1e-10)
    if zeros == "some":
      self.assertGreater(abs(float(grad)), 1e-3)  # Not vacuous.
    if (name, zeros) in _STOCK_IS_NAN:
      self.assertTrue(np.isnan(ref_grad), msg="stock optax no longer gives NaN here")
    else:
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-14)


# ---------------------------------------------------------------------------
# stop_gradient_denominator: same trajectory, different (approximate) meta-gradient.
# ---------------------------------------------------------------------------

_STOP_GRADIENT = {
  "adam": T.adam,
  "adamw": T.adamw,
  "nadam": T.nadam,
  "nadamw": T.nadamw,
  "adabelief": T.adabelief,
  "amsgrad": T.amsgrad,
  "lamb": T.lamb,
}


def _adam_with_stopped_denominator(lr, params, batch, steps, b1=0.9, b2=0.999, eps=1e-8):
  """Adam written out, with the denominator under lax.stop_gradient (the reference)."""
  m = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  for t in range(1, steps + 1):
    g = jax.grad(helpers.layer_loss)(params, batch)
    m = jax.tree.map(lambda m, g: (1 - b1) * g + b1 * m, m, g)
    v = jax.tree.map(lambda v, g: (1 - b2) * g**2 + b2 * v, v, g)
    params = jax.tree.map(
      lambda p, m, v: (
        p - lr * (m / (1 - b1**t)) / (jnp.sqrt(jax.lax.stop_gradient(v / (1 - b2**t))) + eps)
      ),
      params,
      m,
      v,
    )
  return params


class StopGradientDenominatorTest(helpers.F64TestCase):
  @parameterized.named_parameters(*((n, n) for n in _STOP_GRADIENT))
  def test_same_trajectory_different_meta_gradient(self, name):
    factory = _STOP_GRADIENT[name]
    params, batch = helpers.layer_params(), helpers.layer_batch()

    def meta_loss(stop, lr):
      iterates, state = helpers.run(factory(lr, stop_gradient_denominator=stop), params, batch, 3)
      return helpers.layer_loss(iterates[-1], batch), (iterates, state)

    (value, aux), grad = jax.value_and_grad(functools.partial(meta_loss, False), has_aux=True)(0.05)
    (sg_value, sg_aux), sg_grad = jax.value_and_grad(
      functools.partial(meta_loss, True), has_aux=True
    )(0.05)
    chex.assert_trees_all_close((sg_value, sg_aux), (value, aux), rtol=0, atol=0)
    self.assertTrue(np.isfinite(sg_grad))
    self.assertGreater(abs(float(sg_grad - grad)), 1e-6 * abs(float(grad)))

  def test_adam_equals_written_out_reference(self):
    params, batch = helpers.layer_params(), helpers.layer_batch()

    def meta_loss(lr):
      iterates, _ = helpers.run(T.adam(lr, stop_gradient_denominator=True), params, batch, 3)
      return helpers.layer_loss(iterates[-1], batch)

    ref = jax.grad(
      lambda lr: helpers.layer_loss(_adam_with_stopped_denominator(lr, params, batch, 3), batch)
    )
    np.testing.assert_allclose(jax.grad(meta_loss)(0.05), ref(0.05), rtol=1e-10)

  def test_finite_at_zero_gradients_without_safe_sqrt(self):
    params, batch = helpers.layer_params(), helpers.layer_batch(zeros="some")

    def meta_loss(lr):
      iterates, _ = helpers.run(T.adam(lr, stop_gradient_denominator=True), params, batch, 3)
      return helpers.layer_loss(iterates[-1], batch)

    self.assertTrue(np.isfinite(jax.grad(meta_loss)(0.05)))


if __name__ == "__main__":
  absltest.main()
