r"""Forward-mode meta-gradients: few meta-parameters, any horizon, constant memory.

For :math:`n` meta-parameters :math:`\eta \in \mathbb{R}^n`, the tangents
:math:`Z_t = d\theta_t / d\eta` and :math:`S_t = ds_t / d\eta` (and those of
the model state) are propagated next to the inner state:

.. math::

  Z_{t+1} = \frac{\partial \theta_{t+1}}{\partial \theta_t} Z_t
    + \frac{\partial \theta_{t+1}}{\partial s_t} S_t
    + \frac{\partial \theta_{t+1}}{\partial \eta}, \qquad
  \nabla_\eta V = Z_T^\top \nabla_\theta V + \frac{\partial V}{\partial \eta},

one Jacobian-vector product of the inner step per meta-parameter element
(batched with ``vmap``). The second-order part of each product,
:math:`\partial_\varepsilon \nabla_\theta L(\theta_t + \varepsilon z, \eta + \varepsilon e)`,
is the forward-over-reverse Hessian-vector product that MixFlow-MG is built
on. Nothing is stored across steps: memory is independent of :math:`T`,
compute is :math:`n` times one HVP per step.

Carried across meta-steps (``carry_tangents=True``), :math:`Z` and :math:`S`
give the meta-gradient through the whole training run since ``init``
(real-time hyperparameter optimisation): no truncation, hence no
short-horizon bias.

References:
  Franceschi, Donini, Frasconi, Pontil, `Forward and Reverse Gradient-Based
  Hyperparameter Optimization <https://arxiv.org/abs/1703.01785>`_, ICML 2017
  (Section 3, forward mode; Section 4, real-time HO).

  Wu, Ren, Liao, Grosse, `Understanding Short-Horizon Bias in Stochastic
  Meta-Optimization <https://arxiv.org/abs/1803.02021>`_, ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mixflow_optax._checks import check_bool, check_positive_int, is_float
from mixflow_optax._config import MODES
from mixflow_optax._fwdrev import ForwardModeError
from mixflow_optax._unroll import UnrollResult

__all__ = [
  "DEFAULT_MAX_FORWARD_ELEMENTS",
  "ForwardSpec",
  "ForwardTangents",
  "carried_value_and_grad",
  "forward_size",
  "forward_spec",
  "initial_tangents",
  "value_and_grad",
]

_OWNER = "mixflow_optax.meta_optimizer"

#: Default limit on the number of meta-parameter elements in forward mode.
DEFAULT_MAX_FORWARD_ELEMENTS = 1000


class ForwardTangents(NamedTuple):
  """Carried tangents of ``meta_optimizer(..., mode="forward", carry_tangents=True)``.

  Every leaf has a leading axis of length :math:`n`, the number of
  meta-parameter elements (in :func:`jax.flatten_util.ravel_pytree` order): entry
  ``i`` is the derivative of that leaf with respect to meta-parameter element
  ``i``, through every inner step since ``init``. Leaves of integer primals
  (step counters) hold zeros of the primal's dtype.

  Attributes:
    params: :math:`d\\theta / d\\eta`, the tangents of ``MetaState.params``.
    inner_state: :math:`ds / d\\eta`, those of ``MetaState.inner_state``.
    model_state: those of ``MetaState.model_state`` (None without model
      state).

  Examples:
    Learn SGD's log learning rate online, each meta-gradient taken through
    every inner step since ``init``:

    >>> import jax, jax.numpy as jnp, optax, mixflow_optax as mfo
    >>> loss = lambda w, meta, xy: jnp.mean((xy[0] * w - xy[1]) ** 2)
    >>> mo = mfo.meta_optimizer(
    ...     loss, loss, mfo.transforms.sgd(0.1), optax.adam(0.01),
    ...     hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)},
    ...     mode="forward", carry_tangents=True)
    >>> state = mo.init(jnp.log(0.1), jnp.asarray(0.0))
    >>> xs = jnp.linspace(0.1, 1.0, 20).reshape(5, 4)
    >>> step = jax.jit(mo.step)
    >>> for _ in range(3):
    ...   state, metrics = step(state, (xs, 2 * xs), (xs[0], 2 * xs[0]))
    >>> state.tangents.params.shape  # d(params)/d(meta_params): one row per meta-parameter
    (1,)
    >>> bool(state.meta_params > jnp.log(0.1))  # a larger learning rate helps here
    True
  """

  params: Any
  inner_state: Any
  model_state: Any = None


def forward_size(meta_params: Any, max_elements: int) -> int:
  """The number of meta-parameter elements; raises if forward mode would be too costly."""
  n = sum(int(np.size(x)) for x in jax.tree.leaves(meta_params))
  if n > max_elements:
    raise ValueError(
      f"mode='forward' computes one Jacobian-vector product of the whole unroll per "
      f"meta-parameter element: meta_params has {n} elements, so one meta-gradient "
      f"would cost {n} forward passes (and carry {n} tangent copies of the inner "
      "state). Use a reverse mode (mode='mixflow', the default, or 'standard'), "
      "whose cost does not grow with the number of meta-parameters, or raise "
      f"max_forward_elements (now {max_elements}) if this is intended."
    )
  return n


class ForwardSpec(NamedTuple):
  """The forward-mode options of a meta-optimizer, checked once by :func:`forward_spec`."""

  carry_tangents: bool
  max_elements: int


def forward_spec(
  mode: str, *, carry_tangents: bool, max_elements: int, resets: bool, check_finite: bool
) -> ForwardSpec | None:
  """Checks the forward-mode options; None unless ``mode == "forward"``."""
  check_bool(_OWNER, "carry_tangents", carry_tangents)
  max_elements = check_positive_int(_OWNER, "max_forward_elements", max_elements)
  if mode not in (*MODES, "forward"):
    raise ValueError(f"mode must be one of {(*MODES, 'forward')}, got {mode!r}.")
  if carry_tangents and mode != "forward":
    raise ValueError(
      f"carry_tangents=True needs mode='forward' (got mode={mode!r}): only forward mode "
      "carries the tangents d(params)/d(meta_params) from one step to the next."
    )
  if mode != "forward":
    return None
  if carry_tangents and resets:
    raise ValueError(
      "carry_tangents=True is for online meta-learning, where each step continues "
      "the previous inner run; with reset_inner=True or init_params_fn every step "
      "restarts, so there is nothing to carry. Drop carry_tangents."
    )
  if check_finite:
    raise ValueError(
      "check_finite=True watches the reverse pass, which mode='forward' does not "
      "have. Debug non-finite meta-gradients with mode='standard' (the same "
      "meta-gradient by reverse mode)."
    )
  return ForwardSpec(bool(carry_tangents), max_elements)


def _tangent_in(primal: Any, tangent: Any) -> Any:
  # Integer leaves (step counters) take float0 tangents in jax.jvp.
  return jax.tree.map(
    lambda x, t: t if is_float(x) else np.zeros(jnp.shape(x), jax.dtypes.float0), primal, tangent
  )


def _tangent_out(primal: Any, tangent: Any, n: int) -> Any:
  # Store integer leaves' (float0) tangents as zeros: an ordinary array pytree.
  return jax.tree.map(
    lambda x, t: t if is_float(x) else jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)),
    primal,
    tangent,
  )


def initial_tangents(
  spec: ForwardSpec | None, meta_params: Any, params: Any, inner_state: Any, model_state: Any
) -> ForwardTangents | None:
  """Zero tangents of the starting point (it does not depend on the meta-parameters)."""
  if spec is None or not spec.carry_tangents:
    return None
  n = forward_size(meta_params, spec.max_elements)

  def zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)), tree)

  return ForwardTangents(zeros(params), zeros(inner_state), zeros(model_state))


def _forward_mode_message(err: Exception) -> str:
  return (
    "meta_optimizer(mode='forward') differentiates the unrolled inner steps and the "
    "outer loss with jax.jvp, and they contain an operation that JAX cannot "
    f"differentiate in forward mode. JAX said: {type(err).__name__}: {err}\n"
    "This is usually a jax.custom_vjp function: a fused attention or Pallas kernel, or "
    "mfo.nn.dot_product_attention(differentiation='flash') inside jax.checkpoint, "
    "lax.scan or jax.jit (nnx.remat, nnx.scan), where it cannot switch itself to its "
    "forward-differentiable path. Fixes: pass differentiation='checkpoint' to that "
    "attention (functools.partial(mfo.nn.flax_attention, differentiation='checkpoint') "
    "in Flax), or use a reverse mode (mode='mixflow', the default)."
  )


def _jvp_meta(
  spec: ForwardSpec,
  task_loss: Callable[..., tuple[jax.Array, UnrollResult]],
  args: tuple,
  batches: tuple,
  tangents: ForwardTangents | None,
) -> tuple[jax.Array, UnrollResult, Any, ForwardTangents | None]:
  """:func:`_jvp_meta_unchecked`, with forward-mode failures reported as such."""
  forward_size(args[0], spec.max_elements)  # our own error: raised before the handler below
  try:
    return _jvp_meta_unchecked(spec, task_loss, args, batches, tangents)
  except (TypeError, NotImplementedError) as err:
    # JAX's error for a custom_vjp under jax.jvp is a TypeError (a missing jvp
    # rule: NotImplementedError); other errors are the caller's, left alone.
    if isinstance(err, ForwardModeError):
      raise
    try:  # the same computation without jax.jvp: does it trace?
      jax.eval_shape(lambda: task_loss(*args, *batches))
    except Exception:  # noqa: BLE001 - the error is not forward mode's: raise the original
      raise err from None
    raise ForwardModeError(_forward_mode_message(err)) from err


def _jvp_meta_unchecked(
  spec: ForwardSpec,
  task_loss: Callable[..., tuple[jax.Array, UnrollResult]],
  args: tuple,
  batches: tuple,
  tangents: ForwardTangents | None,
) -> tuple[jax.Array, UnrollResult, Any, ForwardTangents | None]:
  """One JVP of the task loss per meta-parameter element, batched with ``vmap``."""
  meta_params, *start = args
  n = forward_size(meta_params, spec.max_elements)
  flat, unravel = ravel_pytree(meta_params)
  basis = jnp.eye(n, dtype=flat.dtype)

  def outputs(meta_params, params, inner_state, model_state):
    value, result = task_loss(meta_params, params, inner_state, model_state, *batches)
    return (value, (result.params, result.opt_state, result.model_state)), result.losses

  if tangents is None:  # the starting point is held constant: truncated meta-gradient

    def jvp(e):
      return jax.jvp(lambda m: outputs(m, *start), (meta_params,), (unravel(e),), has_aux=True)

    # The primal outputs do not depend on the tangent: computed once (out_axes None).
    primal, (value_dot, _), losses = jax.vmap(jvp, out_axes=(None, 0, None))(basis)
    new_tangents = None
  else:
    carried = (tangents.params, tangents.inner_state, tangents.model_state)

    def jvp_carried(e, carried):
      tangents_in = (unravel(e),) + tuple(map(_tangent_in, start, carried))
      return jax.jvp(outputs, (meta_params, *start), tangents_in, has_aux=True)

    primal, (value_dot, carry_dot), losses = jax.vmap(jvp_carried, out_axes=(None, 0, None))(
      basis, carried
    )
    new_tangents = ForwardTangents(*map(_tangent_out, primal[1], carry_dot, (n, n, n)))
  value, (params_T, inner_state_T, model_state_T) = primal
  grads = unravel(value_dot.astype(flat.dtype))
  return value, UnrollResult(params_T, inner_state_T, model_state_T, losses), grads, new_tangents


def value_and_grad(
  spec: ForwardSpec, task_loss: Callable[..., tuple[jax.Array, UnrollResult]]
) -> Callable[..., tuple[tuple[jax.Array, UnrollResult], Any]]:
  """Forward-mode ``jax.value_and_grad(task_loss, has_aux=True)`` w.r.t. the meta-parameters.

  Args:
    spec: the forward-mode options.
    task_loss: ``task_loss(meta_params, params, inner_state, model_state,
      *batches) -> (value, UnrollResult)``.

  Returns:
    ``fn(meta_params, params, inner_state, model_state, *batches) -> ((value,
    result), grads)``, the starting point held constant (truncated).
  """

  def fn(meta_params, params, inner_state, model_state, *batches):
    args = (meta_params, params, inner_state, model_state)
    value, result, grads, _ = _jvp_meta(spec, task_loss, args, batches, None)
    return (value, result), grads

  return fn


def carried_value_and_grad(
  spec: ForwardSpec,
  task_loss: Callable[..., tuple[jax.Array, UnrollResult]],
  tangents: ForwardTangents,
) -> Callable[..., tuple[jax.Array, UnrollResult, Any, ForwardTangents]]:
  """Like :func:`value_and_grad`, through the starting point's carried ``tangents``.

  Returns:
    ``fn(meta_params, params, inner_state, model_state, *batches) -> (value,
    result, grads, new_tangents)``: the meta-gradient through every inner step
    the tangents have been carried through, and the tangents of the result.
  """

  if not isinstance(tangents, ForwardTangents):
    raise TypeError(
      "meta_optimizer(..., carry_tangents=True).step needs a MetaState whose tangents "
      f"were made by its init, got tangents={type(tangents).__name__}: call this "
      "meta-optimizer's init (a state made without carry_tangents has none)."
    )

  def fn(meta_params, params, inner_state, model_state, *batches):
    args = (meta_params, params, inner_state, model_state)
    return _jvp_meta(spec, task_loss, args, batches, tangents)

  return fn
