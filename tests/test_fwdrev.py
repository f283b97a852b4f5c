"""fwdrev_grad / fwdrev_value_and_grad: values, derivatives, errors, custom_vjp."""

import warnings

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import mixflow_optax as mfo


def _loss(params, eta, batch):
  x, y, tokens = batch
  h = jnp.tanh(x @ params["a"])
  pred = h @ params["b"] + 0.01 * jnp.take(params["emb"], tokens)
  return jnp.mean(jax.nn.softplus(eta) * (pred - y) ** 2)


def _setup():
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {
    "a": jax.random.normal(k[0], (3, 4)),
    "b": jax.random.normal(k[1], (4,)),
    "emb": jax.random.normal(k[2], (10,)),
  }
  batch = (
    jax.random.normal(k[3], (5, 3)),
    jax.random.normal(k[4], (5,)),
    jnp.array([1, 3, 3, 7, 0], jnp.int32),  # integer inputs: no cotangent
  )
  eta = jax.random.normal(k[5], (5,))
  return params, eta, batch


def _sgd_meta_loss(grad_fn, use_value=False):
  """Three SGD steps through grad_fn; the meta-loss also uses the inner value."""

  def meta_loss(eta, params, batch):
    total = 0.0
    for _ in range(3):
      if use_value:
        val, g = grad_fn(_loss)(params, eta, batch)
        total = total + 0.3 * val
      else:
        g = grad_fn(_loss)(params, eta, batch)
      params = jax.tree.map(lambda p, q: p - 0.1 * q, params, g)
    return total + jnp.sum(params["b"] ** 2) + jnp.sum(jnp.sin(params["a"]))

  return meta_loss


class FwdRevTest(helpers.F64TestCase):
  def test_values_match_jax(self):
    params, eta, batch = _setup()
    chex.assert_trees_all_close(
      mfo.fwdrev_grad(_loss)(params, eta, batch), jax.grad(_loss)(params, eta, batch)
    )
    chex.assert_trees_all_close(
      mfo.fwdrev_value_and_grad(_loss)(params, eta, batch),
      jax.value_and_grad(_loss)(params, eta, batch),
    )
    chex.assert_trees_all_close(
      mfo.fwdrev_grad(_loss, argnums=(0, 1))(params, eta, batch),
      jax.grad(_loss, argnums=(0, 1))(params, eta, batch),
    )

  @parameterized.named_parameters(
    ("grad", False, False),
    ("value_and_grad", True, False),
    ("grad_jit", False, True),
    ("value_and_grad_jit", True, True),
  )
  def test_meta_gradient_matches_reverse_over_reverse(self, use_value, jit):
    params, eta, batch = _setup()
    ours_fn = mfo.fwdrev_value_and_grad if use_value else mfo.fwdrev_grad
    ref_fn = jax.value_and_grad if use_value else jax.grad
    ours = jax.grad(_sgd_meta_loss(ours_fn, use_value), argnums=(0, 1))
    ref = jax.grad(_sgd_meta_loss(ref_fn, use_value), argnums=(0, 1))
    if jit:
      ours, ref = jax.jit(ours), jax.jit(ref)
    chex.assert_trees_all_close(
      ours(eta, params, batch), ref(eta, params, batch), rtol=1e-12, atol=1e-13
    )

  def test_argnums_tuple_meta_gradient(self):
    params, eta, batch = _setup()

    def meta(eta, params, gfn):
      gp, ge = gfn(_loss, argnums=(0, 1))(params, eta, batch)
      return jnp.sum(gp["a"] ** 2) + jnp.sum(jnp.cos(ge))

    chex.assert_trees_all_close(
      jax.grad(meta, argnums=(0, 1))(eta, params, mfo.fwdrev_grad),
      jax.grad(meta, argnums=(0, 1))(eta, params, jax.grad),
      rtol=1e-12,
    )

  def test_has_aux_is_differentiated_exactly(self):
    params, eta, batch = _setup()

    def loss_aux(p, eta, b):
      return _loss(p, eta, b), {"pred_mean": jnp.mean(p["b"]) * jnp.sum(eta), "n": jnp.int32(3)}

    def meta(eta, params, gfn):
      g, aux = gfn(loss_aux, has_aux=True)(params, eta, batch)
      return jnp.sum(g["b"] ** 2) + 2.0 * aux["pred_mean"]

    got = jax.grad(meta, argnums=(0, 1))(eta, params, mfo.fwdrev_grad)
    want = jax.grad(meta, argnums=(0, 1))(eta, params, jax.grad)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)

  def test_closed_over_traced_values_get_cotangents(self):
    params, eta, batch = _setup()

    def meta(eta, gfn):
      g = gfn(lambda p: _loss(p, eta, batch))(params)  # eta is closed over
      return jnp.sum(g["a"] ** 2)

    chex.assert_trees_all_close(
      jax.grad(meta)(eta, mfo.fwdrev_grad), jax.grad(meta)(eta, jax.grad), rtol=1e-12
    )

  def test_vmap_scan_checkpoint(self):
    params, eta, batch = _setup()

    def meta(eta, params, gfn):
      def step(p, _):
        g = gfn(_loss)(p, eta, batch)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

      p, _ = jax.lax.scan(jax.checkpoint(step), params, None, length=4)
      return jnp.sum(p["b"] ** 2)

    etas = jnp.stack([eta, eta + 1.0, -eta])
    got = jax.jit(
      jax.vmap(jax.grad(meta, argnums=(0, 1)), in_axes=(0, None, None)), static_argnums=2
    )
    want = jax.vmap(jax.grad(meta, argnums=(0, 1)), in_axes=(0, None, None))
    chex.assert_trees_all_close(
      got(etas, params, mfo.fwdrev_grad), want(etas, params, jax.grad), rtol=1e-12
    )

  def test_hessian_vector_product(self):
    # d/dv <grad f(x), v> of a quadratic: the full Hessian applied to v.
    A = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    f = lambda x: 0.5 * x @ A @ x + jnp.sum(x**3)
    x = jnp.array([0.3, -0.7])
    v = jnp.array([1.0, 2.0])
    hvp = jax.grad(lambda x: jnp.vdot(mfo.fwdrev_grad(f)(x), v))(x)
    np.testing.assert_allclose(hvp, A @ v + 6 * x * v, rtol=1e-14)

  def test_forward_use_has_no_overhead_structure(self):
    # Without an outer derivative the custom_vjp primal is just the gradient.
    params, eta, batch = _setup()
    jaxpr = jax.make_jaxpr(mfo.fwdrev_grad(_loss))(params, eta, batch)
    self.assertIn("custom_vjp_call", str(jaxpr))


class ErrorsTest(helpers.TestCase):
  def test_non_scalar_loss(self):
    with self.assertRaisesRegex(
      TypeError, r"must return a real scalar loss.*shape \(3,\).*jnp.mean"
    ):
      mfo.fwdrev_grad(lambda x: x**2)(jnp.ones(3))

  def test_integer_params(self):
    with self.assertRaisesRegex(TypeError, r"\['w'\].*int32.*floating point"):
      mfo.fwdrev_grad(lambda p: jnp.sum(p["w"]) * 1.0)({"w": jnp.ones(3, jnp.int32)})

  def test_bad_aux(self):
    with self.assertRaisesRegex(TypeError, "has_aux=True.*pair"):
      mfo.fwdrev_grad(lambda x: jnp.sum(x), has_aux=True)(jnp.ones(3))

  def test_bad_fallback(self):
    with self.assertRaisesRegex(ValueError, "fallback"):
      mfo.fwdrev_grad(lambda x: jnp.sum(x), fallback="magic")


# A custom_vjp op whose backward rule itself calls a custom_vjp op: JAX cannot
# run it under jax.jvp, as with many fused kernels.
@jax.custom_vjp
def _inner_op(x):
  return jnp.sin(x)


_inner_op.defvjp(lambda x: (jnp.sin(x), x), lambda x, ct: (jnp.cos(x) * ct,))


@jax.custom_vjp
def _fused_op(x):
  return jnp.sin(x) ** 2


def _fused_fwd(x):
  return jnp.sin(x) ** 2, x


def _fused_bwd(x, ct):
  return (2 * _inner_op(x) * jnp.cos(x) * ct,)


_fused_op.defvjp(_fused_fwd, _fused_bwd)


# A custom_vjp op with ordinary rules: forward-over-reverse works through it.
@jax.custom_vjp
def _plain_custom(x):
  return jnp.exp(x) * x


_plain_custom.defvjp(lambda x: (jnp.exp(x) * x, x), lambda x, ct: (jnp.exp(x) * (1 + x) * ct,))


class CustomVjpTest(helpers.F64TestCase):
  def _meta(self, op, gfn):
    def inner(w, eta):
      return jnp.sum(eta * op(w))

    def meta(eta, w):
      for _ in range(2):
        w = w - 0.1 * gfn(inner)(w, eta)
      return jnp.sum(w**2)

    return meta

  def test_custom_vjp_with_forward_differentiable_rules_works(self):
    w, eta = jnp.array([0.3, -0.2]), jnp.array([1.0, 2.0])
    chex.assert_trees_all_close(
      jax.grad(self._meta(_plain_custom, mfo.fwdrev_grad), argnums=(0, 1))(eta, w),
      jax.grad(self._meta(_plain_custom, jax.grad), argnums=(0, 1))(eta, w),
      rtol=1e-12,
    )

  def test_forward_mode_blocker_raises_clear_error(self):
    w, eta = jnp.array([0.3, -0.2]), jnp.array([1.0, 2.0])
    with self.assertRaisesRegex(
      mfo.ForwardModeError, r"custom_vjp.*fallback='reverse'.*mode='standard'"
    ):
      jax.grad(self._meta(_fused_op, mfo.fwdrev_grad))(eta, w)

  def test_forward_mode_blocker_fallback(self):
    w, eta = jnp.array([0.3, -0.2]), jnp.array([1.0, 2.0])
    gfn = lambda f: mfo.fwdrev_grad(f, fallback="reverse")
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      got = jax.grad(self._meta(_fused_op, gfn), argnums=(0, 1))(eta, w)
    self.assertTrue(any("reverse-over-reverse" in str(c.message) for c in caught))
    want = jax.grad(self._meta(_fused_op, jax.grad), argnums=(0, 1))(eta, w)
    chex.assert_trees_all_close(got, want, rtol=1e-12)

  @parameterized.named_parameters(
    *helpers.named_grid(remat={"remat": True, "no_remat": False}, jit={"jit": True, "eager": False})
  )
  def test_forward_mode_blocker_inside_unroll(self, remat, jit):
    """Under lax.scan / jax.checkpoint / jit, JAX defers the jvp failure to run
    time; the rule detects it while tracing, so the error and the fallback
    behave as they do eagerly."""
    w, eta = jnp.array([0.3, -0.2]), jnp.array([1.0, 2.0])
    xs = jnp.ones((3, 2))
    opt = mfo.transforms.sgd(0.1)

    def inner(w, eta, x):
      return jnp.sum(eta * _fused_op(w * x))

    def meta_fn(**kw):
      run = mfo.unroll(inner, opt, remat=remat, **kw)

      def meta(eta, w):
        p, _ = run(eta, w, opt.init(w), xs)
        return jnp.sum(p**2)

      g = jax.grad(meta, argnums=(0, 1))
      return jax.jit(g) if jit else g

    with self.assertRaisesRegex(mfo.ForwardModeError, "custom_vjp"):
      meta_fn()(eta, w)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      got = meta_fn(fallback="reverse")(eta, w)
    self.assertTrue(any("reverse-over-reverse" in str(c.message) for c in caught))
    want = meta_fn(mode="standard")(eta, w)
    chex.assert_trees_all_close(got, want, rtol=1e-12)


if __name__ == "__main__":
  absltest.main()
