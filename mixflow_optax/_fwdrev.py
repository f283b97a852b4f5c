r"""The mixed-mode differentiation rule: forward-over-reverse inner gradients.

The inner gradient :math:`g = \nabla_\theta L(z)` of a scalar loss over all its
inputs :math:`z = (\theta, \eta, x)` is wrapped in a ``jax.custom_vjp`` whose
backward rule uses the symmetry of the Hessian of :math:`L`:

.. math::

  \bar z \;=\; \Big(\frac{\partial \nabla_\theta L}{\partial z}\Big)^{\!\top}
  \bar g \;=\; \frac{\partial}{\partial \varepsilon}\,
  \nabla_z L(\theta + \varepsilon \bar g, \eta, x)\Big|_{\varepsilon = 0},

one forward-mode (``jax.jvp``) pass over the full gradient
:math:`\nabla_z L` instead of reverse-over-reverse. The primal saves only the
call's inputs, so nothing of the inner forward or backward pass is stored for
the outer backward pass.

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 3).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from mixflow_optax._checks import first_non_float_leaf, is_float

__all__ = [
  "ForwardModeError",
  "fwdrev_grad",
  "fwdrev_value_and_grad",
]

Fallback = Literal["raise", "reverse"]


class ForwardModeError(TypeError):
  """The loss contains an operation that JAX cannot differentiate in forward mode."""


def _is_forward_mode_failure(err: Exception) -> bool:
  msg = str(err).lower()
  return any(s in msg for s in ("forward-mode", "jvp", "custom_vjp", "does not support jvp"))


def _forward_mode_message(fun: Callable, err: Exception) -> str:
  name = getattr(fun, "__name__", repr(fun))
  return (
    f"mixflow_optax could not differentiate the inner loss {name!r} in forward "
    "mode, which the mixed-mode meta-gradient rule needs (one jax.jvp over the "
    f"inner gradient). JAX said: {type(err).__name__}: {err}\n"
    "This usually means the loss calls a jax.custom_vjp function (e.g. a fused "
    "attention or Pallas kernel) whose rules cannot be run under jax.jvp. Fixes, "
    "best first: (1) use an implementation of that operation with a "
    "jax.custom_jvp rule or plain JAX ops; (2) pass fallback='reverse' to "
    "fwdrev_grad / mfo.unroll, which differentiates that step reverse-over-"
    "reverse (exact, but without the memory saving of the inner step); "
    "(3) use mode='standard' in mfo.unroll."
  )


def _jaxprs_of(value: Any):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs_of(v)


def _has_staged_custom_vjp_jvp(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "custom_lin":
      return True
    for param in eqn.params.values():
      if any(_has_staged_custom_vjp_jvp(sub) for sub in _jaxprs_of(param)):
        return True
  return False


def _check_forward_mode_traceable(f: Callable, primals: Any, tangents: Any) -> None:
  """Raises now if ``jax.jvp(f)`` would fail later.

  Under staging (``lax.scan``, ``jax.checkpoint``, ``jit``), JAX does not
  raise when forward mode meets a ``custom_vjp`` function: it stages a
  ``custom_lin`` operation that fails only when the program runs, past any
  handler here. Tracing the jvp once and looking for it makes the failure
  (and the fallback) happen at the same place in every context.
  """
  jaxpr = jax.make_jaxpr(lambda p, t: jax.jvp(f, (p,), (t,)))(primals, tangents)
  if _has_staged_custom_vjp_jvp(jaxpr.jaxpr):
    raise TypeError("can't apply forward-mode autodiff (jvp) to a custom_vjp function.")


def _check_scalar_loss(fun: Callable, out: Any, has_aux: bool) -> Any:
  name = getattr(fun, "__name__", repr(fun))
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f"{name!r} was declared with has_aux=True, so it must return a pair "
        f"(loss, aux); it returned {type(out).__name__}."
      )
    loss = out[0]
  else:
    loss = out
  shape = jnp.shape(loss)
  if shape != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
    dtype = jnp.result_type(loss)
    raise TypeError(
      f"{name!r} must return a real scalar loss (shape (), floating dtype), "
      f"but it returned shape {shape} and dtype {dtype}. Reduce it to a scalar "
      "(e.g. jnp.mean over the batch)"
      + (" or return (loss, aux) with has_aux=True." if not has_aux else ".")
    )
  return loss


def _argnums_tuple(argnums: int | Sequence[int]) -> tuple[int, ...]:
  if isinstance(argnums, int):
    return (argnums,)
  return tuple(argnums)


def _check_diff_args(fun: Callable, args: tuple, argnums: tuple[int, ...]) -> None:
  name = getattr(fun, "__name__", repr(fun))
  for i in argnums:
    if i >= len(args):
      raise TypeError(
        f"argnums={argnums} refers to positional argument {i}, but {name!r} "
        f"was called with {len(args)} positional arguments."
      )
    bad = first_non_float_leaf(args[i])
    if bad is not None:
      path, dtype = bad
      raise TypeError(
        f"fwdrev_grad differentiates {name!r} with respect to argument {i}, whose "
        f"leaf {path} has dtype {dtype}. Gradients are only defined for floating "
        "point inputs: cast it to a float dtype, or pass it in another argument "
        "(integer inputs such as token ids are fine there)."
      )


def fwdrev_value_and_grad(
  fun: Callable,
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
  fallback: Fallback = "raise",
) -> Callable:
  r"""Like :func:`jax.value_and_grad`, differentiated forward-over-reverse.

  Returns a function with the same inputs and outputs as
  ``jax.value_and_grad(fun, argnums, has_aux=has_aux)``. Its value is computed
  the ordinary way; what changes is how it is *itself* differentiated (e.g. by
  ``jax.grad`` of a meta-loss through an unrolled inner loop). With cotangents
  :math:`\bar v` for the value and :math:`\bar g` for the gradient, the
  cotangent of every differentiated input :math:`z` is

  .. math::

    \bar z \;=\; \frac{\partial}{\partial \varepsilon}\,\nabla_z
    L(\theta + \varepsilon \bar g, z_{\setminus\theta})\Big|_{\varepsilon=0}
    \;+\; \bar v\,\nabla_z L,

  i.e. one ``jax.jvp`` over the full gradient :math:`\nabla_z L` (a
  Hessian-vector product). The term :math:`\bar v \nabla_z L` is the primal
  output of that same jvp, so it costs nothing. Only the call's inputs are
  saved as residuals.

  Cotangents are returned for every floating-point leaf of every argument that
  is being differentiated by the outer transformation; integer leaves (token
  ids, labels) and leaves the outer transformation does not perturb get zero
  cotangents, and their gradients are not computed.

  The rule relies on the symmetry of the Hessian of ``fun``. This holds for
  any twice-differentiable loss built from JAX operations (``stop_gradient``
  and exact ``custom_jvp`` rules included). It does not hold when ``fun`` uses
  a ``jax.custom_vjp`` / ``custom_jvp`` whose rule is *not* the exact
  derivative (straight-through estimators, gradient clipping inside a
  backward rule): then use plain ``jax.grad`` (``mode="standard"``).

  Args:
    fun: scalar loss ``fun(*args)`` (or ``(loss, aux)`` with ``has_aux``).
    argnums: which positional argument(s) to take the gradient of.
    has_aux: whether ``fun`` returns ``(loss, aux)``. ``aux`` is returned as
      ``jax.value_and_grad`` does and is differentiated exactly too.
    fallback: what to do if the loss cannot be differentiated in forward mode
      (a ``jax.custom_vjp`` whose rules block ``jax.jvp``). ``"raise"``
      (default) raises :class:`ForwardModeError` naming the fix;
      ``"reverse"`` warns and differentiates that call reverse-over-reverse
      (exact, but without the memory saving).

  Returns:
    A function ``(*args) -> ((value, aux) | value, grads)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import mixflow_optax as mfo
    >>> loss = lambda w, x: jnp.sum(jnp.sin(w * x))
    >>> vg = mfo.fwdrev_value_and_grad(loss)
    >>> meta = lambda x: jnp.sum(vg(jnp.array([1.0, 2.0]), x)[1] ** 2)
    >>> ref = lambda x: jnp.sum(jax.grad(loss)(jnp.array([1.0, 2.0]), x) ** 2)
    >>> bool(jnp.allclose(jax.grad(meta)(0.3), jax.grad(ref)(0.3)))
    True

  References:
    Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
    <https://arxiv.org/abs/2505.00793>`_, ICML 2025.
  """
  argnums_t = _argnums_tuple(argnums)
  if fallback not in ("raise", "reverse"):
    raise ValueError(f"fallback must be 'raise' or 'reverse', got {fallback!r}.")

  @functools.wraps(fun)
  def value_and_grad_fn(*args):
    _check_diff_args(fun, args, argnums_t)
    # Values the loss closes over (e.g. a traced meta-parameter captured by a
    # lambda) become explicit inputs, so they receive cotangents as well.
    converted, consts = jax.closure_convert(fun, *args)
    inputs = (tuple(args), tuple(consts))
    return _make_core(fun, converted, argnums_t, has_aux, fallback)(inputs)

  return value_and_grad_fn


def fwdrev_grad(
  fun: Callable,
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
  fallback: Fallback = "raise",
) -> Callable:
  r"""Drop-in for :func:`jax.grad` whose derivative is forward-over-reverse.

  ``fwdrev_grad(fun)(params, *args)`` has the same value as
  ``jax.grad(fun)(params, *args)``. Differentiating anything built on it
  (``jax.grad`` / ``jax.vjp`` of a meta-loss) with respect to ``params`` or
  any floating leaf of ``args`` runs one forward-over-reverse pass per call,
  the Hessian-vector product

  .. math::

    \bar z = \frac{\partial}{\partial \varepsilon}
    \nabla_z L(\theta + \varepsilon \bar g, \eta, x)\Big|_{\varepsilon=0},

  and stores only the call's inputs. See :func:`fwdrev_value_and_grad` for
  the details and the arguments.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import mixflow_optax as mfo
    >>> inner = lambda x, a: a * x ** 2
    >>> def outer(a, x0=2.0):  # one SGD step, then an outer loss
    ...   x1 = x0 - mfo.fwdrev_grad(inner)(x0, a)
    ...   return x1 ** 2
    >>> float(jax.grad(outer)(0.25))  # d/da (x0 - 2 a x0)^2 = -4 x0^2 (1 - 2a)
    -8.0
  """
  vg = fwdrev_value_and_grad(fun, argnums, has_aux=has_aux, fallback=fallback)

  @functools.wraps(fun)
  def grad_fn(*args):
    out, grads = vg(*args)
    if has_aux:
      return grads, out[1]
    return grads

  return grad_fn


def _make_core(
  fun: Callable,
  converted: Callable,
  argnums: tuple[int, ...],
  has_aux: bool,
  fallback: Fallback,
) -> Callable:
  """Builds the custom_vjp function over ``inputs = (args, consts)``."""

  def call(inputs):
    args, consts = inputs
    return converted(*args, *consts)

  def loss_and_aux(inputs):
    out = call(inputs)
    loss = _check_scalar_loss(fun, out, has_aux)
    return loss, (out[1] if has_aux else None)

  def value_and_grad_primal(inputs):
    diff = tuple(inputs[0][i] for i in argnums)

    def wrt(d):
      args = list(inputs[0])
      for i, v in zip(argnums, d):
        args[i] = v
      return loss_and_aux((tuple(args), inputs[1]))

    (loss, aux), grads = jax.value_and_grad(wrt, has_aux=True)(diff)
    grads = grads[0] if len(argnums) == 1 else grads
    return ((loss, aux) if has_aux else loss), grads

  @jax.custom_vjp
  def core(inputs):
    return value_and_grad_primal(inputs)

  def fwd(inputs):
    is_primal = lambda x: isinstance(x, CustomVJPPrimal)
    values = jax.tree.map(lambda p: p.value, inputs, is_leaf=is_primal)
    perturbed = [p.perturbed for p in jax.tree.leaves(inputs, is_leaf=is_primal)]
    # Which inputs the outer transformation perturbs is static: it is kept in
    # the residuals' tree structure (None / ()), not as arrays.
    markers = tuple(() if p else None for p in perturbed)
    return value_and_grad_primal(values), (values, markers)

  def bwd(res, cts):
    values, markers = res
    flat, treedef = jax.tree.flatten(values)
    perturbed = [m is not None for m in markers]
    out_ct, g_bar = cts
    v_bar, aux_bar = out_ct if has_aux else (out_ct, None)

    # Leaf positions of the differentiated arguments (theta) in `flat`.
    arg_offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in values[0]])
    theta_idx = [j for i in argnums for j in range(arg_offsets[i], arg_offsets[i + 1])]
    # Inputs that need a cotangent: perturbed floating-point leaves.
    diff_idx = [j for j, (x, p) in enumerate(zip(flat, perturbed)) if p and is_float(x)]
    if not diff_idx:
      return (None,)

    g_bar_flat = jax.tree.leaves(g_bar, is_leaf=lambda x: isinstance(x, SymbolicZero))
    g_is_zero = all(isinstance(g, SymbolicZero) for g in g_bar_flat)
    g_bar_flat = [
      jnp.zeros(g.aval.shape, g.aval.dtype) if isinstance(g, SymbolicZero) else g
      for g in g_bar_flat
    ]
    v_is_zero = v_bar is None or isinstance(v_bar, SymbolicZero)
    aux_leaves = jax.tree.leaves(aux_bar, is_leaf=lambda x: isinstance(x, SymbolicZero))
    aux_is_zero = all(isinstance(a, SymbolicZero) or not is_float(a) for a in aux_leaves)

    def loss_of(theta_vals, diff_vals):
      leaves = list(flat)
      for j, v in zip(theta_idx, theta_vals):
        leaves[j] = v
      for j, v in zip(diff_idx, diff_vals):
        leaves[j] = v
      return loss_and_aux(jax.tree.unflatten(treedef, leaves))

    def full_grad(theta_vals):
      # Gradient of L w.r.t. every input that needs a cotangent, as a function
      # of theta: its jvp along g_bar is the Hessian-vector product we want.
      pos = dict(zip(theta_idx, range(len(theta_idx))))
      base = [theta_vals[pos[j]] if j in pos else flat[j] for j in diff_idx]
      return jax.grad(lambda d: loss_of(theta_vals, d)[0])(base)

    theta0 = [flat[j] for j in theta_idx]
    ct = [jnp.zeros_like(flat[j]) for j in diff_idx]
    if not g_is_zero:
      try:
        _check_forward_mode_traceable(full_grad, theta0, g_bar_flat)
        primal, hvp = jax.jvp(full_grad, (theta0,), (g_bar_flat,))
      except Exception as err:  # noqa: BLE001 - re-raised unless forward mode
        if not _is_forward_mode_failure(err):
          raise
        if fallback == "raise":
          raise ForwardModeError(_forward_mode_message(fun, err)) from err
        warnings.warn(
          _forward_mode_message(fun, err) + "\nFalling back to reverse-over-reverse for this call.",
          stacklevel=2,
        )
        primal = None

        def gdot(d):
          # <grad_theta L, g_bar> at the point given by d, differentiated
          # w.r.t. d below: reverse-over-reverse for this call only.
          def loss_theta(th):
            leaves = list(flat)
            for j, v in zip(diff_idx, d):
              leaves[j] = v
            for j, v in zip(theta_idx, th):
              leaves[j] = v
            return loss_and_aux(jax.tree.unflatten(treedef, leaves))[0]

          pos = dict(zip(diff_idx, range(len(diff_idx))))
          th = [d[pos[j]] if j in pos else flat[j] for j in theta_idx]
          g = jax.grad(loss_theta)(th)
          return sum(jnp.vdot(a, b) for a, b in zip(g, g_bar_flat))

        hvp = jax.grad(gdot)([flat[j] for j in diff_idx])
      ct = [c + h for c, h in zip(ct, hvp)]
      if not v_is_zero and primal is not None:
        ct = [c + v_bar * p for c, p in zip(ct, primal)]
        v_is_zero = True
    if not v_is_zero or not aux_is_zero:
      # First-order terms: the value's and aux's own cotangents.
      def first_order(d):
        loss, aux = loss_of(theta0, d)
        total = jnp.zeros((), loss.dtype)
        if not v_is_zero:
          total = total + v_bar * loss
        if not aux_is_zero:
          for a, b in zip(jax.tree.leaves(aux), aux_leaves):
            if is_float(a) and not isinstance(b, SymbolicZero):
              total = total + jnp.sum(a * b)
        return total

      fo = jax.grad(first_order)([flat[j] for j in diff_idx])
      ct = [c + f for c, f in zip(ct, fo)]

    out = [None] * len(flat)
    for j, c in zip(diff_idx, ct):
      out[j] = c.astype(jnp.result_type(flat[j]))
    return (jax.tree.unflatten(treedef, out),)

  core.defvjp(fwd, bwd, symbolic_zeros=True)
  return core
