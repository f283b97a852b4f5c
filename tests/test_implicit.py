"""Implicit meta-gradients (mfo.implicit_unroll, mfo.implicit_meta_grad).

Exactness: ridge regression with per-feature L2 strengths against its closed-form hypergradient
(float64, 1e-8), logistic regression with a pytree of parameters against central finite
differences of the converged inner solve. Then what the user is told when the inner problem or the
linear solve has not converged, what gets no implicit gradient, and the option checks.
"""

import warnings

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

N, D, T = 24, 4, 400


def _ridge_data():
  rng = np.random.RandomState(0)
  x, xv = rng.normal(size=(N, D)), rng.normal(size=(16, D))
  y, yv = rng.normal(size=N), rng.normal(size=16)
  return tuple(jnp.asarray(a) for a in (x, y, xv, yv))


def ridge_loss(w, meta, batch):
  """Least squares with per-feature L2 strengths exp(meta["log_l2"])."""
  x, y = batch
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(meta["log_l2"]) * w**2)


def ridge_hypergradient(meta, x, y, xv, yv):
  r"""Closed form: w* = A^{-1} X^T y / n, dV/d eta_j = -(A^{-1} grad V)_j e^{eta_j} w*_j."""
  lam = jnp.exp(meta["log_l2"])
  a = x.T @ x / x.shape[0] + jnp.diag(lam)
  w = jnp.linalg.solve(a, x.T @ y / x.shape[0])
  v = jnp.linalg.solve(a, xv.T @ (xv @ w - yv) / xv.shape[0])
  return w, -v * lam * w, v


def _stack(batch, steps):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (steps, *a.shape)), batch)


class RidgeTest(helpers.F64TestCase):
  """Per-feature L2 strengths of ridge regression, inner gradient descent to convergence."""

  def setUp(self):
    super().setUp()
    self.x, self.y, self.xv, self.yv = _ridge_data()
    self.meta = {"log_l2": jnp.log(jnp.linspace(0.05, 0.5, D))}
    lam = jnp.exp(self.meta["log_l2"])
    self.lr = float(1.0 / jnp.max(jnp.linalg.eigvalsh(self.x.T @ self.x / N + jnp.diag(lam))))
    self.opt = mfo.transforms.sgd(self.lr)
    self.w0 = jnp.zeros(D)

  def meta_loss(self, run, steps=T):
    batches = _stack((self.x, self.y), steps)

    def f(meta):
      w, _ = run(meta, self.w0, self.opt.init(self.w0), batches)
      return 0.5 * jnp.mean((self.xv @ w - self.yv) ** 2)

    return f

  @parameterized.named_parameters(
    ("cg", dict(solver="cg")),
    ("neumann", dict(solver="neumann", maxiter=2000)),
  )
  def test_matches_closed_form(self, options):
    if options["solver"] == "neumann":
      options = {**options, "neumann_step": self.lr}
    run = mfo.implicit_unroll(ridge_loss, self.opt, tol=1e-14, **options)
    g = jax.jit(jax.grad(self.meta_loss(run)))(self.meta)
    _, exact, _ = ridge_hypergradient(self.meta, self.x, self.y, self.xv, self.yv)
    self.assertLess(helpers.max_rel_err(g["log_l2"], exact), 1e-8)

  def test_meta_grad_reports_residual_and_agrees_with_run(self):
    fn = mfo.implicit_meta_grad(
      ridge_loss, lambda w, m, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2), self.opt, tol=1e-12
    )
    out = jax.jit(fn)(
      self.meta, self.w0, self.opt.init(self.w0), _stack((self.x, self.y), T), (self.xv, self.yv)
    )
    w, exact, v = ridge_hypergradient(self.meta, self.x, self.y, self.xv, self.yv)
    self.assertLess(helpers.max_rel_err(out.grad["log_l2"], exact), 1e-8)
    chex.assert_trees_all_close(out.params, w, atol=1e-12)
    info = out.info
    b_norm = jnp.linalg.norm(self.xv.T @ (self.xv @ w - self.yv) / 16)
    # The residual is ||H v - b|| of the returned solve, and it met tol.
    self.assertTrue(bool(info.solve_converged))
    self.assertLessEqual(float(info.relative_residual), 1e-11)
    self.assertAlmostEqual(float(info.residual / b_norm), float(info.relative_residual), places=14)
    self.assertBetween(int(info.iterations), 1, D)  # CG: at most D steps in exact arithmetic
    self.assertLess(float(info.grad_norm), 1e-12)
    self.assertGreater(float(jnp.linalg.norm(v)), 0)

  def test_close_to_exact_unrolled_meta_gradient_when_converged(self):
    implicit = jax.grad(self.meta_loss(mfo.implicit_unroll(ridge_loss, self.opt, tol=1e-14)))
    exact = jax.grad(self.meta_loss(mfo.unroll(ridge_loss, self.opt, checkpoint_every=20)))
    # The unrolled meta-gradient of T steps tends to the implicit one as T grows.
    self.assertLess(
      helpers.max_rel_err(jax.jit(implicit)(self.meta), jax.jit(exact)(self.meta)), 1e-8
    )

  def test_data_cotangent_goes_through_the_stationarity_batch(self):
    run = mfo.implicit_unroll(ridge_loss, self.opt, tol=1e-14)

    def f(y):  # every step sees the same targets y
      w, _ = run(self.meta, self.w0, self.opt.init(self.w0), _stack((self.x, y), T))
      return 0.5 * jnp.mean((self.xv @ w - self.yv) ** 2)

    _, _, v = ridge_hypergradient(self.meta, self.x, self.y, self.xv, self.yv)
    self.assertLess(helpers.max_rel_err(jax.jit(jax.grad(f))(self.y), self.x @ v / N), 1e-8)

  def test_explicit_stationarity_batch(self):
    run = mfo.implicit_unroll(ridge_loss, self.opt, tol=1e-14)
    batches = _stack((self.x, self.y), T)
    state = self.opt.init(self.w0)

    def f(meta, stat):
      w, _ = run(meta, self.w0, state, batches, stationarity_batch=stat)
      return jnp.sum(w)

    grad_f = jax.jit(jax.grad(f))
    g_default = jax.jit(jax.grad(lambda m: jnp.sum(run(m, self.w0, state, batches)[0])))
    chex.assert_trees_all_close(
      grad_f(self.meta, (self.x, self.y)), g_default(self.meta), atol=1e-15
    )
    # A batch the inner loop did not minimise: theta_T is not stationary there.
    with self.assertRaisesRegex(jax.errors.JaxRuntimeError, "UnconvergedInnerError"):
      jax.block_until_ready(grad_f(self.meta, (self.x[:8], self.y[:8])))

  def test_memory_does_not_grow_with_the_horizon(self):
    # Under XLA's default flags, as users compile it: the backward pass keeps theta_T only.
    run = mfo.implicit_unroll(ridge_loss, self.opt, unconverged="ignore")
    exact = mfo.unroll(ridge_loss, self.opt)
    mem = {}
    for steps in (20, 200):
      for name, r in (("implicit", run), ("unroll", exact)):
        f = jax.grad(self.meta_loss(r, steps))
        mem[name, steps] = helpers.default_flags_memory(f, self.meta).temp_bytes
    self.assertEqual(mem["implicit", 200], mem["implicit", 20])
    self.assertGreater(mem["unroll", 200], mem["unroll", 20])
    self.assertLess(mem["implicit", 200], mem["unroll", 200])

  def test_optimizer_hyperparameters_and_initial_params_get_zero(self):
    run = mfo.implicit_unroll(
      ridge_loss,
      self.opt,
      hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])},
      tol=1e-14,
    )
    batches = _stack((self.x, self.y), T)

    def f(meta, w0):
      w, _ = run(meta, w0, self.opt.init(w0), batches)
      return jnp.sum(w**2)

    meta = {**self.meta, "log_lr": jnp.log(jnp.asarray(self.lr))}
    g_meta, g_w0 = jax.jit(jax.grad(f, argnums=(0, 1)))(meta, self.w0)
    self.assertEqual(float(g_meta["log_lr"]), 0.0)
    self.assertEqual(float(jnp.max(jnp.abs(g_w0))), 0.0)
    self.assertGreater(float(jnp.max(jnp.abs(g_meta["log_l2"]))), 0.0)


def logistic_loss(params, meta, batch):
  """L2-regularised logistic regression; params {"w", "b"}, meta {"log_l2": (D,), "log_b": ()}."""
  x, y = batch
  logits = x @ params["w"] + params["b"]
  nll = jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)
  return (
    nll
    + 0.5 * jnp.sum(jnp.exp(meta["log_l2"]) * params["w"] ** 2)
    + 0.5 * jnp.exp(meta["log_b"]) * params["b"] ** 2
  )


class LogisticTest(helpers.F64TestCase):
  def test_matches_finite_differences(self):
    rng = np.random.RandomState(1)
    x, xv = jnp.asarray(rng.normal(size=(N, D))), jnp.asarray(rng.normal(size=(16, D)))
    y = jnp.asarray(rng.uniform(size=N) < 0.5, jnp.float64)
    yv = jnp.asarray(rng.uniform(size=16) < 0.5, jnp.float64)
    opt = mfo.transforms.sgd(1.0)
    params0 = {"w": jnp.zeros(D), "b": jnp.zeros(())}
    batches = _stack((x, y), 300)
    run = mfo.implicit_unroll(logistic_loss, opt, tol=1e-14, grad_tol=1e-12)

    @jax.jit
    def meta_loss(meta):
      p, _ = run(meta, params0, opt.init(params0), batches)
      logits = xv @ p["w"] + p["b"]
      return jnp.mean(jnp.logaddexp(0.0, logits) - yv * logits)

    meta = {"log_l2": jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4])), "log_b": jnp.log(0.2)}
    g = jax.jit(jax.grad(meta_loss))(meta)
    for i, u in enumerate(
      [{"log_l2": jnp.eye(D)[j], "log_b": jnp.zeros(())} for j in range(D)]
      + [{"log_l2": jnp.zeros(D), "log_b": jnp.ones(())}]
    ):
      with self.subTest(direction=i):
        fd = helpers.central_fd(
          lambda h, u=u: meta_loss(jax.tree.map(lambda m, d: m + h * d, meta, u)), 0.0, 1e-5
        )
        ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u)))
        self.assertAlmostEqual(float(ad), float(fd), delta=1e-8 * max(1.0, abs(float(fd))))


class UnconvergedTest(helpers.F64TestCase):
  """An unconverged inner solve (3 steps) and an unconverged linear solve are reported."""

  def setUp(self):
    super().setUp()
    self.x, self.y, _, _ = _ridge_data()
    self.meta = {"log_l2": jnp.zeros(D)}
    self.opt = mfo.transforms.sgd(0.1)

  def grad(self, run, steps=3, jit=False):
    batches = _stack((self.x, self.y), steps)

    def f(meta):
      w, _ = run(meta, jnp.zeros(D), self.opt.init(jnp.zeros(D)), batches)
      return jnp.sum(w)

    return (jax.jit(jax.grad(f)) if jit else jax.grad(f))(self.meta)

  def test_raises_outside_jit(self):
    with self.assertRaisesRegex(mfo.UnconvergedInnerError, r"not converged.*> grad_tol = 0\.0001"):
      self.grad(mfo.implicit_unroll(ridge_loss, self.opt))

  def test_raises_inside_jit_with_the_message(self):
    with self.assertRaisesRegex(jax.errors.JaxRuntimeError, "UnconvergedInnerError"):
      self.grad(mfo.implicit_unroll(ridge_loss, self.opt), jit=True)

  def test_warns(self):
    run = mfo.implicit_unroll(ridge_loss, self.opt, unconverged="warn")
    with self.assertWarnsRegex(RuntimeWarning, "UnconvergedInnerError: the inner problem"):
      jax.block_until_ready(self.grad(run, jit=True))

  def test_ignore_and_converged_are_silent(self):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      self.grad(mfo.implicit_unroll(ridge_loss, self.opt, unconverged="ignore"), jit=True)
      self.grad(mfo.implicit_unroll(ridge_loss, self.opt, unconverged="warn"), steps=600, jit=True)

  def test_info_shows_the_gradient_norm(self):
    fn = mfo.implicit_meta_grad(
      ridge_loss, lambda w, m, b: jnp.sum(w), self.opt, unconverged="ignore"
    )
    out = jax.jit(fn)(
      self.meta, jnp.zeros(D), self.opt.init(jnp.zeros(D)), _stack((self.x, self.y), 3), None
    )
    grad_norm = jnp.linalg.norm(jax.grad(ridge_loss)(out.params, self.meta, (self.x, self.y)))
    self.assertAlmostEqual(float(out.info.grad_norm), float(grad_norm), places=12)
    self.assertGreater(float(out.info.grad_norm), 1e-2)

  def test_unconverged_solve(self):
    run = mfo.implicit_unroll(ridge_loss, self.opt, maxiter=1, tol=1e-12)
    with self.assertRaisesRegex(
      jax.errors.JaxRuntimeError, r"UnconvergedSolveError: .*after 1 Hess"
    ):
      jax.block_until_ready(self.grad(run, steps=600, jit=True))
    fn = mfo.implicit_meta_grad(
      ridge_loss, lambda w, m, b: jnp.sum(w), self.opt, maxiter=1, unconverged="ignore"
    )
    out = jax.jit(fn)(
      self.meta, jnp.zeros(D), self.opt.init(jnp.zeros(D)), _stack((self.x, self.y), 600), None
    )
    self.assertFalse(bool(out.info.solve_converged))
    self.assertGreater(float(out.info.relative_residual), 1e-5)
    self.assertEqual(int(out.info.iterations), 1)

  def test_diverging_neumann_series(self):
    # A step above 2 / lambda_max(H): the series diverges and the solve is reported.
    run = mfo.implicit_unroll(ridge_loss, self.opt, solver="neumann", neumann_step=10.0)
    with self.assertRaisesRegex(jax.errors.JaxRuntimeError, "smaller neumann_step"):
      jax.block_until_ready(self.grad(run, steps=600, jit=True))


class OptionsTest(helpers.TestCase):
  @parameterized.named_parameters(
    ("solver", dict(solver="lbfgs"), ValueError, "solver must be one of"),
    ("unconverged", dict(unconverged="stop"), ValueError, "unconverged must be one of"),
    ("maxiter", dict(maxiter=0), ValueError, "maxiter must be a positive int"),
    ("tol", dict(tol=-1.0), ValueError, "tol must be >= 0"),
    ("grad_tol", dict(grad_tol="small"), TypeError, "grad_tol must be a number"),
    ("neumann_no_step", dict(solver="neumann"), ValueError, "needs neumann_step"),
    ("neumann_bad_step", dict(solver="neumann", neumann_step=-0.1), ValueError, "positive"),
    ("step_without_neumann", dict(neumann_step=0.1), ValueError, "does not use it"),
  )
  def test_bad_options(self, options, error, message):
    with self.assertRaisesRegex(error, message):
      mfo.implicit_unroll(ridge_loss, mfo.transforms.sgd(0.1), **options)
    with self.assertRaisesRegex(error, message):
      mfo.implicit_meta_grad(ridge_loss, lambda *a: 0.0, mfo.transforms.sgd(0.1), **options)

  def test_forward_mode_is_refused(self):
    opt = mfo.transforms.sgd(0.1)
    run = mfo.implicit_unroll(ridge_loss, opt)
    x, y, _, _ = _ridge_data()

    def f(log_l2):
      return run({"log_l2": log_l2}, jnp.zeros(D), opt.init(jnp.zeros(D)), _stack((x, y), 2))[0]

    with self.assertRaisesRegex(TypeError, "reverse mode only"):
      jax.jvp(f, (jnp.zeros(D),), (jnp.ones(D),))

  def test_vmapped_meta_grads_trace_once(self):
    opt = mfo.transforms.sgd(0.5)
    run = mfo.implicit_unroll(ridge_loss, opt, unconverged="ignore")
    x, y, _, _ = _ridge_data()
    batches = _stack((x, y), 50)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def meta_grads(log_l2s):
      f = lambda e: jnp.sum(run({"log_l2": e}, jnp.zeros(D), opt.init(jnp.zeros(D)), batches)[0])
      return jax.vmap(jax.grad(f))(log_l2s)

    g1 = meta_grads(jnp.zeros((3, D)))
    g2 = meta_grads(jnp.ones((3, D)))
    self.assertEqual(g1.shape, (3, D))
    self.assertFalse(bool(jnp.allclose(g1, g2)))


if __name__ == "__main__":
  absltest.main()
