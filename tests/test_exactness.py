"""Meta-gradients equal plain BPTT through stock optax, for every optimizer of the registry.

The reference is written independently of the library: a ``lax.scan`` of ``jax.grad`` + stock
optax steps, differentiated by ``jax.grad`` (reverse-over-reverse). Everything runs in float64;
agreement is required to 1e-10 relative. The cases are ``registry.design()``: every optimizer
(tests/registry.py) meets every mode (mixflow, standard, first_order, forward) and every
meta-parameter kind it supports, without the full product; ``DesignTest`` checks that. Mixflow is
also checked against central finite differences and closed forms, and where inner gradients have
exactly-zero entries (stock optax: NaN) against finite differences.
"""

import collections
import functools
import itertools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import registry
from absl.testing import absltest, parameterized

import mixflow_optax as mfo


def _meta_loss_parts(opt_name, kind_name):
  opt, kind = registry.OPTIMIZERS[opt_name], registry.META_KINDS[kind_name]
  return opt, kind, helpers.inner_loss(kind.weighted_loss), kind.hyperparams_fn(opt)


@functools.cache
def _reference_meta_gradient(opt_name, kind_name, T, first_order=False):
  """Plain BPTT through stock optax; cached (the design rarely repeats a triple)."""
  opt, kind, loss, _ = _meta_loss_parts(opt_name, kind_name)
  with jax.enable_x64(True):
    params, batches, outer = helpers.exactness_problem(T)
    meta = kind.init(opt, params)
    stock = functools.partial(kind.stock, opt)
    ref = helpers.bptt_meta_loss(stock, loss, first_order=first_order)
    return jax.device_get(jax.jit(jax.grad(ref, argnums=(0, 1)))(meta, params, batches, outer))


def _meta_gradient(case, meta, params, batches, outer):
  """``d outer / d (meta, params0)`` as the library computes it in ``case.mode``."""
  opt, _, loss, hp = _meta_loss_parts(case.optimizer, case.kind)
  inner_opt = opt.make(**{opt.rate: helpers.LR})
  if case.mode == "forward":
    return helpers.forward_meta_gradient(inner_opt, loss, hp, meta, params, batches, outer)
  meta_loss = helpers.unroll_meta_loss(inner_opt, loss, hp, case.mode, remat=case.remat)
  return jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(meta, params, batches, outer)


def _finite(tree):
  return all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(tree))


class DesignTest(helpers.TestCase):
  """The covering properties of ``registry.exactness_design`` (it replaces the full product)."""

  def setUp(self):
    super().setUp()
    self.cases = registry.design()
    self.tested = {n: o for n, o in registry.OPTIMIZERS.items() if o.meta_kinds}

  def test_every_optimizer_meets_every_mode_and_every_kind(self):
    seen = collections.defaultdict(set)
    for c in self.cases:
      seen[c.optimizer, "mode"].add(c.mode)
      seen[c.optimizer, "kind"].add(c.kind)
    for name, opt in self.tested.items():
      self.assertEqual(seen[name, "mode"], set(opt.modes), name)
      self.assertContainsSubset(opt.modes, registry.MODES)
      self.assertEqual(seen[name, "kind"], set(opt.meta_kinds), name)
    self.assertEqual({c.optimizer for c in self.cases}, set(self.tested))

  def test_every_kind_meets_every_mode_with_several_optimizers(self):
    groups = collections.defaultdict(set)
    for c in self.cases:
      groups[c.kind, c.mode].add(c.optimizer)
    for kind, mode in itertools.product(registry.META_KINDS, registry.MODES):
      optimizers = groups[kind, mode]
      self.assertGreaterEqual(len(optimizers), 3, (kind, mode, optimizers))
      hand_written = {registry.OPTIMIZERS[o].group for o in optimizers}
      self.assertIn(registry.HAND_WRITTEN, hand_written, (kind, mode))

  def test_every_mode_meets_every_T_and_remat_setting(self):
    seen = {(c.mode, c.T, c.remat if c.mode in registry.UNROLL_MODES else None) for c in self.cases}
    for mode, T in itertools.product(registry.MODES, registry.T_VALUES):
      # Forward mode stores nothing across steps: remat does not apply.
      remats = (True, False) if mode in registry.UNROLL_MODES else (None,)
      for remat in remats:
        self.assertIn((mode, T, remat), seen)

  def test_pairwise_not_the_full_product(self):
    full = sum(len(o.meta_kinds) * len(o.modes) for o in self.tested.values())
    self.assertLess(len(self.cases), full / 3)
    self.assertEqual(len({c.name for c in self.cases}), len(self.cases))  # Readable, unique ids.

  def test_a_missing_pair_is_detected(self):
    # The checks above can fail: drop one case and a (optimizer, mode) pair goes missing.
    cases = self.cases[1:]
    first = self.cases[0]
    self.assertNotIn((first.optimizer, first.mode), {(c.optimizer, c.mode) for c in cases})


class ExactnessTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *({"testcase_name": c.name, "case": c} for c in registry.design())
  )
  def test_matches_plain_bptt_through_stock_optax(self, case):
    opt, kind, _, _ = _meta_loss_parts(case.optimizer, case.kind)
    params, batches, outer = helpers.exactness_problem(case.T)
    meta = kind.init(opt, params)
    got = _meta_gradient(case, meta, params, batches, outer)
    first_order = case.mode == "first_order"
    want = _reference_meta_gradient(case.optimizer, case.kind, case.T, first_order)
    self.assertTrue(_finite(want), "stock reference is NaN")
    self.assertTrue(_finite(got))
    # The meta-gradient is not trivially zero (the test can fail).
    self.assertGreater(max(float(np.max(np.abs(x))) for x in jax.tree.leaves(want)), 1e-6)
    self.assertLessEqual(helpers.max_rel_err(got, want), opt.exact_rtol)
    if first_order and opt.sign_step:
      # No second-order term: the first-order meta-gradient is the exact one.
      exact = _reference_meta_gradient(case.optimizer, case.kind, case.T)
      self.assertLessEqual(helpers.max_rel_err(got, exact), opt.exact_rtol)

  @parameterized.named_parameters(
    *(
      {
        "testcase_name": f"{name}_{opt.meta_kinds[i % len(opt.meta_kinds)]}",
        "opt_name": name,
        "kind_name": opt.meta_kinds[i % len(opt.meta_kinds)],
      }
      for i, (name, opt) in enumerate(registry.HAND_WRITTEN_OPTIMIZERS.items())
      if opt.meta_kinds
    )
  )
  def test_mixflow_matches_central_finite_differences(self, opt_name, kind_name):
    opt, kind, loss, hp = _meta_loss_parts(opt_name, kind_name)
    T = 3
    params, batches, outer = helpers.exactness_problem(T, seed=1)
    meta = kind.init(opt, params)
    f = jax.jit(helpers.unroll_meta_loss(opt.make(**{opt.rate: helpers.LR}), loss, hp, "mixflow"))
    g = jax.jit(jax.grad(f, argnums=(0, 1)))(meta, params, batches, outer)
    # Directional derivative along a random direction in (meta, params0).
    leaves, treedef = jax.tree.flatten((meta, params))
    keys = jax.random.split(jax.random.PRNGKey(42), len(leaves))
    v = jax.tree.unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
    )
    h = 1e-5

    def at(s):
      m, p = jax.tree.map(lambda x, d: x + s * d, (meta, params), v)
      return f(m, p, batches, outer)

    fd = (at(h) - at(-h)) / (2 * h)
    ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6, atol=1e-9)


class ClosedFormTest(helpers.F64TestCase):
  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_one_sgd_step_data_meta_gradient(self, mode):
    # Inner parameter a, data x as the meta-parameter, one SGD step (lr 1):
    # a1 = a0 - d/da (a x^2) = a0 - x^2;  L_out = a1 x^2 = a0 x^2 - x^4.
    # dL/dx = 2 a0 x - 4 x^3 (= 2x - 4x^3 at a0 = 1);  dL/da0 = x^2.
    opt = mfo.transforms.sgd(1.0)
    run = mfo.unroll(lambda a, x, _: a * x**2, opt, mode=mode)

    def meta_loss(x, a0):
      a1, _ = run(x, a0, opt.init(a0), jnp.zeros((1,)))
      return a1 * x**2

    for x in (0.3, -1.2, 2.0):
      dx, da0 = jax.grad(meta_loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(1.0))
      np.testing.assert_allclose(dx, 2 * x - 4 * x**3, rtol=1e-13)
      np.testing.assert_allclose(da0, x**2, rtol=1e-13)

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_sgd_learning_rate_on_quadratic(self, mode):
    # L_in = c θ²/2 ⇒ θ_T = (1 - αc)^T θ0;  L_out = θ_T²/2
    # dL_out/dα = θ_T · T (1 - αc)^(T-1) (-c) θ0.
    c, theta0, alpha, T = 1.5, 2.0, 0.1, 5
    opt = mfo.transforms.sgd(alpha)
    run = mfo.unroll(
      lambda th, m, _: 0.5 * c * th**2,
      opt,
      hyperparams_fn=lambda a: {"learning_rate": a},
      mode=mode,
    )

    def meta_loss(a):
      th, _ = run(a, jnp.asarray(theta0), opt.init(jnp.asarray(theta0)), jnp.zeros((T,)))
      return 0.5 * th**2

    th_T = (1 - alpha * c) ** T * theta0
    expected = th_T * T * (1 - alpha * c) ** (T - 1) * (-c) * theta0
    np.testing.assert_allclose(jax.grad(meta_loss)(jnp.asarray(alpha)), expected, rtol=1e-13)


# Entries (with construction changes) whose stock meta-gradient is NaN when a gradient entry is
# exactly 0 (sqrt at 0, norms of zero tensors).
_ZERO_GRADIENT_CASES = {
  "adam": ("adam", {}),
  "adamw": ("adamw", {}),
  "rmsprop_eps_outside_sqrt": ("rmsprop", {"eps_in_sqrt": False}),
  "nadam": ("nadam", {}),
  "amsgrad": ("amsgrad", {}),
  "adabelief_eps_root_zero": ("adabelief", {"eps": 1e-8, "eps_root": 0.0}),
  "lamb": ("lamb", {}),
}


class ZeroGradientTest(helpers.F64TestCase):
  """Through mfo.unroll: finite, equal to central differences, where stock optax gives NaN."""

  @parameterized.named_parameters(
    *helpers.named_product(name=_ZERO_GRADIENT_CASES, mode=("mixflow", "standard"))
  )
  def test_exactly_zero_gradient_entries(self, name, mode):
    entry, kwargs = _ZERO_GRADIENT_CASES[name]
    opt_entry = registry.OPTIMIZERS[entry]
    make = lambda lr: opt_entry.make(learning_rate=lr, **kwargs)
    make_stock = lambda lr: opt_entry.stock(learning_rate=lr, **kwargs)
    # Feature 1 is always 0: the gradient of w[:, 1] is exactly 0 at every step (as with a dead
    # ReLU or an absent sparse feature); params["unused"] never enters the inner loss at all.
    params = {
      "w": jnp.asarray([[0.5, -1.0], [0.3, 0.7]]),
      "b": jnp.asarray([0.1, -0.2]),
      "unused": jnp.asarray([0.3, 0.0]),
    }
    xs = jnp.asarray([[[1.0, 0.0]], [[0.5, 0.0]], [[2.0, 0.0]]])
    meta = {"target": jnp.asarray([0.2, -0.4]), "log_lr": jnp.log(0.1)}

    def inner_loss(p, m, x):
      return jnp.sum((jnp.tanh(x @ p["w"] + p["b"][None, :]) - m["target"][None, :]) ** 2)

    def outer(p):
      return jnp.sum(p["w"] ** 2) + jnp.sum(jnp.tanh(p["b"])) + jnp.sum(p["unused"] ** 2)

    opt = make(0.1)
    run = mfo.unroll(
      inner_loss, opt, hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])}, mode=mode
    )

    def meta_loss(m, p0):
      p, _ = run(m, p0, opt.init(p0), xs)
      return outer(p)

    def stock_meta_loss(m, p0):
      s_opt = make_stock(jnp.exp(m["log_lr"]))
      p, s = p0, s_opt.init(p0)
      for x in xs:
        u, s = s_opt.update(jax.grad(inner_loss)(p, m, x), s, p)
        p = optax.apply_updates(p, u)
      return outer(p)

    # Forward values are unchanged.
    np.testing.assert_allclose(meta_loss(meta, params), stock_meta_loss(meta, params), rtol=1e-13)
    got = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(meta, params)
    stock = jax.grad(stock_meta_loss, argnums=(0, 1))(meta, params)
    # Plain autodiff through stock optax gives NaN here ...
    self.assertTrue(any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(stock)))
    # ... the exact derivative is finite and equals central differences along a random
    # direction in (meta, params0).
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got)))
    leaves, treedef = jax.tree.flatten((meta, params))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = jax.tree.unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
    )
    f = jax.jit(lambda s: meta_loss(*jax.tree.map(lambda x, d: x + s * d, (meta, params), v)))
    fd = (f(1e-6) - f(-1e-6)) / 2e-6
    ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)))
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6, atol=1e-9)
    self.assertGreater(abs(float(ad)), 1e-3)


if __name__ == "__main__":
  absltest.main()
