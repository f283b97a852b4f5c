"""The learned optimizers: ``mfo.transforms.mlp_lopt`` and the learned-Adam recipe.

- Conformance: an optax citizen (jit without retracing, ``optax.chain``,
  unknown extra args, ``nnx.Optimizer``, ``lax.scan``, dtypes).
- Stable at initialisation: a small, finite descent step.
- Exact: meta-gradients w.r.t. the weights through ``mfo.unroll`` and
  ``mfo.meta_optimizer`` equal standard mode, hand-written BPTT and central
  finite differences (float64), also with exactly-zero gradient entries.
- Errors name the problem and the fix.
- The meta-training example runs end to end at a tiny size.
"""

import functools
import importlib.util
import json
import pathlib
import sys
import tempfile

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

import mixflow_optax as mfo

T = mfo.transforms
ROOT = pathlib.Path(__file__).resolve().parents[1]
_TIGHT = dict(rtol=1e-12, atol=1e-14)
_EXACT = dict(rtol=1e-9, atol=1e-13)


def _lopt(**kw):
  # A larger output layer than the default, so that the MLP path (not only
  # the skip connection) shapes the updates and their meta-gradients.
  kw = {"hidden_sizes": (8,), "output_init_scale": 0.5, **kw}
  return T.mlp_lopt(jax.random.PRNGKey(0), **kw)


def _params(unused=False):
  rng = np.random.RandomState(0)
  p = {"w": jnp.asarray(0.5 * rng.normal(size=(3, 2))), "b": jnp.asarray([0.1, -0.2])}
  if unused:  # A tensor the loss ignores: its gradient is exactly zero.
    p["unused"] = jnp.asarray([0.3, -0.7])
  return p


def _batches(steps, dead_input=False):
  rng = np.random.RandomState(1)
  x = rng.normal(size=(steps, 4, 3))
  y = 0.5 * rng.normal(size=(steps, 4, 2))
  if dead_input:  # grad w[2, :] is exactly zero at every step.
    x[..., 2] = 0.0
  return jnp.asarray(x), jnp.asarray(y)


def _loss(params, meta, batch):
  del meta
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"] + params["b"][None, :]) - y) ** 2)


def _grad_seq(n=3):
  rng = np.random.RandomState(2)
  return [
    {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(2,)))}
    for _ in range(n)
  ]


def _scaled(weights, c):
  return jax.tree.map(lambda w: c * w, weights)


def _direction(weights, seed=3):
  leaves, treedef = jax.tree.flatten(weights)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _add(w, d, h):
  return jax.tree.map(lambda a, b: a + h * b, w, d)


def _central_fd(f, w, d, h=1e-6):
  return (f(_add(w, d, h)) - f(_add(w, d, -h))) / (2 * h)


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert bool(jnp.all(jnp.isfinite(leaf))), leaf


_MODES = ("mixflow", "standard")


def _unroll(lopt, mode, **kw):
  return mfo.unroll(_loss, lopt, hyperparams_fn=lambda w: w, mode=mode, **kw)


def _bptt(lopt, w, params, state, batches):
  """Plain BPTT: lax.scan of jax.grad + lopt.update, no library machinery."""

  def step(carry, batch):
    p, s = carry
    g = jax.grad(_loss)(p, None, batch)
    u, s = lopt.update(g, s, p, hyperparams=w)
    return (optax.apply_updates(p, u), s), None

  return jax.lax.scan(step, (params, state), batches)[0]


class _X64TestCase(helpers.F64TestCase):
  def setUp(self):
    super().setUp()
    chex.clear_trace_counter()


# ---------------------------------------------------------------------------
# Conformance.
# ---------------------------------------------------------------------------


class ConformanceTest(_X64TestCase):
  def test_is_a_reparam_transformation_with_weights_as_hyperparams(self):
    lopt = _lopt()
    self.assertIsInstance(lopt, T.ReparamTransformation)
    self.assertIsInstance(lopt, optax.GradientTransformationExtraArgs)
    w = lopt.hyperparams
    self.assertEqual(sorted(w), ["hidden_0/b", "hidden_0/w", "out/b", "out/w", "skip/w"])
    self.assertEqual(w["hidden_0/w"].shape, (4 + 2 * 4 + 5, 8))  # 17 features.
    self.assertEqual(w["out/w"].shape, (8, 2))
    w["out/w"] = None  # A copy: editing it leaves the defaults alone.
    self.assertIsNotNone(lopt.hyperparams["out/w"])
    deeper = T.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(16, 16, 4), momentum_decays=(0.9,))
    self.assertEqual(deeper.hyperparams["hidden_0/w"].shape, (4 + 2 + 5, 16))
    self.assertEqual(deeper.hyperparams["hidden_2/w"].shape, (16, 4))

  def test_state(self):
    params = {**_params(), "s": jnp.asarray(1.5)}  # A scalar leaf too.
    lopt = _lopt()
    state = lopt.init(params)
    self.assertIsInstance(state, T.MLPLOptState)
    self.assertEqual(state.count.dtype, jnp.int32)
    self.assertEqual(jax.tree.structure(state.momenta), jax.tree.structure(params))
    self.assertEqual(jax.tree.structure(state.rms), jax.tree.structure(params))
    for p, m, v in zip(*map(jax.tree.leaves, (params, state.momenta, state.rms))):
      self.assertEqual(m.shape, (*p.shape, 4))
      self.assertEqual(v.shape, p.shape)
    grads = jax.tree.map(lambda p: 0.5 * p + 0.1, params)
    updates, state = lopt.update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    self.assertEqual(int(state.count), 1)
    # The momenta and second moment are the moving averages they claim to be.
    for g, m, v in zip(*map(jax.tree.leaves, (grads, state.momenta, state.rms))):
      decays = jnp.asarray([0.5, 0.9, 0.99, 0.999]).reshape((1,) * g.ndim + (4,))
      np.testing.assert_allclose(m, (1 - decays) * g[..., None])
      np.testing.assert_allclose(v, 0.001 * g**2)

  def test_jit_without_retracing_and_default_weights(self):
    lopt, params = _lopt(), _params()
    grads = _grad_seq(2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(g, s, p, w):
      return lopt.update(g, s, p, hyperparams=w)

    w = lopt.hyperparams
    state = lopt.init(params)
    u1, s1 = update(grads[0], state, params, w)
    # No hyperparams: the weights it was built with.
    chex.assert_trees_all_close((u1, s1), lopt.update(grads[0], state, params), **_TIGHT)
    u2, _ = update(grads[1], s1, params, _scaled(w, 0.7))  # New values: no retrace.
    chex.assert_trees_all_close(
      u2, lopt.update(grads[1], s1, params, hyperparams=_scaled(w, 0.7))[0], **_TIGHT
    )
    self.assertFalse(np.allclose(u2["w"], update(grads[1], s1, params, w)[0]["w"]))
    # A subset of the weights replaces only those arrays.
    part = {"out/w": 0.7 * w["out/w"]}
    chex.assert_trees_all_close(
      lopt.update(grads[1], s1, params, hyperparams=part),
      lopt.update(grads[1], s1, params, hyperparams={**w, **part}),
      **_TIGHT,
    )

  def test_unknown_extra_args_are_ignored(self):
    lopt, params = _lopt(), _params()
    g, state = _grad_seq(1)[0], lopt.init(params)
    chex.assert_trees_all_close(
      lopt.update(g, state, params, loss=jnp.asarray(2.0), value=1, grad=g),
      lopt.update(g, state, params),
      **_TIGHT,
    )

  def test_inside_optax_chain(self):
    lopt, params = _lopt(), _params()
    grads = _grad_seq(2)
    clip = optax.clip_by_global_norm(1.0)
    chained = optax.chain(clip, lopt, optax.scale(0.5))
    cs, s = chained.init(params), lopt.init(params)
    for g in grads:
      u_chain, cs = chained.update(g, cs, params)
      clipped, _ = clip.update(g, clip.init(params), params)
      u, s = lopt.update(clipped, s, params)
      chex.assert_trees_all_close(u_chain, _scaled(u, 0.5), **_TIGHT)
    # mixflow_optax's chain exposes the weights and passes them through.
    mchain = T.chain(clip, lopt)
    self.assertEqual(sorted(mchain.hyperparams), sorted(lopt.hyperparams))
    w = _scaled(lopt.hyperparams, 0.3)
    g = grads[0]
    clipped, _ = clip.update(g, clip.init(params), params)
    chex.assert_trees_all_close(
      mchain.update(g, mchain.init(params), params, hyperparams=w)[0],
      lopt.update(clipped, lopt.init(params), params, hyperparams=w)[0],
      **_TIGHT,
    )

  def test_flax_nnx_optimizer_round_trip(self):
    x, y = _batches(1)
    x, y = x[0], y[0]
    lopt = _lopt()
    w = _scaled(lopt.hyperparams, 0.8)

    def loss_fn(model):
      return jnp.mean((jnp.tanh(model(x)) - y) ** 2)

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    loss0 = float(loss_fn(model))
    optimizer = nnx.Optimizer(model, lopt, wrt=nnx.Param)
    state = lopt.init(params)
    for i in range(3):
      kwargs = {"hyperparams": w} if i == 2 else {}  # Passed through to update.
      optimizer.update(model, nnx.grad(loss_fn)(model), **kwargs)
      grads = jax.grad(
        lambda p: jnp.mean((jnp.tanh(x @ p["kernel"] + p["bias"][None, :]) - y) ** 2)
      )(params)
      updates, state = lopt.update(grads, state, params, **kwargs)
      params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params, **_TIGHT)
    self.assertLess(float(loss_fn(model)), loss0)  # It trained (not a vacuous comparison).

  def test_lax_scan_equals_eager_steps(self):
    lopt, params = _lopt(), _params()
    xs, ys = _batches(4)

    def step(carry, batch):
      p, s = carry
      u, s = lopt.update(jax.grad(_loss)(p, None, batch), s, p)
      return (optax.apply_updates(p, u), s), None

    scanned = jax.jit(lambda p: jax.lax.scan(step, (p, lopt.init(p)), (xs, ys))[0])(params)
    carry = (params, lopt.init(params))
    for t in range(4):
      carry, _ = step(carry, (xs[t], ys[t]))
    chex.assert_trees_all_close(scanned, carry, rtol=1e-10, atol=1e-13)
    self.assertEqual(int(scanned[1].count), 4)

  @parameterized.named_parameters(("bf16", jnp.bfloat16), ("f32", jnp.float32))
  def test_dtype_preserved(self, dtype):
    lopt = T.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(4,), dtype=jnp.float32)
    params = jax.tree.map(lambda p: p.astype(dtype), _params())

    def two_steps():
      s = lopt.init(params)
      u, s = lopt.update(params, s, params)
      return lopt.update(params, s, params)

    updates, state = jax.eval_shape(two_steps)
    for leaf in jax.tree.leaves((updates, state.momenta, state.rms)):
      self.assertEqual(leaf.dtype, dtype)
    self.assertEqual(state.count.dtype, jnp.int32)


# ---------------------------------------------------------------------------
# Behaviour at initialisation and NaN safety.
# ---------------------------------------------------------------------------


class InitialisationTest(_X64TestCase):
  def test_first_steps_descend_a_quadratic(self):
    """Default weights: small, finite, descent steps on ill-conditioned quadratics."""
    lopt = T.mlp_lopt(jax.random.PRNGKey(0))  # Everything at its default...
    step_mult = 1e-3

    @jax.jit
    def five_steps(weights, key):
      k_a, k_x = jax.random.split(key)
      scale = jnp.exp(jax.random.uniform(k_a, (6,), minval=-3.0, maxval=3.0))
      loss = lambda p: 0.5 * jnp.sum(scale * p["x"] ** 2) + 0.5 * jnp.sum(p["m"] ** 2)

      def step(carry, _):
        params, state = carry
        g = jax.grad(loss)(params)
        u, state = lopt.update(g, state, params, hyperparams=weights)
        big = optax.tree.max(jax.tree.map(jnp.abs, u))
        return (optax.apply_updates(params, u), state), (loss(params), _dot(u, g), big)

      params = {"x": jax.random.normal(k_x, (6,)), "m": jnp.ones((2, 3))}
      (params, _), (losses, dots, big) = jax.lax.scan(step, (params, lopt.init(params)), length=5)
      return jnp.append(losses, loss(params)), dots, big

    for seed in range(3):  # ... with the initial weights of three seeds.
      weights = T.mlp_lopt(jax.random.PRNGKey(seed)).hyperparams
      losses, dots, big = five_steps(weights, jax.random.PRNGKey(10 + seed))
      _assert_finite((losses, dots, big))
      self.assertTrue(bool(jnp.all(dots < 0)), dots)  # Descent directions.
      self.assertTrue(bool(jnp.all(big < 3 * step_mult)), big)  # Small steps.
      self.assertTrue(bool(jnp.all(jnp.diff(losses) < 0)), losses)


class ZeroGradientTest(_X64TestCase):
  def test_meta_gradients_finite_and_exact_with_zero_gradients(self):
    """Dead inputs and a tensor the loss ignores: exactly-zero gradient entries."""
    lopt, params = _lopt(), _params(unused=True)
    batches = _batches(3, dead_input=True)
    g0 = jax.grad(_loss)(params, None, jax.tree.map(lambda x: x[0], batches))
    self.assertTrue(bool(jnp.all(g0["w"][2] == 0)) and bool(jnp.all(g0["unused"] == 0)))

    def meta_loss(w, mode):
      run = _unroll(lopt, mode)
      p_T, _ = run(w, params, lopt.init(params), batches)
      return _loss(p_T, None, jax.tree.map(lambda x: x[0], batches)) + jnp.sum(p_T["unused"] ** 2)

    w = lopt.hyperparams
    grads = {m: jax.jit(jax.grad(functools.partial(meta_loss, mode=m)))(w) for m in _MODES}
    _assert_finite(grads)
    chex.assert_trees_all_close(grads["mixflow"], grads["standard"], **_EXACT)
    d = _direction(w)
    fd = _central_fd(jax.jit(functools.partial(meta_loss, mode="standard")), w, d)
    np.testing.assert_allclose(_dot(grads["mixflow"], d), fd, rtol=1e-6)
    self.assertGreater(abs(float(fd)), 1e-6)

  def test_forward_over_reverse_of_the_update_at_zero_gradients(self):
    # eps = 1e-4 keeps the curvature at zero entries (on the scale sqrt(eps))
    # within reach of finite differences.
    lopt, params = _lopt(eps=1e-4), _params(unused=True)
    g = {"w": _grad_seq(1)[0]["w"].at[2].set(0.0), "b": jnp.zeros(2), "unused": jnp.zeros(2)}

    def f(g):  # Two updates with gradients g and -0.5 g.
      s = lopt.init(params)
      u1, s = lopt.update(g, s, params)
      u2, _ = lopt.update(_scaled(g, -0.5), s, params)
      return _dot(u1, _direction(params, 4)) + _dot(u2, _direction(params, 5))

    # A Hessian-vector product along a direction that moves the zero entries,
    # against central differences of the gradient.
    v = jax.tree.map(jnp.ones_like, g)
    fwd_rev = jax.jit(lambda g: jax.jvp(jax.grad(f), (g,), (v,))[1])(g)
    _assert_finite(fwd_rev)
    grad_f = jax.jit(jax.grad(f))
    fd = jax.tree.map(
      lambda a, b: (a - b) / 2e-6, grad_f(_add(g, v, 1e-6)), grad_f(_add(g, v, -1e-6))
    )
    chex.assert_trees_all_close(fwd_rev, fd, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(fwd_rev["unused"]))), 1e-3)  # Not vacuous.


# ---------------------------------------------------------------------------
# Exact meta-gradients.
# ---------------------------------------------------------------------------


class ExactnessTest(_X64TestCase):
  def test_unroll_mixflow_standard_bptt_and_finite_differences(self):
    lopt, params = _lopt(), _params()
    batches, val = _batches(3), jax.tree.map(lambda x: x[0] + 0.3, _batches(1))

    def meta_loss(w, mode):
      if mode == "bptt":
        p_T, _ = _bptt(lopt, w, params, lopt.init(params), batches)
      else:
        p_T, _ = _unroll(lopt, mode)(w, params, lopt.init(params), batches)
      return _loss(p_T, None, val)

    w = lopt.hyperparams
    grads = {m: jax.jit(jax.grad(functools.partial(meta_loss, mode=m)))(w) for m in _MODES}
    want = jax.jit(jax.grad(functools.partial(meta_loss, mode="bptt")))(w)
    chex.assert_trees_all_close(grads["mixflow"], want, **_EXACT)
    chex.assert_trees_all_close(grads["standard"], want, **_EXACT)
    for name, leaf in want.items():  # Every weight matters (not vacuous).
      self.assertGreater(float(jnp.max(jnp.abs(leaf))), 1e-8, msg=name)
    f = jax.jit(functools.partial(meta_loss, mode="bptt"))
    for seed in (3, 4):
      d = _direction(w, seed)
      np.testing.assert_allclose(_dot(grads["mixflow"], d), _central_fd(f, w, d), rtol=1e-6)

  def test_meta_optimizer_online_mixflow_standard_bptt_and_finite_differences(self):
    """Two online meta-steps (carried inner state) of mfo.meta_optimizer."""
    lopt, params = _lopt(), _params()
    xs, ys = _batches(6)
    inner = [(xs[:3], ys[:3]), (xs[3:], ys[3:])]
    outer = [(xs[3] + 0.3, ys[3]), (xs[0] - 0.3, ys[0])]
    # An outer "optimizer" that stores the meta-gradient and never moves.
    record = optax.GradientTransformation(
      lambda w: jax.tree.map(jnp.zeros_like, w),
      lambda g, s, w=None: (jax.tree.map(jnp.zeros_like, g), g),
    )

    w = lopt.hyperparams
    steps, states, grads = {}, {}, {}
    for m in _MODES:
      mo = mfo.meta_optimizer(_loss, _loss, lopt, record, hyperparams_fn=lambda w: w, mode=m)
      steps[m] = jax.jit(mo.step)  # One compile, called for both meta-steps.
      states[m] = [mo.init(w, params)]
      for ib, ob in zip(inner, outer):
        state, _ = steps[m](states[m][-1], ib, ob)
        states[m].append(state)
      grads[m] = [s.outer_state for s in states[m][1:]]

    @jax.jit
    def bptt_grad(w, p, s, ib, ob):
      def loss(w):
        p_T, s_T = _bptt(lopt, w, p, s, ib)
        return _loss(p_T, None, ob), (p_T, s_T)

      return jax.grad(loss, has_aux=True)(w)

    carry, want = (params, lopt.init(params)), []
    for ib, ob in zip(inner, outer):
      g, carry = bptt_grad(w, *carry, ib, ob)
      want.append(g)
    for m in _MODES:
      chex.assert_trees_all_close(grads[m], want, **_EXACT)
    chex.assert_trees_all_close(states["mixflow"][2].params, carry[0], **_EXACT)
    self.assertFalse(np.allclose(want[0]["out/w"], want[1]["out/w"]))
    # Finite differences of the second step's outer loss. Truncated BPTT
    # holds the carried inner state fixed, so only the second step's weights
    # are perturbed.
    state1 = states["mixflow"][1]

    def second_outer_loss(w):
      return steps["mixflow"](state1._replace(meta_params=w), inner[1], outer[1])[1]["outer_loss"]

    d = _direction(w)
    fd = _central_fd(second_outer_loss, w, d)
    np.testing.assert_allclose(_dot(grads["mixflow"][1], d), fd, rtol=1e-6)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


class ErrorsTest(_X64TestCase):
  def _update(self, lopt, **kw):
    params = _params()
    return lopt.update(_grad_seq(1)[0], lopt.init(params), params, **kw)

  def test_bad_weights(self):
    lopt = _lopt()
    w = lopt.hyperparams
    with self.assertRaisesRegex(TypeError, r"lopt\.hyperparams"):
      self._update(lopt, hyperparams=list(w.values()))
    with self.assertRaisesRegex(ValueError, r"unknown weight name.*'mlp'.*hidden_0/w"):
      self._update(lopt, hyperparams={"mlp": w})  # Nested under another key.
    other = T.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(16,)).hyperparams
    with self.assertRaisesRegex(
      ValueError, r"'hidden_0/w' has shape \(17, 16\).*expects \(17, 8\).*hidden_sizes=\(8,\)"
    ):
      self._update(lopt, hyperparams=other)
    with self.assertRaisesRegex(TypeError, "floating point"):
      self._update(lopt, hyperparams={"out/b": jnp.zeros(2, jnp.int32)})
    with self.assertRaisesRegex(TypeError, "'out/b' must be an array"):
      self._update(lopt, hyperparams={"out/b": {"a": jnp.zeros(2)}})
    # The same errors through the unrolled loop.
    run = _unroll(lopt, "mixflow")
    params = _params()
    with self.assertRaisesRegex(ValueError, "has shape"):
      run(other, params, lopt.init(params), _batches(2))

  def test_other_misuse(self):
    lopt = _lopt()
    with self.assertRaisesRegex(ValueError, "needs the parameters"):
      lopt.update(_grad_seq(1)[0], lopt.init(_params()))
    with self.assertRaisesRegex(TypeError, "MLPLOptState"):
      lopt.update(_grad_seq(1)[0], optax.EmptyState(), _params())
    with self.assertRaisesRegex(ValueError, "hidden_sizes"):
      T.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(8, 0))
    with self.assertRaisesRegex(ValueError, r"\[0, 1\)"):
      T.mlp_lopt(jax.random.PRNGKey(0), momentum_decays=(0.9, 1.0))


# ---------------------------------------------------------------------------
# Learned-hyperparameter Adam.
# ---------------------------------------------------------------------------


class LearnedAdamTest(_X64TestCase):
  def test_parameterisation_round_trip(self):
    meta = T.init_learned_adam_meta(learning_rate=0.03, b1=0.8, b2=0.99, eps=1e-4)
    self.assertEqual(sorted(meta), ["log_eps", "log_learning_rate", "logit_b1", "logit_b2"])
    hp = T.learned_adam_hyperparams(meta)
    np.testing.assert_allclose(
      [hp["learning_rate"], hp["b1"], hp["b2"], hp["eps"]], [0.03, 0.8, 0.99, 1e-4], rtol=1e-12
    )
    per_param = T.init_learned_adam_meta(learning_rate={"w": 0.1, "b": jnp.full(2, 0.01)})
    hp = T.learned_adam_hyperparams({"log_learning_rate": per_param["log_learning_rate"]})
    self.assertEqual(list(hp), ["learning_rate"])  # Only the keys given.
    np.testing.assert_allclose(hp["learning_rate"]["b"], [0.01, 0.01], rtol=1e-12)
    with self.assertRaisesRegex(ValueError, "log_learning_rate"):
      T.learned_adam_hyperparams({"log_lr": 0.0})

  def test_meta_gradients_of_all_four_equal_finite_differences(self):
    opt, params = T.adam(1e-3), _params()
    batches, val = _batches(4), jax.tree.map(lambda x: x[0] + 0.3, _batches(1))

    def meta_loss(meta, mode):
      run = mfo.unroll(_loss, opt, hyperparams_fn=T.learned_adam_hyperparams, mode=mode)
      p_T, _ = run(meta, params, opt.init(params), batches)
      return _loss(p_T, None, val)

    # eps = 1e-3 keeps its derivative within reach of finite differences.
    meta = T.init_learned_adam_meta(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-3)
    grads = {m: jax.jit(jax.grad(functools.partial(meta_loss, mode=m)))(meta) for m in _MODES}
    chex.assert_trees_all_close(grads["mixflow"], grads["standard"], **_EXACT)
    f = jax.jit(functools.partial(meta_loss, mode="mixflow"))
    for k in meta:
      fd = (f({**meta, k: meta[k] + 1e-6}) - f({**meta, k: meta[k] - 1e-6})) / 2e-6
      np.testing.assert_allclose(grads["mixflow"][k], fd, rtol=1e-5, atol=1e-10, err_msg=k)
      self.assertGreater(abs(float(grads["mixflow"][k])), 1e-7, msg=k)  # Not vacuous.


# ---------------------------------------------------------------------------
# The meta-training example, at a tiny size.
# ---------------------------------------------------------------------------


def _load_example():
  spec = importlib.util.spec_from_file_location(
    "learned_optimizer", ROOT / "examples" / "learned_optimizer.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Dataclasses resolve their module by name.
  spec.loader.exec_module(module)
  return module


class ExampleSmokeTest(helpers.TestCase):
  def test_main_writes_well_formed_finite_results(self):
    lo = _load_example()
    out = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory()))
    argv = "--steps 3 --unroll 2 --truncations 2 --tasks 2 --eval-tasks 2 --eval-steps 6"
    argv += " --hidden 4 --adam-lrs 0.01,0.1 --no-progress"
    results = lo.main([*argv.split(), "--memory-unrolls", "", "--out", str(out)])
    saved = json.loads((out / "lopt_results.json").read_text())
    self.assertEqual(saved["held_out"].keys(), results["held_out"].keys())
    self.assertEqual(saved["config"]["hidden_sizes"], [4])
    self.assertGreater((out / "lopt_curves.png").stat().st_size, 1000)
    records = saved["meta_training"]
    self.assertEqual([r["step"] for r in records], [0, 2])
    for r in records:
      self.assertTrue(all(np.isfinite(v) for v in r.values()), r)
    for name in ("quadratic", "mlp_regression"):
      ev = saved["held_out"][name]
      # Reported at the training horizon (2 x 2 steps) and at the end.
      self.assertEqual(sorted(k for k in ev if k.startswith("step_")), ["step_4", "step_6"])
      for summary in (ev["step_4"], ev["step_6"]):
        self.assertIn(summary["tuned_adam_lr"], (0.01, 0.1))
        self.assertIsInstance(summary["lopt_beats_tuned_adam"], bool)
        self.assertTrue(all(np.isfinite(v) for v in summary["geo_mean_loss"].values()))
      self.assertEqual(set(ev["curves"]), {"learned", "learned_init", "adam_tuned"})
      for curve in ev["curves"].values():
        self.assertEqual(len(curve), 7)
        self.assertTrue(np.all(np.isfinite(curve)))
    self.assertEqual(saved["meta_step_temp_bytes"], {})


if __name__ == "__main__":
  absltest.main()
