r"""A one-call check that the mixed-mode meta-gradient holds for a given inner loss.

The mixed-mode rule computes the backward pass of the inner gradient from the
symmetry of the inner loss's Hessian. A :class:`jax.custom_jvp` / ``custom_vjp``
rule that is *not* the loss's true derivative (a straight-through estimator,
quantisation, clipping inside a backward rule) breaks that symmetry, and the
mixflow meta-gradient then differs from the one of standard backpropagation
through the same rules. :func:`check_meta_gradient` compares the two on the
user's own loss and inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax

from mixflow_optax._checks import check_bool
from mixflow_optax._config import Mode
from mixflow_optax._fwdrev import Fallback
from mixflow_optax._unroll import unroll

__all__ = ["MetaGradientCheck", "MetaGradientMismatchError", "check_meta_gradient"]

_OWNER = "mixflow_optax.check_meta_gradient"


class MetaGradientMismatchError(ValueError):
  """The mixflow and standard meta-gradients differ past the tolerance."""


class MetaGradientCheck(NamedTuple):
  """Result of :func:`check_meta_gradient`.

  Attributes:
    ok: whether every leaf satisfies ``|mixflow - standard| <= atol + rtol |standard|``.
    max_abs_diff: the largest absolute difference over all leaves.
    max_rel_diff: the largest ``|mixflow - standard| / |standard|`` (elements
      where the standard value is not zero).
    worst_leaf: where the largest excess over the tolerance is, e.g.
      ``"meta_params['log_lr']"``.
    mixflow: the meta-gradients ``{"meta_params": ..., "params": ...}`` by
      ``mode="mixflow"``.
    standard: the same by ``mode="standard"``.
  """

  ok: bool
  max_abs_diff: float
  max_rel_diff: float
  worst_leaf: str
  mixflow: Any
  standard: Any


def _meta_gradients(
  mode: Mode,
  inner_loss: Callable,
  outer_loss: Callable,
  inner_opt: optax.GradientTransformation,
  inputs: tuple,
  **unroll_kwargs: Any,
) -> dict[str, Any]:
  """``d outer / d (meta_params, params)`` through ``unroll(mode=mode)``."""
  run = unroll(inner_loss, inner_opt, mode=mode, **unroll_kwargs)
  meta_params, params, inner_batches, outer_batch, model_state = inputs
  stateful = model_state is not None

  def meta_loss(meta_params, params):
    extra = (model_state,) if stateful else ()
    out = run(meta_params, params, inner_opt.init(params), inner_batches, *extra)
    return outer_loss(out[0], meta_params, outer_batch, *out[2:3])

  g_meta, g_params = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(meta_params, params)
  return {"meta_params": g_meta, "params": g_params}


def _compare(mixflow: Any, standard: Any, rtol: float, atol: float) -> tuple:
  max_abs, max_rel, worst, worst_excess = 0.0, 0.0, "<none>", -np.inf
  flat = jax.tree_util.tree_leaves_with_path(standard)
  for (path, b), a in zip(flat, jax.tree.leaves(mixflow)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    max_abs = max(max_abs, float(diff.max(initial=0.0)))
    nonzero = b != 0
    if nonzero.any():
      max_rel = max(max_rel, float((diff[nonzero] / np.abs(b[nonzero])).max()))
    excess = float((diff - atol - rtol * np.abs(b)).max(initial=-np.inf))
    if excess > worst_excess:
      key = jax.tree_util.keystr(path[1:])
      worst, worst_excess = f"{path[0].key}{key}", excess
  return worst_excess <= 0 or not np.isfinite(worst_excess), max_abs, max_rel, worst


def check_meta_gradient(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., jax.Array],
  inner_opt: optax.GradientTransformation,
  meta_params: Any,
  params: Any,
  inner_batches: Any,
  outer_batch: Any,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None = None,
  has_model_state: bool = False,
  model_state: Any = None,
  fallback: Fallback = "raise",
  rtol: float = 1e-4,
  atol: float = 1e-6,
  on_mismatch: Literal["raise", "warn", "ignore"] = "raise",
) -> MetaGradientCheck:
  r"""Compares the mixflow meta-gradient with standard backpropagation on your own loss.

  Computes :math:`\nabla_{(\eta, \theta_0)} V(\theta_T, \eta, x_\text{val})`
  through :func:`mixflow_optax.unroll` twice, with ``mode="mixflow"`` and
  ``mode="standard"``, on the given inputs, and compares them element-wise:

  .. math::

    |g_\text{mixflow} - g_\text{standard}| \le \text{atol} + \text{rtol}\,
    |g_\text{standard}|.

  The two agree to round-off for any twice-differentiable inner loss
  (``stop_gradient`` and exact ``custom_jvp`` rules included). They differ
  when the loss has a :class:`jax.custom_jvp` / ``custom_vjp`` rule that is not its
  true derivative (straight-through estimators, quantisation, clipping inside
  a backward rule): use ``mode="standard"`` for such a loss. Run the check
  once, on a small batch, before a long meta-training run. The default
  tolerances are those of float32 runs (the paper's 1e-6 absolute / 1e-4
  relative); in float64 much tighter ones hold.

  Args:
    inner_loss: as in :func:`mixflow_optax.unroll`.
    outer_loss: ``outer_loss(params_T, meta_params, outer_batch) -> scalar``
      (with ``has_model_state``, also ``model_state_T``).
    inner_opt: the inner optimizer, as in :func:`mixflow_optax.unroll`.
    meta_params: the meta-parameters :math:`\eta`.
    params: the initial inner parameters :math:`\theta_0`.
    inner_batches: a pytree of leading axis T (a few steps are enough).
    outer_batch: the outer loss's batch.
    hyperparams_fn: as in :func:`mixflow_optax.unroll`.
    has_model_state: as in :func:`mixflow_optax.unroll`; then pass
      ``model_state``.
    model_state: the initial model state with ``has_model_state``.
    fallback: as in :func:`mixflow_optax.unroll`.
    rtol: relative tolerance.
    atol: absolute tolerance.
    on_mismatch: ``"raise"`` (default) raises
      :class:`MetaGradientMismatchError`, ``"warn"`` warns, ``"ignore"``
      only returns the result.

  Returns:
    A :class:`MetaGradientCheck` with the discrepancy and both meta-gradients.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> loss = lambda w, log_lr, x: jnp.mean((x * w - 1.0) ** 2)
    >>> check = mfo.check_meta_gradient(
    ...     loss, loss, mfo.transforms.sgd(0.1), jnp.log(0.1), jnp.zeros(4),
    ...     jnp.ones((3, 4)), jnp.ones(4),
    ...     hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)})
    >>> check.ok
    True
  """
  check_bool(_OWNER, "has_model_state", has_model_state)
  if on_mismatch not in ("raise", "warn", "ignore"):
    raise ValueError(f"on_mismatch must be 'raise', 'warn' or 'ignore', got {on_mismatch!r}.")
  if has_model_state and model_state is None:
    raise TypeError("check_meta_gradient(..., has_model_state=True) needs model_state=.")
  inputs = (meta_params, params, inner_batches, outer_batch, model_state)
  kwargs: dict[str, Any] = dict(hyperparams_fn=hyperparams_fn, has_model_state=has_model_state)
  args = (inner_loss, outer_loss, inner_opt, inputs)
  mixflow = _meta_gradients("mixflow", *args, fallback=fallback, **kwargs)
  standard = _meta_gradients("standard", *args, **kwargs)
  ok, max_abs, max_rel, worst = _compare(mixflow, standard, rtol, atol)
  result = MetaGradientCheck(ok, max_abs, max_rel, worst, mixflow, standard)
  if not ok and on_mismatch != "ignore":
    message = (
      f"the mixflow meta-gradient differs from standard backpropagation: max abs "
      f"difference {max_abs:.3g}, max relative {max_rel:.3g} (worst at {worst}), past "
      f"rtol={rtol:g}, atol={atol:g}. The inner loss likely has a custom_jvp/custom_vjp "
      "rule that is not its true derivative (straight-through estimator, quantisation, "
      "clipping in a backward rule): use mode='standard' for it."
    )
    if on_mismatch == "raise":
      raise MetaGradientMismatchError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
  return result
