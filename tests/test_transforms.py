"""Optax conformance of every hand-written optimizer of ``mixflow_optax.transforms``.

Every entry of ``registry.HAND_WRITTEN_OPTIMIZERS`` (tests/registry.py) must be a drop-in
replacement for the stock optax optimizer it mirrors (same trajectory, same state tree, same
dtypes, same behaviour under jit / scan / cond and inside optax wrappers and flax NNX), and
additionally take ``hyperparams=`` overrides (scalar, per tensor, per element) through which
gradients flow, exactly and finitely even where gradient entries are exactly zero.
"""

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import registry
from absl.testing import absltest, parameterized
from flax import nnx
from jax.flatten_util import ravel_pytree

import mixflow_optax as mfo

T = mfo.transforms
OPTIMIZERS = registry.HAND_WRITTEN_OPTIMIZERS


def _names(predicate=lambda opt: True):
  """``named_parameters`` arguments: the registry entries for which ``predicate`` holds."""
  return tuple((name, name) for name, opt in OPTIMIZERS.items() if predicate(opt))


def _array_overrides(opt):
  """The entry's overrides of hyperparameters whose default is a value (not a schedule)."""
  defaults = opt.make().hyperparams
  return {k: v for k, v in opt.overrides.items() if not callable(defaults[k])}


def _assert_finite(testcase, tree):
  for leaf in jax.tree.leaves(tree):
    testcase.assertTrue(bool(jnp.all(jnp.isfinite(leaf))), msg=f"non-finite: {leaf}")


def _has_nan(tree):
  return any(bool(jnp.any(jnp.isnan(leaf))) for leaf in jax.tree.leaves(tree))


class _X64TestCase(helpers.F64TestCase):
  """Runs every test with 64-bit floats enabled (no global config flip)."""

  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()


# ---------------------------------------------------------------------------
# Drop-in conformance with stock optax, for every optimizer in the registry.
# ---------------------------------------------------------------------------


class ConformanceTest(_X64TestCase):
  @parameterized.named_parameters(*_names())
  def test_trajectory_and_state_match_optax(self, name):
    opt, ref = OPTIMIZERS[name].make(), OPTIMIZERS[name].stock()
    self.assertIsInstance(opt, T.ReparamTransformation)
    self.assertIsInstance(opt, optax.GradientTransformationExtraArgs)
    params, batch = helpers.layer_params(), helpers.layer_batch()
    self.assertEqual(jax.tree.structure(opt.init(params)), jax.tree.structure(ref.init(params)))

    # 20 jitted steps, traced once: no retrace when the values change.
    (iterates, state), (ref_iterates, ref_state) = helpers.run_pair(
      opt, ref, params, batch, 20, wrap=chex.assert_max_traces(n=1)
    )
    chex.assert_trees_all_close(iterates, ref_iterates, **helpers.TIGHT)
    chex.assert_trees_all_equal_structs(state, ref_state)
    chex.assert_trees_all_close(state, ref_state, **helpers.TIGHT)
    # The run actually optimizes (guards against a vacuous comparison).
    self.assertLess(
      float(helpers.layer_loss(iterates[-1], batch)), 0.8 * float(helpers.layer_loss(params, batch))
    )

  @parameterized.named_parameters(*_names())
  def test_overrides_equal_construction_and_jit_does_not_retrace(self, name):
    entry = OPTIMIZERS[name]
    opt = entry.make()
    self.assertContainsSubset(set(entry.overrides), set(opt.hyperparams))
    overrides = _array_overrides(entry)
    params, grads = helpers.layer_params(), helpers.grad_sequence(2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def init(p):
      return opt.init(p)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(g, s, p, hp):
      return opt.update(g, s, p, hyperparams=hp, unknown_extra_arg=1.0)

    state = init(params)
    init(jax.tree.map(lambda x: x + 1, params))
    chex.assert_trees_all_equal_structs(state, opt.init(params))
    chex.assert_trees_all_close(state, opt.init(params), **helpers.TIGHT)

    # Defaults as arrays, then new values: one trace.
    hp0 = {k: jnp.asarray(v) for k, v in opt.hyperparams.items() if not callable(v)}
    _, s1 = update(grads[0], state, params, hp0)
    chex.assert_trees_all_equal_shapes_and_dtypes(s1, state)
    hp1 = {**hp0, **{k: jnp.asarray(v) for k, v in overrides.items()}}
    u2, s2 = update(grads[1], s1, params, hp1)
    ref = entry.stock(**overrides)
    _, r1 = entry.stock().update(grads[0], ref.init(params), params)
    chex.assert_trees_all_close((u2, s2), ref.update(grads[1], r1, params), **helpers.TIGHT)

  @parameterized.named_parameters(*_names())
  def test_unknown_extra_args_are_ignored(self, name):
    opt = OPTIMIZERS[name].make()
    params = helpers.layer_params()
    grads = helpers.grad_sequence(1)[0]
    state = opt.init(params)
    expected = opt.update(grads, state, params)
    actual = opt.update(grads, state, params, foo=1, loss=jnp.asarray(2.0))
    chex.assert_trees_all_close(actual, expected, **helpers.TIGHT)

  @parameterized.named_parameters(
    *helpers.named_product(name=OPTIMIZERS, wrapper=("chain", "multi_steps", "inject_hyperparams"))
  )
  def test_inside_optax_wrappers(self, name, wrapper):
    entry = OPTIMIZERS[name]
    params, batch = helpers.layer_params(), helpers.layer_batch()
    if wrapper == "chain":
      wrap = lambda t: optax.chain(optax.clip(1.0), t, optax.scale(0.5))
      iterates, state = helpers.run(wrap(entry.make()), params, batch, 3)
      ref_iterates, ref_state = helpers.run(wrap(entry.stock()), params, batch, 3)
    elif wrapper == "multi_steps":  # MultiSteps branches with lax.cond: jit it.
      wrap = lambda t: optax.MultiSteps(t, every_k_schedule=2)
      (iterates, state), (ref_iterates, ref_state) = helpers.run_pair(
        wrap(entry.make()), wrap(entry.stock()), params, batch, 4
      )
      chex.assert_trees_all_close(iterates[0], params, **helpers.TIGHT)  # Accumulating.
      self.assertFalse(np.allclose(iterates[1]["w"], params["w"]))
    else:
      inject = functools.partial(optax.inject_hyperparams, static_args=entry.static_args)
      opt = inject(entry.make_fn)(**entry.kwargs)
      ref = inject(entry.stock_fn)(**entry.kwargs)
      p, s, rp, rs = params, opt.init(params), params, ref.init(params)
      self.assertEqual(jax.tree.structure(s), jax.tree.structure(rs))
      iterates, ref_iterates = [], []
      for i in range(3):
        if i == 1 and not callable(entry.kwargs[entry.rate]):
          # Change the learning rate mid-run, the inject_hyperparams way.
          lr = jnp.asarray(0.5 * entry.kwargs[entry.rate])
          s.hyperparams[entry.rate], rs.hyperparams[entry.rate] = lr, lr
        p, s = helpers.step(opt, p, s, batch)
        rp, rs = helpers.step(ref, rp, rs, batch)
        iterates.append(p)
        ref_iterates.append(rp)
      state, ref_state = s, rs
    chex.assert_trees_all_close(iterates, ref_iterates, **helpers.TIGHT)
    chex.assert_trees_all_close(state, ref_state, **helpers.TIGHT)

  @parameterized.named_parameters(*helpers.named_product(name=OPTIMIZERS, dtype=helpers.DTYPES))
  def test_dtype_preserved(self, name, dtype):
    entry = OPTIMIZERS[name]
    dtype = helpers.DTYPES[dtype]
    params = helpers.layer_params(dtype)
    grads = helpers.grad_sequence(1, dtype)[0]

    def two_steps(opt):
      _, state = opt.update(grads, opt.init(params), params)
      return opt.update(grads, state, params)

    # Abstract evaluation: exact dtypes, no compilation.
    out = jax.eval_shape(functools.partial(two_steps, entry.make()))
    ref_out = jax.eval_shape(functools.partial(two_steps, entry.stock()))
    spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    # The same shapes and dtypes as stock optax ...
    self.assertEqual(jax.tree.structure(out), jax.tree.structure(ref_out))
    self.assertEqual(spec(out), spec(ref_out))
    updates, state = out
    self.assertEqual(spec(state), spec(jax.eval_shape(entry.make().init, params)))
    if entry.stock_promotes_dtype:
      return  # ... which promotes some state (Adafactor's float32 momentum).
    # ... and bf16 stays bf16.
    for leaf in jax.tree.leaves(updates):
      self.assertEqual(leaf.dtype, dtype)
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertEqual(leaf.dtype, dtype)

  @parameterized.named_parameters(*_names())
  def test_state_through_scan_and_cond(self, name):
    opt = OPTIMIZERS[name].make()
    params, batch = helpers.layer_params(), helpers.layer_batch()
    state0 = opt.init(params)
    preds = (True, False, True)

    def body(carry, pred):
      p, s = carry
      g = jax.grad(helpers.layer_loss)(p, batch)
      half = jax.tree.map(lambda x: 0.5 * x, g)
      u, s = jax.lax.cond(pred, lambda: opt.update(g, s, p), lambda: opt.update(half, s, p))
      return (optax.apply_updates(p, u), s), None

    scan = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), jnp.asarray(preds))[0])
    p_scan, s_scan = scan(params, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_scan, state0)

    p, s = params, state0  # The same steps, eagerly.
    for pred in preds:
      g = jax.grad(helpers.layer_loss)(p, batch)
      u, s = opt.update(jax.tree.map(lambda x: (1.0 if pred else 0.5) * x, g), s, p)
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_close((p_scan, s_scan), (p, s), **helpers.TIGHT)

  @parameterized.named_parameters(*_names())
  def test_flax_nnx_optimizer(self, name):
    entry = OPTIMIZERS[name]
    x, y = helpers.layer_batch()

    def loss_fn(model):
      return jnp.mean((jnp.tanh(model(x)) - y) ** 2)

    def train(tx, **kwargs):
      model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      for _ in range(3):
        optimizer.update(model, nnx.grad(loss_fn)(model), **kwargs)  # flax >= 0.11 signature.
      return nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer

    params, optimizer = train(entry.make())
    ref_params, ref_optimizer = train(entry.stock())
    chex.assert_trees_all_close(params, ref_params, **helpers.TIGHT)
    self.assertEqual(
      jax.tree.structure(nnx.as_pure(optimizer.opt_state)),
      jax.tree.structure(nnx.as_pure(ref_optimizer.opt_state)),
    )
    overridden, _ = train(entry.make(), hyperparams=entry.overrides)
    chex.assert_trees_all_close(
      overridden, train(entry.stock(**entry.overrides))[0], **helpers.TIGHT
    )

  def test_flax_nnx_optimizer_passes_hyperparams(self):
    x, y = helpers.layer_batch()

    def loss_fn(model):
      return jnp.mean((jnp.tanh(model(x)) - y) ** 2)

    def train(tx, **kwargs):
      model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      for _ in range(2):
        optimizer.update(model, nnx.grad(loss_fn)(model), **kwargs)
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    lr = jnp.asarray(0.03)
    chex.assert_trees_all_close(
      train(T.adam(0.1), hyperparams={"learning_rate": lr}),
      train(optax.adam(0.03)),
      **helpers.TIGHT,
    )

  def test_adamw_pytree_prefix_mask(self):
    params, batch = helpers.layer_params(), helpers.layer_batch()
    for mask in ({"w": True, "b": False}, {"w": False, "b": True}, True):
      iterates, state = helpers.run(T.adamw(0.05, weight_decay=0.3, mask=mask), params, batch, 2)
      ref_iterates, ref_state = helpers.run(
        optax.adamw(0.05, weight_decay=0.3, mask=mask), params, batch, 2
      )
      chex.assert_trees_all_close((iterates, state), (ref_iterates, ref_state), **helpers.TIGHT)


# ---------------------------------------------------------------------------
# 4 (continued): optax.inject_hyperparams around the mixflow_optax factories.
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Reparameterised use: hyperparams= overrides, per-parameter values.
# ---------------------------------------------------------------------------


class ReparamTest(_X64TestCase):
  def test_hyperparams_property(self):
    opt = T.adam(0.1)
    self.assertEqual(
      dict(opt.hyperparams),
      {"learning_rate": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0},
    )
    self.assertIsInstance(opt.hyperparams, dict)
    opt.hyperparams["b1"] = 0.5  # A copy: editing it leaves the defaults alone.
    self.assertEqual(opt.hyperparams["b1"], 0.9)
    self.assertEqual(sorted(T.sgd(0.1).hyperparams), ["learning_rate"])
    self.assertEqual(sorted(T.sgd(0.1, momentum=0.9).hyperparams), ["learning_rate", "momentum"])
    self.assertEqual(
      sorted(T.adamw(0.1).hyperparams),
      ["b1", "b2", "eps", "eps_root", "learning_rate", "weight_decay"],
    )
    self.assertEqual(
      sorted(T.chain(optax.clip_by_global_norm(1.0), T.rmsprop(0.1, momentum=0.9)).hyperparams),
      ["decay", "eps", "learning_rate", "momentum"],
    )

  @parameterized.named_parameters(*_names())
  def test_override_equals_construction(self, name):
    entry = OPTIMIZERS[name]
    overrides = entry.overrides
    grads_seq = helpers.grad_sequence()
    expected = helpers.updates_for(entry.make(**overrides), grads_seq)
    actual = helpers.updates_for(entry.make(), grads_seq, hyperparams=overrides)
    chex.assert_trees_all_close(actual, expected, **helpers.TIGHT)
    as_arrays = {k: jnp.asarray(v) for k, v in overrides.items()}  # Scalar jnp arrays.
    chex.assert_trees_all_close(
      helpers.updates_for(entry.make(), grads_seq, hyperparams=as_arrays),
      expected,
      **helpers.TIGHT,
    )
    # Omitted names keep their defaults; the defaults are not mutated.
    chex.assert_trees_all_close(
      helpers.updates_for(entry.make(), grads_seq, hyperparams={}),
      helpers.updates_for(entry.make(), grads_seq),
      **helpers.TIGHT,
    )

  @parameterized.named_parameters(*_names(lambda opt: opt.leafwise))
  def test_per_parameter_values_equal_separate_runs(self, name):
    entry = OPTIMIZERS[name]
    opt = entry.make()
    # Scalars-only hyperparameters (a global clipping norm) stay scalars.
    values = {k: v for k, v in _array_overrides(entry).items() if k not in entry.global_hyperparams}
    self.assertNotEmpty(values)
    grads_seq = helpers.grad_sequence()
    # "w" takes the overrides, "b" the defaults.
    mixed = {k: {"w": v, "b": opt.hyperparams[k]} for k, v in values.items()}
    u_mixed = helpers.updates_for(opt, grads_seq, hyperparams=mixed)
    u_w = helpers.updates_for(opt, grads_seq, hyperparams=values)
    u_b = helpers.updates_for(opt, grads_seq)
    for u, uw, ub in zip(u_mixed, u_w, u_b):
      chex.assert_trees_all_close(u["w"], uw["w"], **helpers.TIGHT)
      chex.assert_trees_all_close(u["b"], ub["b"], **helpers.TIGHT)
    # Not vacuous (Muon's adam_* hyperparameters act on the vectors only).
    self.assertFalse(all(np.allclose(u_w[-1][k], u_b[-1][k]) for k in ("w", "b")))

  @parameterized.named_parameters(*_names(lambda opt: opt.per_element_rates))
  def test_per_element_learning_rate(self, name):
    opt = OPTIMIZERS[name].make()
    # Fixed gradients and parameters: every update is linear in the final
    # learning rate, element by element.
    grads_seq = helpers.grad_sequence()
    params = helpers.layer_params()
    state = opt.init(params)
    unit_state = state
    rates = {
      "w": jnp.asarray([[0.1, 0.2], [0.3, 0.05], [0.0, 1.0]]),
      "b": jnp.asarray(0.07),  # A scalar for one leaf, an array for the other.
    }
    broadcast = {"w": jnp.asarray([[0.1, 0.2]]), "b": jnp.asarray([0.3, 0.4])}
    bstate = state
    for g in grads_seq:
      u, state = opt.update(g, state, params, hyperparams={"learning_rate": rates})
      unit, unit_state = opt.update(g, unit_state, params, hyperparams={"learning_rate": 1.0})
      ub, bstate = opt.update(g, bstate, params, hyperparams={"learning_rate": broadcast})
      chex.assert_trees_all_close(u, jax.tree.map(jnp.multiply, rates, unit), **helpers.TIGHT)
      chex.assert_trees_all_close(ub, jax.tree.map(jnp.multiply, broadcast, unit), **helpers.TIGHT)
      for leaf, ref_leaf in zip(jax.tree.leaves(u), jax.tree.leaves(unit)):
        self.assertEqual(leaf.shape, ref_leaf.shape)

  def test_per_element_rates_in_other_hyperparams(self):
    """Per-element b1 / momentum / decay equal running each value separately."""
    grads_seq = helpers.grad_sequence()
    for opt, name, vals in (
      (T.adam(0.1), "b1", (0.5, 0.9)),
      (T.sgd(0.1, momentum=0.9), "momentum", (0.2, 0.9)),
      (T.rmsprop(0.1), "decay", (0.5, 0.95)),
    ):
      lo, hi = vals
      mask = {"w": jnp.asarray([[True, False], [False, True], [True, True]]), "b": False}
      per_elem = jax.tree.map(lambda m: jnp.where(m, lo, hi), mask)
      mixed = helpers.updates_for(opt, grads_seq, hyperparams={name: per_elem})
      u_lo = helpers.updates_for(opt, grads_seq, hyperparams={name: lo})
      u_hi = helpers.updates_for(opt, grads_seq, hyperparams={name: hi})
      for u, a, b in zip(mixed, u_lo, u_hi):
        expected = jax.tree.map(lambda m, x, y: jnp.where(m, x, y), mask, a, b)
        chex.assert_trees_all_close(u, expected, **helpers.TIGHT)

  def test_integer_and_low_precision_hyperparams_keep_dtype(self):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), helpers.layer_params())
    grads = jax.tree.map(lambda p: p.astype(jnp.float32), helpers.grad_sequence(1)[0])
    for opt, hp in (
      (T.sgd(0.1), {"learning_rate": 1}),
      (T.sgd(0.1), {"learning_rate": jnp.asarray(0.5, jnp.float64)}),
      (T.adam(0.1), {"learning_rate": jnp.asarray(0.5, jnp.float64), "b1": 0}),
      (
        T.chain(T.clip_by_global_norm(1.0), T.sgd(0.1)),
        {"max_norm": jnp.asarray(0.1, jnp.float64)},
      ),
    ):
      updates, state = opt.update(grads, opt.init(params), params, hyperparams=hp)
      for leaf in jax.tree.leaves((updates, state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          self.assertEqual(leaf.dtype, jnp.float32)

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


# ---------------------------------------------------------------------------
# Gradients with respect to hyperparameters, against central finite differences.
# ---------------------------------------------------------------------------


def _entry(name, **kwargs):
  """A registry entry's factory with construction changes (e.g. a larger eps)."""
  return functools.partial(OPTIMIZERS[name].make, **kwargs)


# name -> (factory, hyperparameter, value, finite-difference step relative to value, rtol).
_FD_CASES = (
  ("adam_learning_rate", _entry("adam", learning_rate=0.1, eps=1e-3), "learning_rate", 0.1),
  ("adam_beta_one", _entry("adam", learning_rate=0.1, eps=1e-3), "b1", 0.9),
  ("adam_beta_two", _entry("adam", learning_rate=0.1, eps=1e-3), "b2", 0.99),
  ("adam_eps", _entry("adam", learning_rate=0.1, eps=1e-3), "eps", 1e-3),
  ("adam_nesterov_beta_one", _entry("adam", learning_rate=0.1, eps=1e-3, nesterov=True), "b1", 0.9),
  ("rmsprop_learning_rate", _entry("rmsprop", learning_rate=0.1, eps=1e-3), "learning_rate", 0.1),
  ("rmsprop_decay", _entry("rmsprop", learning_rate=0.1, eps=1e-3), "decay", 0.9),
  ("rmsprop_eps", _entry("rmsprop", learning_rate=0.1, eps=1e-3), "eps", 1e-3),
  ("rmsprop_centered_decay", _entry("rmsprop_centered", learning_rate=0.1), "decay", 0.9),
  ("sgd_momentum", _entry("sgd_momentum", learning_rate=0.1), "momentum", 0.9),
  ("sgd_nesterov_momentum", _entry("sgd_nesterov", learning_rate=0.1), "momentum", 0.9),
  ("adamw_weight_decay", _entry("adamw", learning_rate=0.1), "weight_decay", 0.1),
  # The fixed gradients have global norm ~3: clipping active at 1, inactive at 10.
  ("clip_active", _entry("mfo_clip_sgd", learning_rate=0.1), "max_norm", 1.0),
  ("clip_inactive", _entry("mfo_clip_sgd", learning_rate=0.1), "max_norm", 10.0),
  (
    "lion_learning_rate",
    _entry("lion", learning_rate=0.1, weight_decay=1e-3),
    "learning_rate",
    0.1,
  ),
  ("lion_weight_decay", _entry("lion", learning_rate=0.1), "weight_decay", 0.1),
  # The differentiable surrogate of Lion's sign (a building block, not an alias).
  (
    "lion_smooth_beta_one",
    lambda: T.chain(T.scale_by_lion(mode="smooth"), T.scale(0.1)),
    "b1",
    0.9,
  ),
  ("nadam_beta_one", _entry("nadam", learning_rate=0.1, eps=1e-3), "b1", 0.9),
  ("nadam_beta_two", _entry("nadam", learning_rate=0.1, eps=1e-3), "b2", 0.99),
  ("adabelief_beta_one", _entry("adabelief", learning_rate=0.1, eps=1e-3), "b1", 0.9),
  ("adabelief_beta_two", _entry("adabelief", learning_rate=0.1, eps=1e-3), "b2", 0.99),
  ("adabelief_eps_root", _entry("adabelief", learning_rate=0.1, eps=1e-3), "eps_root", 1e-3),
  ("amsgrad_beta_two", _entry("amsgrad", learning_rate=0.1, eps=1e-3), "b2", 0.99),
  ("amsgrad_eps", _entry("amsgrad", learning_rate=0.1, eps=1e-3), "eps", 1e-3),
  ("adagrad_eps", _entry("adagrad", learning_rate=0.1), "eps", 1e-2),
  # Adafactor's decay schedule runs in float32 (as in optax), whatever the dtype of decay_rate:
  # differences need a larger step and a looser tolerance.
  ("adafactor_decay_rate", _entry("adafactor", learning_rate=0.1), "decay_rate", 0.8, 1e-3, 2e-3),
  (
    "adafactor_clipping",  # The fixed gradients make the unit-RMS clip active.
    _entry("adafactor", learning_rate=0.1, clipping_threshold=0.5),
    "clipping_threshold",
    0.5,
  ),
  (
    "adafactor_momentum",
    _entry(
      "adafactor",
      learning_rate=0.1,
      min_dim_size_to_factor=128,
      momentum=0.5,
      dtype_momentum=jnp.float64,
    ),
    "momentum",
    0.5,
  ),
  ("lamb_beta_one", _entry("lamb", learning_rate=0.1, eps=1e-3, weight_decay=0.0), "b1", 0.9),
  ("lamb_weight_decay", _entry("lamb", learning_rate=0.1), "weight_decay", 0.1),
  ("muon_beta", _entry("muon", learning_rate=0.1), "beta", 0.9),
  ("muon_weight_decay", _entry("muon", learning_rate=0.1, weight_decay=0.1), "weight_decay", 0.1),
)


class HyperparamGradientTest(_X64TestCase):
  @parameterized.named_parameters(*_FD_CASES)
  def test_grad_matches_finite_differences(self, make, name, value, step=1e-6, rtol=1e-6):
    opt = make()
    grads_seq = helpers.grad_sequence()

    def f(h):
      return helpers.weighted_sum(helpers.updates_for(opt, grads_seq, hyperparams={name: h}))

    grad = jax.grad(f)(jnp.asarray(value))
    fd = helpers.central_fd(f, jnp.asarray(value), step * value)
    self.assertTrue(np.isfinite(grad))
    np.testing.assert_allclose(grad, fd, rtol=rtol, atol=1e-9)
    if name == "max_norm" and value > 5:
      self.assertEqual(float(grad), 0.0)  # Inactive clipping: no dependence.
    else:
      self.assertGreater(abs(float(grad)), 1e-6)  # Not vacuous.

  def test_lion_sign_has_zero_derivative_in_b1_b2(self):
    opt = OPTIMIZERS["lion"].make(learning_rate=0.1)
    grads_seq = helpers.grad_sequence()
    for name in ("b1", "b2"):
      grad = jax.grad(
        lambda h, name=name: helpers.weighted_sum(
          helpers.updates_for(opt, grads_seq, hyperparams={name: h})
        )
      )(jnp.asarray(0.9))
      self.assertEqual(float(grad), 0.0)

  def test_grad_of_per_parameter_learning_rates(self):
    opt = T.adam(0.1)
    grads_seq = helpers.grad_sequence()
    rates = {"w": jnp.full((3, 2), 0.1), "b": jnp.asarray(0.05)}

    def f(r):
      return helpers.weighted_sum(
        helpers.updates_for(opt, grads_seq, hyperparams={"learning_rate": r})
      )

    grad = jax.grad(f)(rates)
    fd_b = helpers.central_fd(lambda b: f({"w": rates["w"], "b": b}), rates["b"], 1e-6)
    np.testing.assert_allclose(grad["b"], fd_b, rtol=1e-7)
    self.assertEqual(grad["w"].shape, (3, 2))
    e = jnp.zeros((3, 2)).at[1, 0].set(1.0)
    fd_w10 = helpers.central_fd(lambda t: f({"w": rates["w"] + t * e, "b": rates["b"]}), 0.0, 1e-6)
    np.testing.assert_allclose(grad["w"][1, 0], fd_w10, rtol=1e-7)

  def test_grad_through_unrolled_training(self):
    """Meta-gradient of the loss after a few steps, w.r.t. lr and b1."""
    opt = T.adam(0.05)
    params, batch = helpers.layer_params(), helpers.layer_batch()

    def meta_loss(hp):
      iterates, _ = helpers.run(opt, params, batch, 3, hyperparams=hp)
      return helpers.layer_loss(iterates[-1], batch)

    hp = {"learning_rate": jnp.asarray(0.05), "b1": jnp.asarray(0.9)}
    grad = jax.grad(meta_loss)(hp)
    for k in hp:
      fd = helpers.central_fd(lambda v, k=k: meta_loss({**hp, k: v}), hp[k], 1e-6)
      np.testing.assert_allclose(grad[k], fd, rtol=1e-6)


# ---------------------------------------------------------------------------
# Errors and namespacing.
# ---------------------------------------------------------------------------


class ErrorsTest(_X64TestCase):
  def _update(self, opt, **kw):
    params = helpers.layer_params()
    return opt.update(helpers.grad_sequence(1)[0], opt.init(params), params, **kw)

  def test_unknown_name_lists_valid_names(self):
    with self.assertRaisesRegex(ValueError, "learning_rat") as cm:
      self._update(T.adam(0.1), hyperparams={"learning_rat": 0.1})
    self.assertIn("['b1', 'b2', 'eps', 'eps_root', 'learning_rate']", str(cm.exception))
    with self.assertRaisesRegex(ValueError, r"momentum"):  # Built without momentum.
      self._update(T.sgd(0.1), hyperparams={"momentum": 0.9})
    with self.assertRaisesRegex(ValueError, r"\['learning_rate', 'momentum'\]"):
      self._update(T.sgd(0.1, momentum=0.9), hyperparams={"decay": 0.9})

  def test_unknown_name_under_rename_lists_public_names(self):
    opt = T.rename_hyperparams(T.trace(0.9), {"decay": "momentum"})
    self.assertEqual(dict(opt.hyperparams), {"momentum": 0.9})
    with self.assertRaisesRegex(ValueError, r"\['momentum'\]"):
      self._update(opt, hyperparams={"decay": 0.5})  # The inner name is not public.
    chex.assert_trees_all_close(
      self._update(opt, hyperparams={"momentum": 0.5}),
      self._update(T.trace(0.5)),
      **helpers.TIGHT,
    )

  def test_wrong_structure(self):
    with self.assertRaisesRegex(ValueError, "structure"):
      self._update(T.adam(0.1), hyperparams={"learning_rate": {"w": 0.1}})
    with self.assertRaisesRegex(ValueError, "structure"):
      self._update(T.sgd(0.1, momentum=0.9), hyperparams={"momentum": [0.9, 0.9]})

  def test_non_broadcastable_shape(self):
    with self.assertRaisesRegex(ValueError, "broadcast"):
      self._update(T.adam(0.1), hyperparams={"learning_rate": {"w": jnp.ones((2, 3)), "b": 0.1}})
    with self.assertRaisesRegex(ValueError, "broadcast"):
      self._update(T.adam(0.1), hyperparams={"b1": {"w": 0.9, "b": jnp.full((2, 2), 0.9)}})

  def test_other_misuse(self):
    with self.assertRaises(TypeError):
      self._update(T.adam(0.1), hyperparams=[("learning_rate", 0.1)])
    with self.assertRaises(TypeError):  # Schedules only as the constructor's rate.
      self._update(T.sgd(0.1), hyperparams={"learning_rate": registry.SCHEDULE})
    with self.assertRaisesRegex(ValueError, "scalar"):
      self._update(T.clip_by_global_norm(1.0), hyperparams={"max_norm": jnp.ones(2)})
    with self.assertRaises(ValueError):  # add_decayed_weights needs params.
      T.adamw(0.1).update(helpers.layer_params(), T.adamw(0.1).init(helpers.layer_params()))

  def test_duplicate_names_in_chain(self):
    with self.assertRaisesRegex(ValueError, "named_chain"):
      T.chain(T.sgd(0.1), T.adam(0.1))
    with self.assertRaisesRegex(ValueError, "learning_rate"):
      T.chain(T.scale_by_learning_rate(0.1), T.scale_by_learning_rate(0.2))
    with self.assertRaisesRegex(ValueError, "unique"):
      T.named_chain(("a", T.sgd(0.1)), ("a", T.sgd(0.2)))

  def test_named_chain_namespacing(self):
    opt = T.named_chain(
      ("a", T.scale_by_learning_rate(0.1, flip_sign=False)),
      ("clip", optax.clip(10.0)),  # Stock optax members have no hyperparameters.
      ("b", T.scale_by_learning_rate(0.5, flip_sign=False)),
    )
    self.assertEqual(sorted(opt.hyperparams), ["a/learning_rate", "b/learning_rate"])
    g = helpers.grad_sequence(1)[0]
    state = opt.init(helpers.layer_params())
    u, _ = opt.update(g, state)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: 0.05 * x, g), **helpers.TIGHT)
    u, _ = opt.update(g, state, hyperparams={"a/learning_rate": 0.2})
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: 0.1 * x, g), **helpers.TIGHT)
    with self.assertRaisesRegex(ValueError, "a/learning_rate"):
      opt.update(g, state, hyperparams={"learning_rate": 0.2})
    # named_chain of the building blocks is optax.adam, with namespaced names.
    adam = T.named_chain(("adam", T.scale_by_adam()), ("lr", T.scale_by_learning_rate(0.05)))
    params, batch = helpers.layer_params(), helpers.layer_batch()
    iterates, _ = helpers.run(adam, params, batch, 3)
    ref_iterates, _ = helpers.run(optax.adam(0.05), params, batch, 3)
    chex.assert_trees_all_close(iterates, ref_iterates, **helpers.TIGHT)
    iterates, _ = helpers.run(
      adam, params, batch, 3, hyperparams={"lr/learning_rate": 0.01, "adam/b1": 0.5}
    )
    ref_iterates, _ = helpers.run(optax.adam(0.01, b1=0.5), params, batch, 3)
    chex.assert_trees_all_close(iterates, ref_iterates, **helpers.TIGHT)


# ---------------------------------------------------------------------------
# The zero-gradient trap: exact and finite where stock autodiff gives NaN.
# ---------------------------------------------------------------------------

# name -> (registry entry, construction changes, zero patterns for which plain autodiff through
# stock optax gives a NaN learning-rate meta-gradient). zeros="some": one dead input, so a row of
# the weight gradient is exactly 0 at every step; "all": every gradient is exactly 0.
_TRAP_CASES = {
  "adam": ("adam", {}, ("some", "all")),
  "adamw": ("adamw", {}, ("some", "all")),
  "rmsprop_eps_outside_sqrt": ("rmsprop", {"eps_in_sqrt": False}, ("some", "all")),
  # The global norm is positive unless every entry is 0.
  "clip_sgd": ("mfo_clip_sgd", {}, ("all",)),
  "nadam": ("nadam", {}, ("some", "all")),
  "adabelief_eps_root_zero": ("adabelief", {"eps": 1e-8, "eps_root": 0.0}, ("some", "all")),
  "amsgrad": ("amsgrad", {}, ("some", "all")),
  "adagrad_no_initial_accumulator": ("adagrad", {"initial_accumulator_value": 0.0}, ()),
  "adafactor": ("adafactor", {}, ("all",)),
  "lamb": ("lamb", {"weight_decay": 0.0}, ("some", "all")),
  "lion": ("lion", {"weight_decay": 1e-3}, ()),
  "muon": ("muon", {}, ("all",)),
}
# d(updates)/d(gradients) at zero entries: eps=1e-3 keeps the (finite, 1/eps-sized) derivative at
# zero entries within reach of central differences.
_GRADIENT_INPUT_CASES = ("adam", "adamw", "rmsprop_eps_outside_sqrt", "clip_sgd")


class ZeroGradientTest(_X64TestCase):
  @parameterized.named_parameters(*helpers.named_product(name=_TRAP_CASES, zeros=("some", "all")))
  def test_meta_gradient_wrt_learning_rate(self, name, zeros):
    entry, kwargs, stock_nan = _TRAP_CASES[name]
    make = lambda lr: OPTIMIZERS[entry].make(learning_rate=lr, **kwargs)
    make_ref = lambda lr: OPTIMIZERS[entry].stock(learning_rate=lr, **kwargs)
    params, batch = helpers.layer_params(), helpers.layer_batch(zeros=zeros)
    if zeros == "all":
      params["b"] = jnp.zeros_like(params["b"])
    g0 = jax.grad(helpers.layer_loss)(params, batch)
    if zeros == "some":
      self.assertTrue(bool(jnp.all(g0["w"][2] == 0)) and bool(jnp.all(g0["w"][:2] != 0)))
    else:
      self.assertTrue(all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g0)))

    def meta_loss(factory, lr):
      iterates, _ = helpers.run(factory(lr), params, batch, 3)
      return helpers.layer_loss(iterates[-1], batch)

    lr = 0.05
    f = functools.partial(meta_loss, make)
    f_ref = functools.partial(meta_loss, make_ref)
    value, grad = jax.value_and_grad(f)(lr)
    ref_value, ref_grad = jax.value_and_grad(f_ref)(lr)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-15)  # Same forward.
    self.assertTrue(np.isfinite(grad), msg=f"grad={grad}")
    np.testing.assert_allclose(grad, helpers.central_fd(f, lr, 1e-6), rtol=1e-6, atol=1e-10)
    if zeros == "some":
      self.assertGreater(abs(float(grad)), 1e-3)  # Not vacuous.
    if zeros in stock_nan:
      self.assertTrue(np.isnan(ref_grad), msg="stock optax no longer gives NaN here")
    else:
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-8)

  @parameterized.named_parameters(
    *helpers.named_product(name=_GRADIENT_INPUT_CASES, zeros=("some", "all"))
  )
  def test_gradient_wrt_gradient_input(self, name, zeros):
    """d(updates)/d(gradients) at gradients with exactly-zero entries."""
    entry, kwargs, _ = _TRAP_CASES[name]
    if name != "clip_sgd":
      kwargs = {**kwargs, "eps": 1e-3}
    make = lambda lr: OPTIMIZERS[entry].make(learning_rate=lr, **kwargs)
    make_ref = lambda lr: OPTIMIZERS[entry].stock(learning_rate=lr, **kwargs)
    g = helpers.grad_sequence(1)[0]
    if zeros == "some":
      g = {"w": g["w"].at[1].set(0.0), "b": g["b"].at[0].set(0.0)}
    else:
      g = jax.tree.map(jnp.zeros_like, g)
    coefficients = (1.0, -0.5, 2.0)  # Three steps with gradients c_t * g.

    def f(factory, g):
      grads_seq = [jax.tree.map(lambda x, c=c: c * x, g) for c in coefficients]
      return helpers.weighted_sum(helpers.updates_for(factory(0.1), grads_seq))

    value, grad = jax.value_and_grad(functools.partial(f, make))(g)
    ref_value, ref_grad = jax.value_and_grad(functools.partial(f, make_ref))(g)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-15)  # Same forward.
    _assert_finite(self, grad)

    # Central differences in every coordinate at once (vmapped). Along a zero
    # coordinate the function is a*h / (b*|h| + eps), whose derivative at 0
    # is a/eps: a tiny step resolves it.
    flat, unravel = ravel_pytree(g)
    flat_grad, _ = ravel_pytree(grad)
    steps = jnp.where(flat != 0, 1e-6, 1e-9)
    shifts = jnp.diag(steps)
    f_flat = jax.jit(jax.vmap(lambda x: f(make, unravel(x))))
    fd = (f_flat(flat[None] + shifts) - f_flat(flat[None] - shifts)) / (2 * steps)
    np.testing.assert_allclose(flat_grad, fd, rtol=1e-5, atol=1e-6)
    if name != "clip_sgd":  # The derivative along zero coordinates is ~1/eps.
      self.assertGreater(float(jnp.max(jnp.abs(jnp.where(flat == 0, flat_grad, 0)))), 10.0)

    stock_nan = name != "clip_sgd" or zeros == "all"
    self.assertEqual(_has_nan(ref_grad), stock_nan)
    if not stock_nan:
      chex.assert_trees_all_close(grad, ref_grad, rtol=1e-10, atol=1e-12)

  def test_safe_sqrt(self):
    x = jnp.asarray([0.0, 4.0])
    np.testing.assert_array_equal(T.safe_sqrt(x), jnp.sqrt(x))
    np.testing.assert_array_equal(jax.grad(lambda x: T.safe_sqrt(x).sum())(x), [0.0, 0.25])
    np.testing.assert_array_equal(jax.jvp(T.safe_sqrt, (x,), (jnp.ones(2),))[1], [0.0, 0.25])
    hess = jax.hessian(lambda x: T.safe_sqrt(x).sum())(x)
    _assert_finite(self, hess)
    self.assertTrue(_has_nan(jax.grad(lambda x: (0 * jnp.sqrt(x)).sum())(x)))


# ---------------------------------------------------------------------------
# stop_gradient_denominator: same trajectory, different (approximate) meta-gradient.
# ---------------------------------------------------------------------------


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
  @parameterized.named_parameters(*_names(lambda opt: opt.stop_gradient_denominator))
  def test_same_trajectory_different_meta_gradient(self, name):
    factory = lambda lr, **kw: OPTIMIZERS[name].make(learning_rate=lr, **kw)
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


class ListParamsTest(helpers.TestCase):
  def test_params_given_as_a_list_of_layers(self):
    """Lists are ordinary pytrees: state moments that are lists are not per-leaf columns."""
    params = [{"w": jnp.ones((2, 3))}, {"w": jnp.ones((3,)), "b": jnp.zeros(())}]
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p) + 0.01, params)
    mask = [{"w": True}, {"w": False, "b": True}]
    for name, kwargs in (
      ("adam", {}),
      ("sgd_nesterov", {}),
      ("rmsprop_centered", {"momentum": 0.9}),
      ("adamw_mask", {"mask": mask}),
    ):
      entry = OPTIMIZERS[name]
      ours, stock = (
        entry.make(learning_rate=0.1, **kwargs),
        entry.stock(learning_rate=0.1, **kwargs),
      )
      s1, s2 = ours.init(params), stock.init(params)
      for _ in range(2):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = stock.update(grads, s2, params)
      chex.assert_trees_all_close(u1, u2, rtol=1e-6)
    # Per-layer learning rates given as a list, like the params.
    rates = jax.tree.map(lambda p: jnp.asarray(0.5), params)
    opt = mfo.transforms.sgd(0.1)
    u, _ = opt.update(grads, opt.init(params), params, hyperparams={"learning_rate": rates})
    chex.assert_trees_all_close(u, jax.tree.map(lambda g: -0.5 * g, grads))


if __name__ == "__main__":
  absltest.main()
