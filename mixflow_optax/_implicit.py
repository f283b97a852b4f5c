r"""Implicit meta-gradients: the implicit function theorem at a converged inner solution.

When the inner loop has converged to a stationary point of its loss,

.. math::

  \nabla_\theta L(\theta^*, \eta, x) = 0
  \quad\Longrightarrow\quad
  \frac{d\theta^*}{d\eta} = -H^{-1}\,\frac{\partial^2 L}{\partial\theta\,\partial\eta},
  \qquad H = \nabla^2_{\theta\theta} L(\theta^*, \eta, x),

so the meta-gradient of an outer loss :math:`V(\theta^*, \eta)` is

.. math::

  \frac{dV}{d\eta} = \frac{\partial V}{\partial \eta}
  - v^\top \frac{\partial^2 L}{\partial\theta\,\partial\eta},
  \qquad H v = \nabla_\theta V(\theta^*, \eta).

The linear system is solved by conjugate gradients or a Neumann series, each
product with :math:`H` one forward-over-reverse Hessian-vector product
(``jax.jvp`` of ``jax.grad``, the primitive of the MixFlow-MG rule); the mixed
term :math:`v^\top \partial^2 L / \partial\theta\partial\eta` is one more
forward-over-reverse product. Nothing of the T inner steps is stored: only
:math:`\theta_T` and the batch of the stationarity condition.

The result is exact only at a stationary point. After an unconverged inner
solve it can be far off, in size and in sign; the inner gradient norm at
:math:`\theta_T` is therefore checked and reported.

References:
  Pedregosa, `Hyperparameter optimization with approximate gradient
  <https://arxiv.org/abs/1602.02355>`_, ICML 2016 (conjugate gradients).
  Lorraine, Vicol, Duvenaud, `Optimizing Millions of Hyperparameters by Implicit
  Differentiation <https://arxiv.org/abs/1911.02590>`_, AISTATS 2020 (Neumann series).
  Blondel et al., `Efficient and Modular Implicit Differentiation
  <https://arxiv.org/abs/2105.15183>`_, NeurIPS 2022.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax._checks import check_positive_int, describe, is_float
from mixflow_optax._fwdrev import ForwardModeError
from mixflow_optax._jax_internals import (
  JAX_FORWARD_MODE_ERRORS,
  ForwardModeUnsupported,
  check_forward_mode_traceable,
  cotangent_leaves,
  is_forward_mode_traced,
  is_symbolic_zero,
  is_tracer,
  materialize_zero,
  primal_values_and_markers,
)
from mixflow_optax._unroll import _check_leading_axis, check_params, unroll

__all__ = [
  "ImplicitInfo",
  "ImplicitMetaGrad",
  "UnconvergedInnerError",
  "UnconvergedSolveError",
  "implicit_meta_grad",
  "implicit_unroll",
]

Solver = Literal["cg", "neumann"]
SOLVERS: tuple[str, ...] = ("cg", "neumann")
Unconverged = Literal["raise", "warn", "ignore"]
UNCONVERGED: tuple[str, ...] = ("raise", "warn", "ignore")


class UnconvergedInnerError(RuntimeError):
  """The inner problem is visibly not at a stationary point: its gradient norm exceeds ``grad_tol``."""


class UnconvergedSolveError(RuntimeError):
  """The linear solve :math:`H v = \\nabla_\\theta V` stopped at ``maxiter`` above ``tol``."""


class ImplicitInfo(NamedTuple):
  r"""How far one implicit meta-gradient is from its assumptions.

  Attributes:
    grad_norm: :math:`\|\nabla_\theta L(\theta_T, \eta, x_s)\|_2`, the inner
      gradient norm at the end of the unroll on the stationarity batch
      :math:`x_s`. Zero at a true stationary point.
    residual: :math:`\|H v - b\|_2` of the linear solve, with
      :math:`b = \nabla_\theta V` (computed with one more Hessian-vector
      product, not the solver's recurrence).
    relative_residual: ``residual`` over :math:`\|b\|_2` (0 when :math:`b = 0`).
    iterations: Hessian-vector products the solver used (int32).
    solve_converged: whether the solver met ``tol`` before ``maxiter``.
  """

  grad_norm: jax.Array
  residual: jax.Array
  relative_residual: jax.Array
  iterations: jax.Array
  solve_converged: jax.Array


class ImplicitMetaGrad(NamedTuple):
  """What :func:`implicit_meta_grad` returns.

  Attributes:
    value: the outer loss :math:`V(\\theta_T, \\eta)`.
    grad: its implicit meta-gradient with respect to ``meta_params``.
    params: the inner parameters :math:`\\theta_T` at the end of the unroll.
    opt_state: the inner optimizer state at the end of the unroll.
    info: the :class:`ImplicitInfo` of this meta-gradient.
  """

  value: jax.Array
  grad: Any
  params: Any
  opt_state: Any
  info: ImplicitInfo


class _Spec(NamedTuple):
  """The checked options of the implicit solve."""

  solver: str
  maxiter: int
  tol: float
  neumann_step: Any
  unconverged: str
  grad_tol: float


def _check_nonnegative(owner: str, name: str, value: Any) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{owner}: {name} must be a number, got {describe(value)}.")
  if not value >= 0:
    raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}.")
  return float(value)


def _spec(
  owner: str,
  solver: Any,
  maxiter: Any,
  tol: Any,
  neumann_step: Any,
  unconverged: Any,
  grad_tol: Any,
) -> _Spec:
  """Checks the solve options once, when the function is built."""
  if solver not in SOLVERS:
    raise ValueError(f"{owner}: solver must be one of {SOLVERS}, got {solver!r}.")
  if unconverged not in UNCONVERGED:
    raise ValueError(f"{owner}: unconverged must be one of {UNCONVERGED}, got {unconverged!r}.")
  maxiter = check_positive_int(owner, "maxiter", maxiter)
  tol = _check_nonnegative(owner, "tol", tol)
  grad_tol = _check_nonnegative(owner, "grad_tol", grad_tol)
  if solver == "neumann":
    if neumann_step is None:
      raise ValueError(
        f"{owner}(solver='neumann') needs neumann_step, the step size alpha of the series "
        "v = alpha * sum_k (I - alpha H)^k b. It converges when 0 < alpha < 2 / lambda_max(H): "
        "the learning rate of a stable inner gradient descent is a safe choice. Or use "
        "solver='cg', which needs no step size."
      )
    if not is_tracer(neumann_step) and not np.all(np.asarray(neumann_step) > 0):
      raise ValueError(f"{owner}: neumann_step must be positive, got {neumann_step!r}.")
  elif neumann_step is not None:
    raise ValueError(
      f"{owner}: neumann_step is the step size of solver='neumann'; solver={solver!r} "
      "does not use it. Drop it, or pass solver='neumann'."
    )
  return _Spec(solver, maxiter, tol, neumann_step, unconverged, grad_tol)


# ------------------------------------------------------------------ linear solvers


def _cg(hvp: Callable, b: Any, maxiter: int, tol: float) -> tuple[Any, jax.Array, jax.Array]:
  """Conjugate gradients on ``H v = b`` from ``v = 0``; stops at ``||r|| <= tol ||b||``."""
  b_norm = optax.tree.norm(b)

  def cond(state):
    k, _, _, _, rr = state
    return (k < maxiter) & (jnp.sqrt(rr) > tol * b_norm)

  def body(state):
    k, x, r, p, rr = state
    hp = hvp(p)
    alpha = rr / optax.tree.vdot(p, hp)
    x = optax.tree.add_scale(x, alpha, p)
    r = optax.tree.add_scale(r, -alpha, hp)
    rr_new = optax.tree.vdot(r, r)
    p = optax.tree.add_scale(r, rr_new / rr, p)
    return k + 1, x, r, p, rr_new

  rr0 = optax.tree.vdot(b, b)
  init = (jnp.asarray(0, jnp.int32), optax.tree.zeros_like(b), b, b, rr0)
  k, x, _, _, rr = jax.lax.while_loop(cond, body, init)
  return x, k, jnp.sqrt(rr) <= tol * b_norm


def _neumann(
  hvp: Callable, b: Any, maxiter: int, tol: float, step: Any
) -> tuple[Any, jax.Array, jax.Array]:
  r"""The Neumann series :math:`\alpha \sum_k (I - \alpha H)^k b` as Richardson iteration.

  ``v <- v + alpha (b - H v)`` from ``v = 0``: after k iterations ``v`` is the
  series' first k terms. Stops at ``||b - H v|| <= tol ||b||``.
  """
  b_norm = optax.tree.norm(b)

  def cond(state):
    k, _, r = state
    return (k < maxiter) & (optax.tree.norm(r) > tol * b_norm)

  def body(state):
    k, x, r = state
    x = optax.tree.add_scale(x, step, r)
    return k + 1, x, optax.tree.sub(b, hvp(x))

  init = (jnp.asarray(0, jnp.int32), optax.tree.zeros_like(b), b)
  k, x, r = jax.lax.while_loop(cond, body, init)
  return x, k, optax.tree.norm(r) <= tol * b_norm


# ------------------------------------------------------- the stationarity condition


def _hvp(inner_loss: Callable, theta: Any, meta: Any, batch: Any) -> Callable:
  """``v -> H v``, forward-over-reverse, with ``H`` the Hessian of ``inner_loss`` at ``theta``."""
  grad = lambda th: jax.grad(inner_loss)(th, meta, batch)
  try:
    check_forward_mode_traceable(grad, theta, theta)
  except (ForwardModeUnsupported, *JAX_FORWARD_MODE_ERRORS) as err:
    name = getattr(inner_loss, "__name__", repr(inner_loss))
    raise ForwardModeError(
      f"implicit differentiation computes Hessian-vector products of the inner loss {name!r} "
      f"forward-over-reverse (jax.jvp of jax.grad), and JAX could not: {type(err).__name__}: "
      f"{err}\nThe loss probably calls a jax.custom_vjp function (e.g. a fused attention "
      "kernel): use an implementation with a jax.custom_jvp rule or plain JAX operations."
    ) from err
  return lambda v: jax.jvp(grad, (theta,), (v,))[1]


def _mixed_cotangents(
  inner_loss: Callable, theta: Any, meta: Any, batch: Any, v: Any, wanted: list[bool]
) -> tuple[Any, Any]:
  r"""``(meta, batch)`` cotangents :math:`-v^\top \partial^2 L / \partial\theta\partial z`.

  One forward-over-reverse pass: the jvp, along ``v`` on :math:`\theta`, of the
  gradient of :math:`L` over the leaves of ``(meta, batch)`` flagged in
  ``wanted`` (None elsewhere).
  """
  flat, treedef = jax.tree.flatten((meta, batch))
  idx = [i for i, (x, w) in enumerate(zip(flat, wanted)) if w and is_float(x)]
  out: list[Any] = [None] * len(flat)
  if idx:

    def grad_z(th):
      def loss_of(z):
        leaves = list(flat)
        for i, x in zip(idx, z):
          leaves[i] = x
        return inner_loss(th, *jax.tree.unflatten(treedef, leaves))

      return jax.grad(loss_of)([flat[i] for i in idx])

    _, mixed = jax.jvp(grad_z, (theta,), (v,))
    for i, c in zip(idx, mixed):
      out[i] = (-c).astype(jnp.result_type(flat[i]))
  return jax.tree.unflatten(treedef, out)


def _solve(spec: _Spec, hvp: Callable, b: Any) -> tuple[Any, Any]:
  """``v`` with ``H v = b`` and ``(residual, relative residual, iterations, converged)``."""
  if spec.solver == "cg":
    v, iters, converged = _cg(hvp, b, spec.maxiter, spec.tol)
  else:
    v, iters, converged = _neumann(hvp, b, spec.maxiter, spec.tol, spec.neumann_step)
  residual = optax.tree.norm(optax.tree.sub(hvp(v), b))
  b_norm = optax.tree.norm(b)
  relative = jnp.where(b_norm > 0, residual / jnp.where(b_norm > 0, b_norm, 1.0), residual)
  return v, (residual, relative, iters, converged)


def _implicit_cotangents(
  spec: _Spec,
  inner_loss: Callable,
  theta: Any,
  meta: Any,
  batch: Any,
  b: Any,
  grad_norm: jax.Array,
  wanted: list[bool],
) -> tuple[Any, ImplicitInfo]:
  """The implicit cotangents of ``(meta, batch)`` for the cotangent ``b`` of ``theta``."""
  v, (residual, relative, iters, converged) = _solve(spec, _hvp(inner_loss, theta, meta, batch), b)
  info = ImplicitInfo(grad_norm, residual, relative, iters, converged)
  _report(spec, info)
  return _mixed_cotangents(inner_loss, theta, meta, batch, v, wanted), info


# ---------------------------------------------------------------------- reporting


def _inner_message(spec: _Spec, grad_norm: float) -> str:
  return (
    f"the inner problem is not converged: the inner gradient norm at the end of the unroll is "
    f"{grad_norm:.3g} > grad_tol = {spec.grad_tol:.3g}. The implicit meta-gradient assumes "
    "that the final inner parameters are a stationary point of inner_loss on the "
    "stationarity batch; away from one it can be wrong in size and in sign. Fixes: more "
    "inner steps or a better-tuned inner optimizer; make the stationarity batch the "
    "objective the inner loop minimises (the last inner batch by default, or pass "
    "stationarity_batch=); or take the exact unrolled meta-gradient with mfo.unroll. "
    "grad_tol= sets the threshold; unconverged='warn' only warns."
  )


def _solve_message(spec: _Spec, relative: float, iters: int) -> str:
  fix = (
    "a smaller neumann_step (the series diverges unless 0 < neumann_step < "
    "2 / lambda_max(H)) or more maxiter"
    if spec.solver == "neumann"
    else "more maxiter"
  )
  return (
    f"the {spec.solver} solve of H v = dV/dtheta_T did not converge: relative residual "
    f"||H v - b|| / ||b|| = {relative:.3g} > tol = {spec.tol:.3g} after {iters} "
    f"Hessian-vector products (maxiter = {spec.maxiter}). Fixes: {fix}; a looser tol. If "
    "it does not converge at all, the Hessian may not be positive definite: the final "
    "inner parameters are not a minimum of inner_loss."
  )


def _report_values(spec: _Spec, grad_norm, relative, iters, converged) -> None:
  """Raises or warns (``spec.unconverged``) on concrete values; batched values too (vmap)."""
  failures: list[tuple[type[RuntimeError], str]] = []
  grad_norm = float(np.max(np.asarray(grad_norm)))
  if not grad_norm <= spec.grad_tol:
    failures.append((UnconvergedInnerError, _inner_message(spec, grad_norm)))
  if not np.all(np.asarray(converged)):
    relative = float(np.max(np.asarray(relative)))
    failures.append((UnconvergedSolveError, _solve_message(spec, relative, int(np.max(iters)))))
  for error, message in failures:
    if spec.unconverged == "raise":
      raise error(message)
    warnings.warn(f"{error.__name__}: {message}", RuntimeWarning, stacklevel=4)


def _report(spec: _Spec, info: ImplicitInfo) -> None:
  """Checks ``info`` now if it is concrete, else when the compiled program runs."""
  if spec.unconverged == "ignore":
    return
  values = (info.grad_norm, info.relative_residual, info.iterations, info.solve_converged)
  if any(is_tracer(x) for x in values):
    # Under jit the check runs on the host when the program runs; JAX reports an
    # exception raised there as a jax.errors.JaxRuntimeError carrying our message.
    jax.debug.callback(lambda *a: _report_values(spec, *a), *values)
  else:
    _report_values(spec, *values)


# ---------------------------------------------------------------------- public API


def _last_batch(inner_batches: Any) -> Any:
  return jax.tree.map(lambda x: x[-1], inner_batches)


def _stationarity_batch(inner_batches: Any, stationarity_batch: Any) -> Any:
  _check_leading_axis(inner_batches)
  return _last_batch(inner_batches) if stationarity_batch is None else stationarity_batch


def _check_reverse_mode(owner: str, inputs: Any) -> None:
  if is_forward_mode_traced(inputs):
    raise TypeError(
      f"{owner}'s run is differentiated in reverse mode only (jax.grad, jax.vjp): its "
      "derivative is a jax.custom_vjp. For forward-mode meta-gradients (jax.jvp, "
      "jax.jacfwd) use mfo.unroll, whose run forward mode differentiates exactly."
    )


def _make_core(spec: _Spec, inner_loss: Callable, forward: Callable) -> Callable:
  """``core((meta, params, opt_state, inner_batches, stationarity_batch)) -> (params_T, opt_state_T)``."""

  @jax.custom_vjp
  def core(inputs):
    meta, params, opt_state, batches, _ = inputs
    return forward(meta, params, opt_state, batches)

  def fwd(inputs):
    values, markers = primal_values_and_markers(inputs)
    meta, params, opt_state, batches, stat = values
    params_t, opt_state_t = forward(meta, params, opt_state, batches)
    grad_norm = optax.tree.norm(jax.grad(inner_loss)(params_t, meta, stat))
    # Only theta_T, the stationarity point's other inputs and one scalar are kept:
    # nothing of the T inner steps.
    return (params_t, opt_state_t), (params_t, meta, stat, grad_norm, markers)

  def bwd(res, cts):
    params_t, meta, stat, grad_norm, markers = res
    # opt_state_T is not defined by the stationarity condition: its cotangent is dropped.
    ct_params, _ = cts
    n_meta, n_stat = len(jax.tree.leaves(meta)), len(jax.tree.leaves(stat))
    wanted = [m is not None for m in markers[:n_meta] + markers[len(markers) - n_stat :]]
    b_leaves = cotangent_leaves(ct_params)
    if not any(wanted) or all(is_symbolic_zero(c) for c in b_leaves):
      return ((None, None, None, None, None),)
    b = jax.tree.unflatten(jax.tree.structure(params_t), [materialize_zero(c) for c in b_leaves])
    (ct_meta, ct_stat), _ = _implicit_cotangents(
      spec, inner_loss, params_t, meta, stat, b, grad_norm, wanted
    )
    return ((ct_meta, None, None, None, ct_stat),)

  core.defvjp(fwd, bwd, symbolic_zeros=True)
  return core


def implicit_unroll(
  inner_loss: Callable[..., Any],
  inner_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None = None,
  solver: Solver = "cg",
  maxiter: int = 100,
  tol: float = 1e-5,
  neumann_step: jax.typing.ArrayLike | None = None,
  unconverged: Unconverged = "raise",
  grad_tol: float = 1e-4,
) -> Callable:
  r"""Builds ``run(meta_params, params, opt_state, inner_batches)`` with an implicit derivative.

  ``run`` computes the same T inner steps as :func:`mixflow_optax.unroll`
  and returns :math:`(\theta_T, s_T)`; what changes is its derivative. Instead
  of backpropagating through the steps, ``jax.grad`` / ``jax.vjp`` of a
  function of :math:`\theta_T` uses the implicit function theorem at the
  stationary point :math:`\nabla_\theta L(\theta_T, \eta, x_s) = 0`:

  .. math::

    \bar\eta = -\frac{\partial}{\partial\varepsilon}\,
      \nabla_\eta L(\theta_T + \varepsilon v, \eta, x_s)\Big|_{\varepsilon=0},
    \qquad
    H v = \bar\theta_T, \quad H = \nabla^2_{\theta\theta} L(\theta_T, \eta, x_s),

  where :math:`\bar\theta_T` is the incoming cotangent of :math:`\theta_T`
  (e.g. :math:`\nabla_\theta V`). The system is solved by conjugate gradients
  or a Neumann series, each product :math:`H p` one forward-over-reverse
  Hessian-vector product; :math:`\bar\eta` is one more forward-over-reverse
  pass. Memory does not grow with T: the backward pass keeps
  :math:`\theta_T` and :math:`x_s` only.

  **Which batch** :math:`x_s`. The implicit function theorem needs the
  stationarity condition of the objective the inner loop actually converged
  on. By default :math:`x_s` is the last inner batch, which is right for a
  full-batch inner problem (the same batch at every step). When the inner
  steps use different minibatches of one data set, pass that data set (or
  whatever defines the objective) as ``run(..., stationarity_batch=...)``.
  ``stationarity_batch`` is differentiated too (e.g. for data distillation).

  **What gets a gradient.** Only meta-parameters that enter ``inner_loss``
  (regularisation strengths, loss or example weights, a proximal anchor)
  and float leaves of :math:`x_s`. Hyperparameters of the *optimizer*
  (``hyperparams_fn``: a learning rate, Adam's betas) do not move a true
  fixed point, so their implicit meta-gradient is exactly zero, as is that of
  the initial parameters (MAML) and of the initial optimizer state: use
  :func:`mixflow_optax.unroll` for those (or, for iMAML, put a proximal term
  :math:`\frac{\lambda}{2}\|\theta - \phi\|^2` in ``inner_loss`` with
  :math:`\phi` in ``meta_params``). The cotangent of :math:`s_T` is dropped.

  **Convergence is checked.** In the backward pass, the inner gradient norm
  :math:`\|\nabla_\theta L(\theta_T, \eta, x_s)\|` must be at most
  ``grad_tol`` and the solver must reach ``tol`` within ``maxiter``; else
  ``unconverged`` decides: ``"raise"`` raises :class:`UnconvergedInnerError`
  or :class:`UnconvergedSolveError`; ``"warn"`` emits a ``RuntimeWarning``;
  ``"ignore"`` checks nothing. Outside ``jax.jit`` the exception is raised as
  is; inside, the check runs when the program runs and JAX raises a
  ``jax.errors.JaxRuntimeError`` whose message carries the exception's name
  and text. :func:`implicit_meta_grad` returns the numbers
  (:class:`ImplicitInfo`).

  Args:
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``, twice
      differentiable; its Hessian in ``params`` at :math:`\theta_T` should be
      positive definite (a strict local minimum) for ``"cg"`` and
      ``"neumann"``.
    inner_opt: the inner optimizer, as in :func:`mixflow_optax.unroll`.
    hyperparams_fn: as in :func:`mixflow_optax.unroll` (used by the forward
      steps; it gets no implicit gradient, see above).
    solver: ``"cg"`` (conjugate gradients, default) or ``"neumann"`` (the
      series :math:`v = \alpha\sum_k (I - \alpha H)^k \bar\theta_T`,
      computed as Richardson iteration; needs ``neumann_step``).
    maxiter: at most this many Hessian-vector products in the solve.
    tol: stop when :math:`\|H v - \bar\theta_T\| \le \mathrm{tol}\,
      \|\bar\theta_T\|`.
    neumann_step: the step :math:`\alpha` of ``"neumann"``; it converges for
      :math:`0 < \alpha < 2/\lambda_{\max}(H)` (a stable inner SGD learning
      rate is one: Neumann with that step is the unrolled SGD backward pass
      at the fixed point).
    unconverged: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` when the
      inner gradient norm exceeds ``grad_tol`` or the solve does not reach
      ``tol``.
    grad_tol: the largest inner gradient norm (global 2-norm over the leaves
      of ``params``) taken as converged. The implicit meta-gradient's
      relative error is of the order of :math:`\|H^{-1}\nabla_\theta L\|`
      relative to the parameters' sensitivity: set it to what your inner
      problem is solved to.

  Returns:
    ``run(meta_params, params, opt_state, inner_batches, *,
    stationarity_batch=None) -> (params_T, opt_state_T)``, with the call
    convention of :func:`mixflow_optax.unroll`'s ``run``. Differentiate it
    with ``jax.grad`` / ``jax.vjp`` (reverse mode); jit and vmap it.

  Examples:
    Ridge regression with a learned log L2 strength, solved by 200 steps of
    gradient descent:

    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> x = jnp.array([[1.0, 0.5], [0.2, 1.0], [-0.3, 0.8]])
    >>> y = jnp.array([1.0, -1.0, 0.5])
    >>> def inner_loss(w, log_l2, batch):
    ...   x, y = batch
    ...   return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(log_l2) * w @ w
    >>> opt = mfo.transforms.sgd(0.5)
    >>> run = mfo.implicit_unroll(inner_loss, opt)
    >>> batches = (jnp.broadcast_to(x, (200, 3, 2)), jnp.broadcast_to(y, (200, 3)))
    >>> def meta_loss(log_l2):
    ...   w, _ = run(log_l2, jnp.zeros(2), opt.init(jnp.zeros(2)), batches)
    ...   return jnp.sum((w - jnp.array([1.0, 0.0])) ** 2)
    >>> g = jax.jit(jax.grad(meta_loss))(jnp.log(0.1))
    >>> exact = jax.grad(lambda l: jnp.sum((jnp.linalg.solve(
    ...   x.T @ x / 3 + jnp.exp(l) * jnp.eye(2), x.T @ y / 3) - jnp.array([1.0, 0.0])) ** 2))
    >>> bool(jnp.allclose(g, exact(jnp.log(0.1)), rtol=1e-4))
    True

  References:
    Lorraine, Vicol, Duvenaud, `Optimizing Millions of Hyperparameters by
    Implicit Differentiation <https://arxiv.org/abs/1911.02590>`_, AISTATS
    2020 (the Neumann series; the zero implicit gradient of optimizer
    hyperparameters).
  """
  owner = "mixflow_optax.implicit_unroll"
  spec = _spec(owner, solver, maxiter, tol, neumann_step, unconverged, grad_tol)
  forward = unroll(
    inner_loss, inner_opt, hyperparams_fn=hyperparams_fn, mode="standard", remat=False
  )
  core = _make_core(spec, inner_loss, forward)

  def run(meta_params, params, opt_state, inner_batches, *, stationarity_batch=None):
    check_params(params)
    stat = _stationarity_batch(inner_batches, stationarity_batch)
    inputs = (meta_params, params, opt_state, inner_batches, stat)
    _check_reverse_mode(owner, inputs)
    return core(inputs)

  return run


def implicit_meta_grad(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None = None,
  solver: Solver = "cg",
  maxiter: int = 100,
  tol: float = 1e-5,
  neumann_step: jax.typing.ArrayLike | None = None,
  unconverged: Unconverged = "raise",
  grad_tol: float = 1e-4,
) -> Callable[..., ImplicitMetaGrad]:
  r"""Builds ``fn(meta_params, params, opt_state, inner_batches, outer_batch)``: an implicit meta-step.

  The meta-gradient of :func:`implicit_unroll`, computed directly, with the
  numbers of its checks returned:

  .. math::

    \theta_T = \mathrm{unroll}(\theta_0, s_0, x_{1..T}; \eta), \quad
    H v = \nabla_\theta V(\theta_T, \eta), \quad
    \frac{dV}{d\eta} = \nabla_\eta V(\theta_T, \eta)
      - \frac{\partial}{\partial\varepsilon}
        \nabla_\eta L(\theta_T + \varepsilon v, \eta, x_s)\Big|_{\varepsilon=0}.

  This is the piece to build an outer loop on: pass ``grad`` to an optax
  outer optimizer and start the next inner run from ``params`` (warm start),
  as :func:`mixflow_optax.meta_optimizer` does online.

  Args:
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``, as in
      :func:`implicit_unroll`.
    outer_loss: ``outer_loss(params, meta_params, batch) -> scalar`` (the
      signature :func:`mixflow_optax.meta_optimizer` takes), evaluated at
      :math:`\theta_T`; its direct dependence on ``meta_params`` is included.
    inner_opt: the optimizer that solves the inner problem, as in
      :func:`implicit_unroll`.
    hyperparams_fn: as in :func:`implicit_unroll`.
    solver: as in :func:`implicit_unroll`.
    maxiter: as in :func:`implicit_unroll`.
    tol: as in :func:`implicit_unroll`.
    neumann_step: as in :func:`implicit_unroll`.
    unconverged: as in :func:`implicit_unroll`.
    grad_tol: as in :func:`implicit_unroll`.

  Returns:
    ``fn(meta_params, params, opt_state, inner_batches, outer_batch, *,
    stationarity_batch=None) -> ImplicitMetaGrad(value, grad, params,
    opt_state, info)``, a pure function (jit it).

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> inner_loss = lambda w, log_l2, x: jnp.sum((w - x) ** 2) + jnp.exp(log_l2) * w @ w
    >>> outer_loss = lambda w, log_l2, target: jnp.sum((w - target) ** 2)
    >>> opt = mfo.transforms.sgd(0.2)
    >>> fn = mfo.implicit_meta_grad(inner_loss, outer_loss, opt, grad_tol=1e-6)
    >>> xs = jnp.ones((100, 2))
    >>> out = jax.jit(fn)(jnp.log(0.5), jnp.zeros(2), opt.init(jnp.zeros(2)), xs, jnp.zeros(2))
    >>> bool(out.grad < 0), bool(out.info.grad_norm < 1e-6)  # stronger L2 helps; converged
    (True, True)
  """
  owner = "mixflow_optax.implicit_meta_grad"
  spec = _spec(owner, solver, maxiter, tol, neumann_step, unconverged, grad_tol)
  forward = unroll(
    inner_loss, inner_opt, hyperparams_fn=hyperparams_fn, mode="standard", remat=False
  )

  def fn(meta_params, params, opt_state, inner_batches, outer_batch, *, stationarity_batch=None):
    check_params(params)
    stat = _stationarity_batch(inner_batches, stationarity_batch)
    params_t, opt_state_t = forward(meta_params, params, opt_state, inner_batches)
    params_t, opt_state_t = jax.lax.stop_gradient((params_t, opt_state_t))
    value, (b, direct) = jax.value_and_grad(outer_loss, argnums=(0, 1))(
      params_t, meta_params, outer_batch
    )
    grad_norm = optax.tree.norm(jax.grad(inner_loss)(params_t, meta_params, stat))
    wanted = [True] * len(jax.tree.leaves(meta_params)) + [False] * len(jax.tree.leaves(stat))
    (ct_meta, _), info = _implicit_cotangents(
      spec, inner_loss, params_t, meta_params, stat, b, grad_norm, wanted
    )
    grad = jax.tree.map(
      lambda d, c: d if c is None else d + c, direct, ct_meta, is_leaf=lambda x: x is None
    )
    return ImplicitMetaGrad(value, grad, params_t, opt_state_t, info)

  return fn
