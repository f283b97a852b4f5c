r"""The meta-optimizer: one object that owns the inner and the outer optimisation.

.. math::

  \theta_T(\eta) = \mathrm{unroll}(\theta_0, s_0, x_{1..T}; \eta), \qquad
  \eta \leftarrow \eta + \mathrm{outer\_opt}\big(\nabla_\eta V(\theta_T(\eta), \eta,
  x_\text{val})\big).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from mixflow_optax import _forward
from mixflow_optax._checks import check_finite_leaves, first_non_float_leaf
from mixflow_optax._fwdrev import Fallback
from mixflow_optax._unroll import unroll

MetaMode = Literal["mixflow", "standard", "first_order", "forward"]

__all__ = ["MetaState", "MetaOptimizer", "meta_optimizer"]


class MetaState(NamedTuple):
  """State of :func:`meta_optimizer`.

  Attributes:
    meta_params: the meta-parameters :math:`\\eta` being learned.
    params: the inner parameters the next step starts from. Online (the
      default) these are the last step's :math:`\\theta_T`. With
      ``reset_inner=True`` they are the fixed starting point given to
      ``init``. With ``init_params_fn`` they are ``init_params_fn(meta_params)``.
    inner_state: the inner optimizer state the next step starts from (same
      rules as ``params``).
    outer_state: the outer optimizer's state.
    count: number of meta-steps taken (int32).
    model_state: the model's non-parameter state (e.g. BatchNorm statistics)
      with ``has_model_state=True``, else None (same rules as ``params``).
    tangents: with ``mode="forward", carry_tangents=True``, the
      :class:`~mixflow_optax.ForwardTangents` of ``params``,
      ``inner_state`` and ``model_state`` with respect to ``meta_params``
      (leading axis: meta-parameter elements), else None.
  """

  meta_params: Any
  params: Any
  inner_state: optax.OptState
  outer_state: optax.OptState
  count: jax.Array
  model_state: Any = None
  tangents: Any = None


class MetaOptimizer(NamedTuple):
  """Pure functions ``init(meta_params, params) -> MetaState`` and
  ``step(state, inner_batches, outer_batch) -> (MetaState, metrics)``."""

  init: Callable[..., MetaState]
  step: Callable[[MetaState, Any, Any], tuple[MetaState, dict[str, jax.Array]]]


def _check_meta_params(meta_params: Any) -> None:
  bad = first_non_float_leaf(meta_params)
  if bad is not None:
    path, dtype = bad
    raise TypeError(
      f"meta_params leaf {path} has dtype {dtype}; meta-parameters are learned by "
      "gradient descent and must be floating point (e.g. jnp.asarray(x, "
      "jnp.float32)). Keep integer constants out of meta_params (close over them "
      "or put them in the batches)."
    )


def _is_traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def meta_optimizer(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., jax.Array],
  inner_opt: optax.GradientTransformation,
  outer_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None = None,
  mode: MetaMode = "mixflow",
  reset_inner: bool = False,
  init_params_fn: Callable[[Any], optax.Params] | None = None,
  batched_tasks: bool = False,
  remat: bool = True,
  save_inner_grads: bool = True,
  fallback: Fallback = "raise",
  has_model_state: bool = False,
  check_finite: bool = False,
  checkpoint_every: int | Sequence[int] | None = None,
  carry_tangents: bool = False,
  max_forward_elements: int = _forward.DEFAULT_MAX_FORWARD_ELEMENTS,
) -> MetaOptimizer:
  r"""Gradient-based meta-learning of ``meta_params`` with exact meta-gradients.

  One ``step`` unrolls ``inner_opt`` over the leading axis of
  ``inner_batches`` (T steps, :func:`mixflow_optax.unroll`), evaluates
  ``outer_loss`` on the result, takes the exact meta-gradient

  .. math::

    \nabla_\eta\, V\big(\theta_T(\eta), \eta, x_\text{outer}\big)

  and applies ``outer_opt`` to the meta-parameters. By default the inner
  parameters and optimizer state carry over to the next step (online
  truncated backpropagation, as in optax's meta-learning tutorial, which
  this reproduces step for step).

  Args:
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``.
    outer_loss: ``outer_loss(params, meta_params, batch) -> scalar``,
      evaluated at :math:`\theta_T`.
    inner_opt: a :mod:`mixflow_optax.transforms` optimizer (or any optax
      transform when ``hyperparams_fn`` is None).
    outer_opt: any optax transform, applied to the meta-parameters.
    hyperparams_fn: ``meta_params -> dict`` of inner hyperparameters, as in
      :func:`mixflow_optax.unroll`; use ``jnp.exp`` / ``jax.nn.sigmoid`` for
      positivity or a range.
    mode: ``"mixflow"`` (default), ``"standard"``, ``"first_order"`` (the
      first-order MAML **approximation**: second-order terms are dropped) or
      ``"forward"``: the same exact meta-gradient by forward mode, one
      Jacobian-vector product per meta-parameter element, with memory
      independent of T (for a few hyperparameters over long horizons; see
      ``docs/forward_mode.md``). ``remat``, ``save_inner_grads``,
      ``fallback`` and ``checkpoint_every`` have no effect there: forward
      mode stores nothing across inner steps.
    reset_inner: start every step from the ``params`` given to ``init`` and a
      fresh inner optimizer state, instead of carrying them over.
    init_params_fn: MAML: ``meta_params -> params``, the learned
      initialisation. Implies a reset every step; the meta-gradient flows
      through it.
    batched_tasks: ``inner_batches`` and ``outer_batch`` have a leading task
      axis; the inner problem is vmapped over tasks and the meta-gradient is
      the mean over tasks (needs ``reset_inner`` or ``init_params_fn``).
    remat, save_inner_grads, fallback, checkpoint_every: passed to
      :func:`mixflow_optax.unroll` (``checkpoint_every=K`` for long horizons:
      store the inner carry every K steps only).
    has_model_state: the model has non-parameter state updated by its
      forward pass (BatchNorm statistics). Then ``inner_loss(params,
      meta_params, batch, model_state) -> (loss, new_model_state)`` and
      ``outer_loss(params, meta_params, batch, model_state) -> scalar`` (it
      sees the state after the unroll, e.g. for BatchNorm in evaluation
      mode); ``init(meta_params, params, model_state)``. The state is
      carried, reset or re-initialised like ``params``.
    check_finite: debugging aid for NaN meta-gradients: ``step`` raises
      ``checkify.JaxRuntimeError`` naming the inner step and the term that
      first went non-finite (inner loss, gradient, update, model state, or a
      cotangent in the backward pass; the outer loss; a meta-gradient leaf).
      ``step`` then compiles itself: call it without ``jax.jit`` (under
      ``jax.jit`` it must be wrapped in ``checkify.checkify``, whose error
      you ``.throw()``). Off by default: the checks cost time. Not available
      with ``mode="forward"``.
    carry_tangents: with ``mode="forward"`` and online meta-learning: keep
      the tangents :math:`d\theta/d\eta`, :math:`ds/d\eta` (and the model
      state's) in ``MetaState.tangents`` from step to step, so that the
      meta-gradient of step k is that of the outer loss through all
      :math:`kT` inner steps since ``init`` (no truncation), holding
      :math:`\eta` fixed along the way: exact when ``outer_opt`` makes no
      update, otherwise the real-time approximation of Franceschi et al.
      (2017), whose tangents mix the meta-parameters of past steps.
    max_forward_elements: ``mode="forward"`` raises if ``meta_params`` has
      more elements than this (its cost is one JVP per element).

  Returns:
    A :class:`MetaOptimizer` ``(init, step)``. ``init(meta_params,
    params=None, model_state=None)`` (``params`` is required unless
    ``init_params_fn`` is given). ``step(state, inner_batches, outer_batch)
    -> (state, metrics)`` is pure and jit-able; ``metrics`` has
    ``outer_loss`` (before the update), ``inner_losses`` (shape ``(T,)``, or
    ``(tasks, T)``) and ``meta_grad_norm``.

  Examples:
    Learn RMSProp's learning rate online (optax's meta-learning tutorial):

    >>> import jax, jax.numpy as jnp, optax, mixflow_optax as mfo
    >>> loss = lambda theta, meta, xy: optax.l2_loss(xy[1], xy[0] * theta)
    >>> mo = mfo.meta_optimizer(
    ...     loss, loss, mfo.transforms.rmsprop(0.1), optax.adam(0.03),
    ...     hyperparams_fn=lambda eta: {"learning_rate": jax.nn.sigmoid(eta)})
    >>> state = mo.init(jnp.log(0.1 / 0.9), jnp.asarray(0.5))
    >>> xs = jnp.linspace(1.0, 7.0, 7)
    >>> state, metrics = jax.jit(mo.step)(state, (xs[:6], 10 * xs[:6]), (xs[6], 70.0))
    >>> sorted(metrics)
    ['inner_losses', 'meta_grad_norm', 'outer_loss']
  """
  resets = reset_inner or init_params_fn is not None
  if batched_tasks and not resets:
    raise ValueError(
      "batched_tasks=True needs every task to start from the same point: pass "
      "reset_inner=True (start from the params given to init) or "
      "init_params_fn=... (MAML). Carrying per-task inner states over is not "
      "supported."
    )
  if not isinstance(outer_opt, optax.GradientTransformation):
    raise TypeError(
      f"outer_opt must be an optax GradientTransformation, got {type(outer_opt).__name__}."
    )
  _forward.check_forward_options(
    carry_tangents=carry_tangents, resets=resets, check_finite=check_finite, mode=mode
  )
  forward = mode == "forward"
  if forward:  # jax.jvp of the plain unroll: its inner gradient becomes forward-over-reverse.
    mode, remat, checkpoint_every = "standard", False, None
  run = unroll(
    inner_loss,
    inner_opt,
    hyperparams_fn=hyperparams_fn,
    mode=mode,
    remat=remat,
    save_inner_grads=save_inner_grads,
    return_losses=True,
    fallback=fallback,
    has_model_state=has_model_state,
    check_finite=check_finite,
    checkpoint_every=checkpoint_every,
  )
  outer_name = getattr(outer_loss, "__name__", repr(outer_loss))

  def init(meta_params, params=None, model_state=None) -> MetaState:
    _check_meta_params(meta_params)
    if has_model_state and model_state is None:
      raise ValueError(
        "meta_optimizer(..., has_model_state=True): call init(meta_params, params, "
        "model_state) with the model's initial non-parameter state."
      )
    if not has_model_state and model_state is not None:
      raise ValueError(
        "init() was given a model_state; build the meta-optimizer with "
        "has_model_state=True so that inner_loss and outer_loss receive it."
      )
    if init_params_fn is not None:
      if params is not None:
        raise ValueError(
          "init_params_fn is given, so the initial params are "
          "init_params_fn(meta_params): call init(meta_params) without params."
        )
      params = init_params_fn(meta_params)
    elif params is None:
      raise ValueError("init(meta_params, params): params is required without init_params_fn.")
    inner_state = inner_opt.init(params)
    tangents = None
    if carry_tangents:
      n = _forward.forward_size(meta_params, max_forward_elements)
      tangents = _forward.zero_tangents(n, params, inner_state, model_state)
    return MetaState(
      meta_params=meta_params,
      params=params,
      inner_state=inner_state,
      outer_state=outer_opt.init(meta_params),
      count=jnp.zeros([], jnp.int32),
      model_state=model_state,
      tangents=tangents,
    )

  def task_loss(meta_params, params, inner_state, model_state, inner_batches, outer_batch):
    if init_params_fn is not None:
      params = init_params_fn(meta_params)
      inner_state = inner_opt.init(params)
    if has_model_state:
      params_T, state_T, model_state_T, losses = run(
        meta_params, params, inner_state, inner_batches, model_state
      )
      value = outer_loss(params_T, meta_params, outer_batch, model_state_T)
    else:
      params_T, state_T, losses = run(meta_params, params, inner_state, inner_batches)
      model_state_T = None
      value = outer_loss(params_T, meta_params, outer_batch)
    if jnp.shape(value) != ():
      raise TypeError(
        f"outer_loss {outer_name!r} must return a scalar, got shape "
        f"{jnp.shape(value)}. Reduce it (e.g. jnp.mean over the batch)."
      )
    if check_finite:
      checkify.check(
        jnp.isfinite(value), "the outer loss is non-finite at the unrolled parameters."
      )
    return value, (params_T, state_T, model_state_T, losses)

  if forward:
    forward_value_and_grad = _forward.forward_value_and_grad(task_loss, max_forward_elements)

    def value_and_grad(*args):
      return forward_value_and_grad(*args)[:2]

  else:
    value_and_grad = jax.value_and_grad(task_loss, has_aux=True)

  def step_impl(state: MetaState, inner_batches, outer_batch):
    args = (state.meta_params, state.params, state.inner_state, state.model_state)
    tangents = None
    if carry_tangents:
      (value, (params_T, state_T, model_state_T, losses)), grads, tangents = forward_value_and_grad(
        *args, inner_batches, outer_batch, tangents=state.tangents
      )
    elif batched_tasks:
      (values, (params_T, state_T, model_state_T, losses)), grads = jax.vmap(
        lambda ib, ob: value_and_grad(*args, ib, ob)
      )(inner_batches, outer_batch)
      value = jnp.mean(values)
      grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    else:
      (value, (params_T, state_T, model_state_T, losses)), grads = value_and_grad(
        *args, inner_batches, outer_batch
      )
    if check_finite:
      check_finite_leaves(
        grads,
        "the meta-gradient w.r.t. meta_params leaf {leaf} is non-finite although "
        "every inner step was finite forward and backward: it comes from "
        "outer_loss's direct dependence on meta_params, or from hyperparams_fn / "
        "init_params_fn (e.g. a log or sqrt of a non-positive meta-parameter).",
      )
    updates, outer_state = outer_opt.update(grads, state.outer_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    if init_params_fn is not None:
      params = init_params_fn(meta_params)
      inner_state = inner_opt.init(params)
      model_state = state.model_state
    elif reset_inner:
      params, inner_state = state.params, state.inner_state
      model_state = state.model_state
    else:
      params, inner_state, model_state = params_T, state_T, model_state_T
    metrics = {
      "outer_loss": value,
      "inner_losses": losses,
      "meta_grad_norm": optax.tree.norm(grads),
    }
    new_state = MetaState(
      meta_params=meta_params,
      params=params,
      inner_state=inner_state,
      outer_state=outer_state,
      count=optax.safe_increment(state.count),
      model_state=model_state,
      tangents=tangents,
    )
    return new_state, metrics

  if not check_finite:
    return MetaOptimizer(init=init, step=step_impl)

  checked_step = checkify.checkify(step_impl)
  compiled_step = jax.jit(checked_step)

  def step(state: MetaState, inner_batches, outer_batch):
    if _is_traced((state, inner_batches, outer_batch)):
      # Under the caller's jit: hand the error to an enclosing checkify.checkify.
      err, out = checked_step(state, inner_batches, outer_batch)
      checkify.check_error(err)
      return out
    err, out = compiled_step(state, inner_batches, outer_batch)
    err.throw()
    return out

  return MetaOptimizer(init=init, step=step)
