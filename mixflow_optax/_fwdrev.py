r"""The mixed-mode differentiation rule: forward-over-reverse inner gradients.

The inner gradient :math:`g = \nabla_\theta L(z)` of a scalar loss over all its
inputs :math:`z = (\theta, \eta, x)` is wrapped in a :class:`jax.custom_vjp` whose
backward rule uses the symmetry of the Hessian of :math:`L`:

.. math::

  \bar z \;=\; \Big(\frac{\partial \nabla_\theta L}{\partial z}\Big)^{\!\top}
  \bar g \;=\; \frac{\partial}{\partial \varepsilon}\,
  \nabla_z L(\theta + \varepsilon \bar g, \eta, x)\Big|_{\varepsilon = 0},

one forward-mode (:func:`jax.jvp`) pass over the full gradient
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
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixflow_optax._checks import (
  check_bool,
  check_float_tree,
  describe,
  is_float,
)
from mixflow_optax._jax_internals import (
  JAX_FORWARD_MODE_ERRORS,
  ForwardModeUnsupported,
  _has_staged_custom_vjp_jvp,
  cotangent_leaves,
  is_forward_mode_traced,
  is_symbolic_zero,
  materialize_zero,
  primal_values_and_markers,
)

__all__ = [
  "ForwardModeError",
  "fwdrev_grad",
  "fwdrev_value_and_grad",
]

Fallback = Literal["raise", "reverse"]
FALLBACKS = ("raise", "reverse")


class ForwardModeError(TypeError):
  """The loss contains an operation that JAX cannot differentiate in forward mode."""


def _name(fun: Callable) -> str:
  return getattr(fun, "__name__", repr(fun))


def _forward_mode_message(fun: Callable, err: Exception) -> str:
  return (
    f"mixflow_optax could not differentiate the inner loss {_name(fun)!r} in forward "
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


def _not_twice_differentiable_message(fun: Callable, err: Exception) -> str:
  return (
    f"the inner loss {_name(fun)!r} cannot be differentiated twice, in any mode: a "
    "meta-gradient needs second derivatives of it, and an operation in it has no "
    f"derivative rule that is itself differentiable. JAX said: {type(err).__name__}: "
    f"{err}\nfallback='reverse' and mode='standard' fail the same way. Give that "
    "operation (e.g. a jax.pure_callback) a jax.custom_jvp rule written in JAX "
    "operations, or keep it out of the inner loss."
  )


# How a loss declares an auxiliary output, per entry point: the flag, the pair
# it then returns, and what to say when a pair comes back without the flag.
_AUX_HINTS = {
  "has_aux": (
    "(loss, aux)",
    "If it returns (loss, aux), pass has_aux=True.",
  ),
  "has_model_state": (
    "(loss, new_model_state)",
    "inner_loss returns the loss alone, or (loss, new_model_state) with "
    "has_model_state=True; compute metrics from the returned params instead.",
  ),
}


def _check_scalar_loss(fun: Callable, out: Any, has_aux: bool, aux_flag: str = "has_aux") -> Any:
  """The loss in ``out``, after checking that ``fun`` returned what it declared."""
  pair, hint = _AUX_HINTS[aux_flag]
  is_pair = isinstance(out, (tuple, list)) and len(out) == 2
  if has_aux and not is_pair:
    raise TypeError(
      f"{_name(fun)!r} was declared with {aux_flag}=True, so it must return a pair "
      f"{pair}; it returned {describe(out)}."
    )
  if not has_aux and isinstance(out, (tuple, list)):
    raise TypeError(
      f"{_name(fun)!r} returned a {type(out).__name__} of {len(out)}; it must return a "
      f"real scalar loss. {hint}"
    )
  loss = out[0] if has_aux else out
  shape = jnp.shape(loss)
  if shape != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
    raise TypeError(
      f"{_name(fun)!r} must return a real scalar loss (shape (), floating dtype), "
      f"but it returned shape {shape} and dtype {jnp.result_type(loss)}. Reduce it to "
      "a scalar (e.g. jnp.mean over the batch)"
      + (
        " or return (loss, aux) with has_aux=True."
        if aux_flag == "has_aux" and not has_aux
        else "."
      )
    )
  return loss


def checked_loss(fun: Callable, has_aux: bool, aux_flag: str = "has_aux") -> Callable:
  """``fun`` with its output checked: a real scalar loss, or the declared pair."""

  @functools.wraps(fun)
  def checked(*args, **kwargs):
    out = fun(*args, **kwargs)
    _check_scalar_loss(fun, out, has_aux, aux_flag)
    return out

  return checked


def _argnums_tuple(argnums: int | Sequence[int]) -> tuple[int, ...]:
  if isinstance(argnums, int):
    return (argnums,)
  return tuple(argnums)


def _non_float_arg_message(fun: Callable, i: int, path: str, dtype: Any) -> str:
  return (
    f"fwdrev_grad differentiates {_name(fun)!r} with respect to argument {i}, whose "
    f"leaf {path} has dtype {dtype}. Gradients are only defined for floating "
    "point inputs: cast it to a float dtype, or pass it in another argument "
    "(integer inputs such as token ids are fine there)."
  )


def _check_diff_args(fun: Callable, args: tuple, argnums: tuple[int, ...]) -> None:
  for i in argnums:
    if i >= len(args):
      raise TypeError(
        f"argnums={argnums} refers to positional argument {i}, but {_name(fun)!r} "
        f"was called with {len(args)} positional arguments."
      )
    check_float_tree(f"argument {i}", args[i], functools.partial(_non_float_arg_message, fun, i))


def _check_fallback(fallback: Any) -> None:
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be 'raise' or 'reverse', got {fallback!r}.")


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
  :func:`jax.grad` of a meta-loss through an unrolled inner loop). With cotangents
  :math:`\bar v` for the value and :math:`\bar g` for the gradient, the
  cotangent of every differentiated input :math:`z` is

  .. math::

    \bar z \;=\; \frac{\partial}{\partial \varepsilon}\,\nabla_z
    L(\theta + \varepsilon \bar g, z_{\setminus\theta})\Big|_{\varepsilon=0}
    \;+\; \bar v\,\nabla_z L,

  i.e. one :func:`jax.jvp` over the full gradient :math:`\nabla_z L` (a
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
  a :class:`jax.custom_vjp` / ``custom_jvp`` whose rule is *not* the exact
  derivative (straight-through estimators, gradient clipping inside a
  backward rule): then use plain :func:`jax.grad` (``mode="standard"``);
  :func:`mixflow_optax.check_meta_gradient` tells whether a loss is affected.

  Keyword arguments are passed to ``fun`` and not differentiated by the inner
  gradient, as in :func:`jax.grad` (an outer transformation still
  differentiates through them). Under :func:`jax.jvp` / :func:`jax.jacfwd` the call is
  plain :func:`jax.value_and_grad`, which forward mode already differentiates
  forward-over-reverse.

  Args:
    fun: scalar loss ``fun(*args)`` (or ``(loss, aux)`` with ``has_aux``).
    argnums: which positional argument(s) to take the gradient of.
    has_aux: whether ``fun`` returns ``(loss, aux)``. ``aux`` is returned as
      :func:`jax.value_and_grad` does and is differentiated exactly too.
    fallback: what to do if the loss cannot be differentiated in forward mode
      (a :class:`jax.custom_vjp` whose rules block :func:`jax.jvp`). ``"raise"``
      (default) raises :class:`ForwardModeError` naming the fix;
      ``"reverse"`` warns and differentiates that call reverse-over-reverse
      (exact, but without the memory saving).

  Returns:
    A function ``(*args, **kwargs) -> ((value, aux) | value, grads)``.

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
  _check_fallback(fallback)
  check_bool("fwdrev_value_and_grad", "has_aux", has_aux)
  return value_and_grad_fn(fun, argnums, has_aux=has_aux, fallback=fallback)


def value_and_grad_fn(
  fun: Callable,
  argnums: int | Sequence[int] = 0,
  *,
  has_aux: bool = False,
  fallback: Fallback = "raise",
  aux_flag: str = "has_aux",
) -> Callable:
  """:func:`fwdrev_value_and_grad`, with the flag its messages name for ``has_aux``."""
  argnums_t = _argnums_tuple(argnums)

  @functools.wraps(fun)
  def value_and_grad(*args, **kwargs):
    _check_diff_args(fun, args, argnums_t)
    # Keyword arguments are closed over, as jax.grad passes them: Python values
    # stay static. Traced values the loss closes over (e.g. a meta-parameter
    # captured by a lambda or passed by keyword) become explicit inputs, so
    # they receive cotangents as well.
    call = lambda *a: fun(*a, **kwargs)
    converted, consts = jax.closure_convert(call, *args)
    if is_forward_mode_traced((args, kwargs, consts)):
      # A custom_vjp cannot run under jax.jvp; there the plain gradient is
      # already differentiated forward-over-reverse.
      plain = jax.value_and_grad(checked_loss(fun, has_aux, aux_flag), argnums_t, has_aux)
      out, grads = plain(*args, **kwargs)
      return out, (grads[0] if len(argnums_t) == 1 else grads)
    loss = _InnerLoss(fun, converted, argnums_t, has_aux, fallback, aux_flag)
    return _make_core(loss)((args, tuple(consts)))

  return value_and_grad


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
  (:func:`jax.grad` / :func:`jax.vjp` of a meta-loss) with respect to ``params`` or
  any floating leaf of ``args`` runs one forward-over-reverse pass per call,
  the Hessian-vector product

  .. math::

    \bar z = \frac{\partial}{\partial \varepsilon}
    \nabla_z L(\theta + \varepsilon \bar g, \eta, x)\Big|_{\varepsilon=0},

  and stores only the call's inputs. See :func:`fwdrev_value_and_grad` for
  the details.

  Args:
    fun: scalar loss ``fun(*args)`` (or ``(loss, aux)`` with ``has_aux``).
    argnums: which positional argument(s) to take the gradient of.
    has_aux: whether ``fun`` returns ``(loss, aux)``; the function then returns
      ``(grads, aux)``, as :func:`jax.grad` does.
    fallback: ``"raise"`` (default) or ``"reverse"``, what to do where the loss cannot be
      differentiated in forward mode, as in :func:`fwdrev_value_and_grad`.

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
  def grad_fn(*args, **kwargs):
    out, grads = vg(*args, **kwargs)
    if has_aux:
      return grads, out[1]
    return grads

  return grad_fn


class _InnerLoss(NamedTuple):
  """The loss one rule differentiates, over ``inputs = (args, consts)``."""

  fun: Callable  # the user's function, named in messages
  converted: Callable  # closure-converted: converted(*args, *consts)
  argnums: tuple[int, ...]
  has_aux: bool
  fallback: Fallback
  aux_flag: str

  def loss_and_aux(self, inputs: Any) -> tuple[jax.Array, Any]:
    args, consts = inputs
    out = self.converted(*args, *consts)
    loss = _check_scalar_loss(self.fun, out, self.has_aux, self.aux_flag)
    return loss, (out[1] if self.has_aux else None)

  def value_and_grad(self, inputs: Any) -> tuple[Any, Any]:
    """The primal: ``((loss, aux) | loss, grads)``, as :func:`jax.value_and_grad`."""
    args, consts = inputs

    def wrt(diff):
      new_args = list(args)
      for i, v in zip(self.argnums, diff):
        new_args[i] = v
      return self.loss_and_aux((tuple(new_args), consts))

    diff = tuple(args[i] for i in self.argnums)
    (loss, aux), grads = jax.value_and_grad(wrt, has_aux=True)(diff)
    grads = grads[0] if len(self.argnums) == 1 else grads
    return ((loss, aux) if self.has_aux else loss), grads


def _make_core(loss: _InnerLoss) -> Callable:
  """The custom_vjp function ``inputs -> ((loss, aux) | loss, grads)``."""

  @jax.custom_vjp
  def core(inputs):
    return loss.value_and_grad(inputs)

  def fwd(inputs):
    # Only the inputs are saved: nothing of the inner forward or backward pass.
    values, markers = primal_values_and_markers(inputs)
    return loss.value_and_grad(values), (values, markers)

  def bwd(res, cts):
    values, markers = res
    return (_rule_bwd(loss, _LinearizationPoint.of(values, markers, loss.argnums), cts),)

  core.defvjp(fwd, bwd, symbolic_zeros=True)
  return core


class _LinearizationPoint(NamedTuple):
  """The rule's inputs as flat leaves, with the positions that take part."""

  flat: list[Any]
  treedef: Any
  theta_idx: list[int]  # leaves of the differentiated arguments (theta)
  diff_idx: list[int]  # leaves that need a cotangent: perturbed, floating point

  @classmethod
  def of(cls, values: Any, markers: tuple, argnums: tuple[int, ...]) -> _LinearizationPoint:
    flat, treedef = jax.tree.flatten(values)
    offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in values[0]])
    theta_idx = [j for i in argnums for j in range(offsets[i], offsets[i + 1])]
    diff_idx = [j for j, (x, m) in enumerate(zip(flat, markers)) if m is not None and is_float(x)]
    return cls(flat, treedef, theta_idx, diff_idx)

  def substitute(self, *assignments: tuple[list[int], Sequence[Any]]) -> list[Any]:
    """The leaves with ``values`` at ``positions``, for each pair in order."""
    leaves = list(self.flat)
    for positions, values in assignments:
      for j, v in zip(positions, values):
        leaves[j] = v
    return leaves

  def inputs(self, *assignments: tuple[list[int], Sequence[Any]]) -> Any:
    return jax.tree.unflatten(self.treedef, self.substitute(*assignments))

  def cotangents(self, ct: list[jax.Array]) -> Any:
    out: list[Any] = [None] * len(self.flat)
    for j, c in zip(self.diff_idx, ct):
      out[j] = c.astype(jnp.result_type(self.flat[j]))
    return jax.tree.unflatten(self.treedef, out)


def _rule_bwd(loss: _InnerLoss, point: _LinearizationPoint, cts: Any) -> Any:
  r"""Cotangents of the inputs: HVP term + :math:`\bar v \nabla_z L` + aux term."""
  if not point.diff_idx:
    return None
  out_ct, g_bar = cts
  v_bar, aux_bar = out_ct if loss.has_aux else (out_ct, None)
  v_bar, aux_bar, g_bar = _value_ct(v_bar), _aux_cts(aux_bar), _grad_cts(g_bar)

  ct = [jnp.zeros_like(point.flat[j]) for j in point.diff_idx]
  if g_bar is not None:
    ct, v_bar = _add_second_order_term(ct, loss, point, g_bar, v_bar)
  if v_bar is not None or aux_bar is not None:
    ct = _add(ct, _first_order_term(loss, point, v_bar, aux_bar))
  return point.cotangents(ct)


def _value_ct(v_bar: Any) -> jax.Array | None:
  """The loss value's cotangent, or None if it is zero."""
  if v_bar is None or is_symbolic_zero(v_bar):
    return None
  return v_bar


def _aux_cts(aux_bar: Any) -> list[Any] | None:
  """The aux output's cotangent leaves, or None if none is a nonzero float."""
  leaves = [a for a in cotangent_leaves(aux_bar)]
  if all(is_symbolic_zero(a) or not is_float(a) for a in leaves):
    return None
  return leaves


def _grad_cts(g_bar: Any) -> list[jax.Array] | None:
  """The gradient's cotangent leaves with zeros materialised, or None if all are zero."""
  leaves = cotangent_leaves(g_bar)
  if all(is_symbolic_zero(g) for g in leaves):
    return None
  return [materialize_zero(g) for g in leaves]


def _add(xs: list[jax.Array], ys: Sequence[jax.Array]) -> list[jax.Array]:
  return [x + y for x, y in zip(xs, ys)]


def _add_second_order_term(
  ct: list[jax.Array],
  loss: _InnerLoss,
  point: _LinearizationPoint,
  g_bar: list[jax.Array],
  v_bar: jax.Array | None,
) -> tuple[list[jax.Array], jax.Array | None]:
  r"""``ct`` plus the HVP term, and the value's term if the same jvp gave :math:`\nabla_z L`.

  Returns the sum and the value's cotangent still to be added (None once it is).
  """
  hvp, grad = _hvp_term(loss, point, g_bar)
  ct = _add(ct, hvp)
  if v_bar is None or grad is None:
    return ct, v_bar
  # The value's term v_bar * grad_z L is the primal output of the same jvp.
  return _add(ct, [v_bar * p for p in grad]), None


def _hvp_term(
  loss: _InnerLoss, point: _LinearizationPoint, g_bar: list[jax.Array]
) -> tuple[list[jax.Array], list[jax.Array] | None]:
  """``(hvp, grad_z L)`` by one forward-over-reverse pass; reverse-over-reverse on fallback."""
  theta0 = [point.flat[j] for j in point.theta_idx]

  def full_grad(theta):
    # Gradient of L w.r.t. every input that needs a cotangent, as a function
    # of theta: its jvp along g_bar is the Hessian-vector product we want.
    at_theta = point.substitute((point.theta_idx, theta))
    base = [at_theta[j] for j in point.diff_idx]
    wrt = lambda d: loss.loss_and_aux(point.inputs((point.theta_idx, theta), (point.diff_idx, d)))
    return jax.grad(lambda d: wrt(d)[0])(base)

  try:
    grad, hvp = _traced_jvp(full_grad, theta0, g_bar)
    return hvp, grad
  except (ForwardModeUnsupported, *JAX_FORWARD_MODE_ERRORS) as err:
    reverse = functools.partial(_reverse_term, loss, point, g_bar)
    if not isinstance(err, ForwardModeUnsupported) and not _traces(reverse):
      raise ForwardModeError(_not_twice_differentiable_message(loss.fun, err)) from err
    if loss.fallback == "raise":
      raise ForwardModeError(_forward_mode_message(loss.fun, err)) from err
    warnings.warn(
      _forward_mode_message(loss.fun, err)
      + "\nFalling back to reverse-over-reverse for this call.",
      stacklevel=2,
    )
    return reverse(), None


def _traced_jvp(f: Callable, primals: Any, tangents: Any) -> tuple[Any, Any]:
  """``jax.jvp(f, (primals,), (tangents,))``, tracing ``f`` once.

  The jvp is traced to a jaxpr (which :func:`check_forward_mode_traceable`'s
  test for a staged custom_vjp needs anyway) and that jaxpr is evaluated in the
  enclosing trace, instead of tracing the loss's forward-over-reverse pass a
  second time: the same operations in the same order, half the tracing of the
  rule's backward pass (a sizeable share of a meta-gradient's compile time).
  """
  traced = jax.make_jaxpr(lambda p, t: jax.jvp(f, (p,), (t,)), return_shape=True)
  closed, out_shape = traced(primals, tangents)
  if _has_staged_custom_vjp_jvp(closed.jaxpr):
    raise ForwardModeUnsupported(
      "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
    )
  flat = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves((primals, tangents)))
  return jax.tree.unflatten(jax.tree.structure(out_shape), flat)


def _reverse_term(
  loss: _InnerLoss, point: _LinearizationPoint, g_bar: list[jax.Array]
) -> list[jax.Array]:
  """The HVP term reverse-over-reverse: the gradient of <grad_theta L, g_bar>."""

  def gdot(d):
    at_d = point.substitute((point.diff_idx, d))
    theta = [at_d[j] for j in point.theta_idx]
    wrt = lambda th: loss.loss_and_aux(point.inputs((point.diff_idx, d), (point.theta_idx, th)))
    g = jax.grad(lambda th: wrt(th)[0])(theta)
    return sum(jnp.vdot(a, b) for a, b in zip(g, g_bar))

  return jax.grad(gdot)([point.flat[j] for j in point.diff_idx])


def _traces(fn: Callable) -> bool:
  """Whether ``fn()`` can be traced (JAX raises no differentiation error)."""
  try:
    jax.make_jaxpr(fn)()
  except JAX_FORWARD_MODE_ERRORS:
    return False
  return True


def _first_order_term(
  loss: _InnerLoss, point: _LinearizationPoint, v_bar: jax.Array | None, aux_bar: list[Any] | None
) -> list[jax.Array]:
  """The value's and aux's own cotangents: the gradient of ``v_bar L + <aux_bar, aux>``."""

  def first_order(d):
    value, aux = loss.loss_and_aux(point.inputs((point.diff_idx, d)))
    total = jnp.zeros((), value.dtype)
    if v_bar is not None:
      total = total + v_bar * value
    if aux_bar is not None:
      for a, b in zip(jax.tree.leaves(aux), aux_bar):
        if is_float(a) and not is_symbolic_zero(b):
          total = total + jnp.sum(a * b)
    return total

  return jax.grad(first_order)([point.flat[j] for j in point.diff_idx])
