"""Meta-gradients through mfo.unroll equal plain BPTT through stock optax.

The reference is written independently of the library: a Python loop of
`jax.grad` + stock optax optimizers, differentiated by `jax.grad` (reverse-
over-reverse). Everything runs in float64; agreement is required to 1e-10
relative, and mixflow is also checked against central finite differences.
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

T_VALUES = (1, 3, 8)

# name -> (mfo factory(lr), stock optax factory(lr))
OPTIMIZERS = {
  "sgd_momentum": (
    lambda lr: mfo.transforms.sgd(lr, momentum=0.9),
    lambda lr: optax.sgd(lr, momentum=0.9),
  ),
  "nesterov": (
    lambda lr: mfo.transforms.sgd(lr, momentum=0.9, nesterov=True),
    lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
  ),
  "adam": (lambda lr: mfo.transforms.adam(lr), lambda lr: optax.adam(lr)),
  "adamw": (
    lambda lr: mfo.transforms.adamw(lr, weight_decay=0.1),
    lambda lr: optax.adamw(lr, weight_decay=0.1),
  ),
  "rmsprop": (
    lambda lr: mfo.transforms.rmsprop(lr, momentum=0.5),
    lambda lr: optax.rmsprop(lr, momentum=0.5),
  ),
  # Stock optax clipping inside an mfo chain, with clipping active.
  "chain_clip": (
    lambda lr: mfo.transforms.chain(optax.clip_by_global_norm(0.3), mfo.transforms.adam(lr)),
    lambda lr: optax.chain(optax.clip_by_global_norm(0.3), optax.adam(lr)),
  ),
}


@functools.cache
def _reference_meta_gradient(opt_name, kind, T):
  """Cached: shared by the mode x remat variants of one (optimizer, kind, T)."""
  with jax.enable_x64(True):
    params, batches, outer = helpers.exactness_problem(T)
    meta = helpers.meta_params(kind, params)
    ref = jax.jit(jax.grad(helpers.bptt_meta_loss(OPTIMIZERS[opt_name][1], kind), argnums=(0, 1)))
    return jax.device_get(ref(meta, params, batches, outer))


class ExactnessTest(helpers.F64TestCase):
  @parameterized.product(
    opt_name=tuple(OPTIMIZERS),
    kind=helpers.META_KINDS,
    mode=("mixflow", "standard"),
    T=T_VALUES,
    remat=(True, False),
  )
  def test_matches_plain_bptt_through_stock_optax(self, opt_name, kind, mode, T, remat):
    params, batches, outer = helpers.exactness_problem(T)
    meta = helpers.meta_params(kind, params)
    ours = jax.jit(
      jax.grad(
        helpers.unroll_meta_loss(OPTIMIZERS[opt_name][0](helpers.LR), kind, mode, remat=remat),
        argnums=(0, 1),
      )
    )
    got = ours(meta, params, batches, outer)
    want = _reference_meta_gradient(opt_name, kind, T)
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got)))
    # The meta-gradient is not trivially zero (the test can fail).
    self.assertGreater(max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want)), 1e-6)
    self.assertLessEqual(helpers.max_rel_err(got, want), 1e-10)

  @parameterized.product(opt_name=tuple(OPTIMIZERS), kind=helpers.META_KINDS)
  def test_mixflow_matches_central_finite_differences(self, opt_name, kind):
    T = 3
    params, batches, outer = helpers.exactness_problem(T, seed=1)
    meta = helpers.meta_params(kind, params)
    f = jax.jit(helpers.unroll_meta_loss(OPTIMIZERS[opt_name][0](helpers.LR), kind, "mixflow"))
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


class ZeroGradientTest(helpers.F64TestCase):
  """Adam-family meta-gradients stay exact where inner gradients are exactly 0."""

  @parameterized.named_parameters(
    ("adam", lambda lr: mfo.transforms.adam(lr), lambda lr: optax.adam(lr)),
    ("adamw", lambda lr: mfo.transforms.adamw(lr), lambda lr: optax.adamw(lr)),
    (
      "rmsprop_eps_outside",
      lambda lr: mfo.transforms.rmsprop(lr, eps_in_sqrt=False),
      lambda lr: optax.rmsprop(lr, eps_in_sqrt=False),
    ),
  )
  def test_exactly_zero_gradient_entries(self, mfo_factory, stock_factory):
    # Feature 1 of the data is always 0, so the gradient of w[1] is exactly 0
    # while still depending on the meta-parameters (as with a dead ReLU or an
    # absent sparse feature); params["unused"] never enters the loss at all.
    params = {"w": jnp.array([0.5, -1.0]), "unused": jnp.array([0.3, 0.0])}
    xs = jnp.array([[1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])

    def inner_loss(p, meta, x):
      return jnp.sum((p["w"] * x - meta["target"]) ** 2)

    def outer(p):
      return jnp.sum(p["w"] ** 2) + jnp.sum(p["unused"] ** 2)

    meta = {"target": jnp.array([0.2, -0.4]), "log_lr": jnp.log(0.1)}
    opt = mfo_factory(0.1)
    run = mfo.unroll(
      inner_loss, opt, hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])}
    )

    def meta_loss(m, p0):
      p, _ = run(m, p0, opt.init(p0), xs)
      return outer(p)

    def stock_meta_loss(m, p0):
      s_opt = stock_factory(jnp.exp(m["log_lr"]))
      p, s = p0, s_opt.init(p0)
      for x in xs:
        u, s = s_opt.update(jax.grad(inner_loss)(p, m, x), s, p)
        p = optax.apply_updates(p, u)
      return outer(p)

    # Forward values are unchanged.
    np.testing.assert_allclose(meta_loss(meta, params), stock_meta_loss(meta, params), rtol=1e-13)
    got = jax.grad(meta_loss, argnums=(0, 1))(meta, params)
    stock = jax.grad(stock_meta_loss, argnums=(0, 1))(meta, params)
    # Plain autodiff through stock optax gives NaN here ...
    self.assertTrue(any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(stock)))
    # ... the exact derivative is finite and equals central finite differences.
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got)))
    h = 1e-6
    leaves, treedef = jax.tree.flatten((meta, params))
    for i, leaf in enumerate(leaves):
      for j in range(leaf.size):
        e = np.zeros(leaf.size)
        e[j] = h

        def shifted(s, i=i, e=e, leaf=leaf):
          ls = list(leaves)
          ls[i] = leaf + s * e.reshape(leaf.shape)
          return meta_loss(*jax.tree.unflatten(treedef, ls))

        fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
        ad = jax.tree.leaves(got)[i].reshape(-1)[j]
        np.testing.assert_allclose(ad, fd, rtol=1e-6, atol=1e-8)


if __name__ == "__main__":
  absltest.main()
