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
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax._checks import check_bool, check_meta_params, check_outer_loss_value
from mixflow_optax._config import Mode
from mixflow_optax._fwdrev import Fallback
from mixflow_optax._unroll import check_params, unroll
from mixflow_optax.transforms._reparameterize import optax_source

__all__ = ["MetaGradientCheck", "MetaGradientMismatchError", "check_meta_gradient"]

_OWNER = "mixflow_optax.check_meta_gradient"


class MetaGradientMismatchError(ValueError):
  """The mixflow and standard meta-gradients differ past the tolerance."""


class MetaGradientCheck(NamedTuple):
  """Result of :func:`check_meta_gradient`.

  Attributes:
    ok: whether every element satisfies ``|mixflow - standard| <= atol + rtol
      |standard|``, both meta-gradients being finite. A NaN or inf in either
      never passes.
    max_abs_diff: the largest absolute difference over all leaves (NaN when
      a meta-gradient is not finite).
    max_rel_diff: the largest ``max(|mixflow - standard| - atol, 0) /
      |standard|``: the difference past ``atol`` relative to the standard
      value, so that ``ok`` holds exactly when it is at most ``rtol``
      (elements within ``atol`` count as 0; inf where the standard value is 0
      and the difference exceeds ``atol``; NaN when a meta-gradient is not
      finite).
    worst_leaf: where the largest excess over the tolerance is, e.g.
      ``"meta_params['log_lr']"``; with a non-finite meta-gradient, the first
      leaf that has one.
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
    value = outer_loss(out[0], meta_params, outer_batch, *out[2:3])
    check_outer_loss_value(outer_loss, value)
    return value

  g_meta, g_params = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(meta_params, params)
  return {"meta_params": g_meta, "params": g_params}


class _Comparison(NamedTuple):
  ok: bool
  max_abs: float
  max_rel: float
  worst: str
  # Where a meta-gradient is NaN/inf: (leaf, mixflow finite, standard finite), else None.
  non_finite: tuple[str, bool, bool] | None


def _leaf_name(path: tuple) -> str:
  return f"{path[0].key}{jax.tree_util.keystr(path[1:])}"


def _compare(mixflow: Any, standard: Any, rtol: float, atol: float) -> _Comparison:
  """Element-wise ``|a - b| <= atol + rtol |b|`` over both trees; NaN/inf never passes.

  The relative figure is the excess over ``atol`` relative to ``|b|``, so that
  the check passes exactly when it is at most ``rtol``: an element within
  ``atol`` (e.g. 1e-9 against 1e-8) does not make it large.
  """
  max_abs, max_rel, worst, worst_excess, non_finite = 0.0, 0.0, "<none>", -np.inf, None
  flat = jax.tree_util.tree_leaves_with_path(standard)
  for (path, b), a in zip(flat, jax.tree.leaves(mixflow)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite_a, finite_b = bool(np.isfinite(a).all()), bool(np.isfinite(b).all())
    if not (finite_a and finite_b):
      if non_finite is None:
        non_finite = (_leaf_name(path), finite_a, finite_b)
      continue
    diff = np.abs(a - b)
    max_abs = max(max_abs, float(diff.max(initial=0.0)))
    over = np.maximum(diff - atol, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
      rel = np.where(over > 0, over / np.abs(b), 0.0)  # inf where b == 0 and past atol
    max_rel = max(max_rel, float(rel.max(initial=0.0)))
    excess = float((diff - atol - rtol * np.abs(b)).max(initial=-np.inf))
    if excess > worst_excess:
      worst, worst_excess = _leaf_name(path), excess
  if non_finite is not None:
    return _Comparison(False, np.nan, np.nan, non_finite[0], non_finite)
  return _Comparison(worst_excess <= 0, max_abs, max_rel, worst, None)


def _non_finite_message(leaf: str, finite_mixflow: bool, finite_standard: bool, opt: Any) -> str:
  modes = [m for m, ok in (("mixflow", finite_mixflow), ("standard", finite_standard)) if not ok]
  where = f"the meta-gradient at {leaf} is NaN/inf with mode={' and mode='.join(map(repr, modes))}"
  if finite_standard:
    return (
      f"{where} but finite with mode='standard': the mixed-mode rule's second-order "
      "term went non-finite (a Hessian-vector product of inner_loss through an operation "
      "whose forward-mode derivative is NaN/inf there). Use mode='standard' for this loss, "
      "and find the step with unroll(..., check_finite=True)."
    )
  source = optax_source(opt)
  if source is not None:
    culprit = (
      f"inner_opt is the stock {source} (through reparameterize), whose update is not "
      "differentiable everywhere (a square root or division at zero, e.g. Adam-family "
      "moments at exactly zero gradients, or a NaN in the discarded branch of a jnp.where)."
    )
  else:
    culprit = (
      "the inner optimizer's update or the inner loss is not differentiable where it "
      "was evaluated (a square root or division at zero, e.g. stock optax Adam-family "
      "moments at exactly zero gradients, or a NaN in the discarded branch of a jnp.where)."
    )
  return (
    f"{where}, so the check cannot pass: the meta-gradient itself is broken, not the "
    f"mixed-mode rule. Most likely {culprit} Use the hand-written NaN-safe version in "
    "mixflow_optax.transforms where there is one (adam, rmsprop, ...), or eps_root > 0; "
    "compare against central finite differences of the meta-loss; and find the step and "
    "term with mfo.unroll(..., check_finite=True) or mfo.meta_optimizer(..., "
    "check_finite=True)."
  )


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
    rtol: relative tolerance (a non-negative number).
    atol: absolute tolerance (a non-negative number).
    on_mismatch: ``"raise"`` (default) raises
      :class:`MetaGradientMismatchError`, ``"warn"`` warns, ``"ignore"``
      only returns the result. A NaN/inf meta-gradient (in either mode) is a
      failure too, with a message saying whether the mixed-mode rule or the
      computation itself (e.g. a stock optax update's square root at zero)
      produced it.

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
  rtol, atol = _check_tolerance("rtol", rtol), _check_tolerance("atol", atol)
  if has_model_state and model_state is None:
    raise TypeError("check_meta_gradient(..., has_model_state=True) needs model_state=.")
  check_meta_params(meta_params)
  check_params(params)
  inputs = (meta_params, params, inner_batches, outer_batch, model_state)
  kwargs: dict[str, Any] = dict(hyperparams_fn=hyperparams_fn, has_model_state=has_model_state)
  args = (inner_loss, outer_loss, inner_opt, inputs)
  mixflow = _meta_gradients("mixflow", *args, fallback=fallback, **kwargs)
  standard = _meta_gradients("standard", *args, **kwargs)
  cmp = _compare(mixflow, standard, rtol, atol)
  result = MetaGradientCheck(cmp.ok, cmp.max_abs, cmp.max_rel, cmp.worst, mixflow, standard)
  meta_leaves = jax.tree.leaves(standard["meta_params"])
  if cmp.ok and meta_leaves and not any(np.any(np.asarray(g) != 0) for g in meta_leaves):
    warnings.warn(
      "check_meta_gradient: the meta-gradient w.r.t. meta_params is exactly 0 in both "
      "modes, so the check compared nothing there. Did you forget hyperparams_fn, or does "
      "inner_loss ignore meta_params?",
      RuntimeWarning,
      stacklevel=2,
    )
  if not cmp.ok and on_mismatch != "ignore":
    if cmp.non_finite is not None:
      message = _non_finite_message(*cmp.non_finite, inner_opt)
    else:
      message = (
        f"the mixflow meta-gradient differs from standard backpropagation: max abs "
        f"difference {cmp.max_abs:.3g}, max relative (past atol) {cmp.max_rel:.3g} (worst "
        f"at {cmp.worst}), past rtol={rtol:g}, atol={atol:g}. "
      )
      low = _low_precision_dtype((meta_params, params))
      if low is not None:
        message += (
          f"The inputs are {low}, whose round-off alone (~{float(jnp.finfo(low).eps):.1g} "
          "per operation) exceeds these tolerances: run the check in float32 or float64 "
          "(cast meta_params and params), or loosen rtol/atol. Otherwise, the inner loss "
          "may have a custom_jvp/custom_vjp rule that is not its true derivative."
        )
      else:
        message += (
          "The inner loss likely has a custom_jvp/custom_vjp rule that is not its true "
          "derivative (straight-through estimator, quantisation, clipping in a backward "
          "rule): use mode='standard' for it."
        )
    if on_mismatch == "raise":
      raise MetaGradientMismatchError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
  return result


def _low_precision_dtype(tree: Any) -> Any:
  """The first floating dtype in ``tree`` less precise than float32 (bfloat16, float16), else None."""
  for leaf in jax.tree.leaves(tree):
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).eps > jnp.finfo(np.float32).eps:
      return dtype
  return None


def _check_tolerance(name: str, value: Any) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise TypeError(f"{_OWNER}: {name} must be a non-negative number, got {value!r}.")
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(
      f"{_OWNER}: {name} must be a non-negative finite number, got {value!r} (a negative "
      "or NaN tolerance would fail every element, an infinite one pass every finite one)."
    )
  return float(value)
