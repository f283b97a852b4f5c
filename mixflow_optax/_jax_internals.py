"""The JAX internals mixflow_optax relies on, in one place.

Everything here reaches below JAX's stable API (:mod:`jax.extend.core`, the
``custom_lin`` primitive, ``CustomVJPPrimal`` / ``SymbolicZero`` of
``custom_vjp(..., symbolic_zeros=True)``, tracer classes). When JAX moves one
of them, this module is the only one to change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

_JVP_TRACERS: tuple[type, ...]
try:  # Tracer classes of forward-mode autodiff (jax.jvp) and of reverse mode.
  from jax._src.interpreters.ad import JVPTracer as _JVPTracer

  _JVP_TRACERS = (_JVPTracer,)
except ImportError:  # pragma: no cover - other JAX layouts
  _JVP_TRACERS = ()

try:  # The current trace, and the kinds of traces a custom_vjp call is processed by.
  from jax._src.core import trace_ctx as _trace_ctx
  from jax._src.interpreters.ad import JVPTrace as _JVPTrace
  from jax._src.interpreters.batching import BatchTrace as _BatchTrace
except ImportError:  # pragma: no cover - other JAX layouts
  _trace_ctx, _JVPTrace, _BatchTrace = None, (), ()  # type: ignore[misc,assignment]

__all__ = [
  "ForwardModeUnsupported",
  "JAX_FORWARD_MODE_ERRORS",
  "check_forward_mode_traceable",
  "is_differentiated_eagerly",
  "is_staging",
  "is_forward_mode_traced",
  "is_jvp_now",
  "is_symbolic_zero",
  "is_tracer",
  "materialize_zero",
  "primal_values_and_markers",
]


class ForwardModeUnsupported(Exception):
  """Raised by :func:`check_forward_mode_traceable`: the jvp would fail when run."""


#: What JAX itself raises when :func:`jax.jvp` meets an operation it cannot
#: differentiate in forward mode: ``TypeError`` for a ``custom_vjp`` function
#: traced eagerly ("can't apply forward-mode autodiff (jvp) to a custom_vjp
#: function"), ``ValueError`` for ``pure_callback`` ("Pure callbacks do not
#: support JVP").
JAX_FORWARD_MODE_ERRORS = (TypeError, ValueError, NotImplementedError)


def is_tracer(x: Any) -> bool:
  """Whether ``x`` is a JAX tracer (an abstract value under a transformation)."""
  return isinstance(x, jax.core.Tracer)


def is_forward_mode_traced(tree: Any) -> bool:
  """Whether a leaf of ``tree`` is being differentiated by :func:`jax.jvp` (or ``jacfwd``).

  Looks through the nesting of tracers (:func:`jax.grad` inside :func:`jax.jvp`,
  ``vmap`` of ``jvp``): a ``custom_vjp`` function cannot run under any of them.
  """
  for leaf in jax.tree.leaves(tree):
    x = leaf
    while is_tracer(x):
      if isinstance(x, _JVP_TRACERS):
        return True
      x = getattr(x, "primal", getattr(x, "val", None))
  return False


def is_jvp_now() -> bool:
  """Whether a ``custom_vjp`` function called now would meet ``jax.jvp`` (and fail).

  The innermost transformation processes the call: ``vmap`` passes it on to
  the next one, ``jax.jvp`` / ``jacfwd`` cannot run it, reverse mode
  (``grad``, also ``jax.jvp`` of ``jax.grad``) and staging (``jit``, ``scan``,
  ``checkpoint``) can. A ``jax.jvp`` applied outside a staged function is not
  visible here: JAX then raises when it differentiates the staged call.
  """
  trace = getattr(_trace_ctx, "trace", None)
  while isinstance(trace, _BatchTrace):
    trace = getattr(trace, "parent_trace", None)
  return isinstance(trace, _JVPTrace)


def is_staging() -> bool:
  """Whether operations are being staged out now (``jit``, ``lax.scan``, ``checkify``)."""
  return is_tracer(jnp.zeros(()) + 1.0)


def is_differentiated_eagerly(tree: Any) -> bool:
  """Whether ``tree`` is differentiated (``jax.grad``, ``jvp``) outside any ``jit`` / ``checkify``."""
  ad = any(is_tracer(x) and hasattr(x, "primal") for x in jax.tree.leaves(tree))
  return ad and not is_staging()


def primal_values_and_markers(inputs: Any) -> tuple[Any, tuple[tuple[()] | None, ...]]:
  """Unwraps the ``CustomVJPPrimal`` inputs of a ``symbolic_zeros`` custom_vjp ``fwd``.

  Returns the values, and one marker per leaf: ``()`` where the outer
  transformation perturbs the input, ``None`` where it does not. Markers are
  static (kept in the residuals' tree structure), not arrays.
  """
  is_primal = lambda x: isinstance(x, CustomVJPPrimal)
  values = jax.tree.map(lambda p: p.value, inputs, is_leaf=is_primal)
  perturbed = [p.perturbed for p in jax.tree.leaves(inputs, is_leaf=is_primal)]
  return values, tuple(() if p else None for p in perturbed)


def is_symbolic_zero(x: Any) -> bool:
  """Whether ``x`` is a symbolic zero cotangent (``symbolic_zeros=True``)."""
  return isinstance(x, SymbolicZero)


def cotangent_leaves(tree: Any) -> list[Any]:
  """The leaves of a cotangent tree, symbolic zeros kept as leaves."""
  return jax.tree.leaves(tree, is_leaf=is_symbolic_zero)


def materialize_zero(x: Any) -> Any:
  """An array of zeros in place of a symbolic zero; other values unchanged."""
  if is_symbolic_zero(x):
    return jnp.zeros(x.aval.shape, x.aval.dtype)
  return x


def _jaxprs_of(value: Any) -> Iterator[Any]:
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs_of(v)


def _has_staged_custom_vjp_jvp(jaxpr: Any) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "custom_lin":
      return True
    for param in eqn.params.values():
      if any(_has_staged_custom_vjp_jvp(sub) for sub in _jaxprs_of(param)):
        return True
  return False


def check_forward_mode_traceable(f: Callable, primals: Any, tangents: Any) -> None:
  """Raises :class:`ForwardModeUnsupported` now if ``jax.jvp(f)`` would fail later.

  Under staging (``lax.scan``, :func:`jax.checkpoint`, ``jit``), JAX does not
  raise when forward mode meets a ``custom_vjp`` function: it stages a
  ``custom_lin`` operation that fails only when the program runs, past any
  handler here. Tracing the jvp once and looking for it makes the failure
  (and the fallback) happen at the same place in every context. Errors JAX
  raises while tracing (:data:`JAX_FORWARD_MODE_ERRORS`) propagate.
  """
  jaxpr = jax.make_jaxpr(lambda p, t: jax.jvp(f, (p,), (t,)))(primals, tangents)
  if _has_staged_custom_vjp_jvp(jaxpr.jaxpr):
    raise ForwardModeUnsupported(
      "can't apply forward-mode autodiff (jvp) to a custom_vjp function."
    )
