r"""The meta-optimizer: one object that owns the inner and the outer optimisation.

.. math::

  \theta_T(\eta) = \mathrm{unroll}(\theta_0, s_0, x_{1..T}; \eta), \qquad
  \eta \leftarrow \eta + \mathrm{outer\_opt}\big(\nabla_\eta V(\theta_T(\eta), \eta,
  x_\text{val})\big).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from mixflow_optax import _forward
from mixflow_optax._checks import (
  check_bool,
  check_finite_leaves,
  check_positive_int,
  describe,
  first_non_array_leaf,
  first_non_float_leaf,
  non_array_leaf_message,
)
from mixflow_optax._compat import is_tracer
from mixflow_optax._config import memory_config
from mixflow_optax._fwdrev import Fallback
from mixflow_optax._placement import shard_like_params
from mixflow_optax._unroll import (
  UnrollResult,
  UnrollSpec,
  check_params,
  hyperparams_of,
  make_run,
  unroll_spec,
)

__all__ = ["MetaState", "MetaOptimizer", "meta_optimizer"]

_OWNER = "mixflow_optax.meta_optimizer"

MetaMode = Literal["mixflow", "standard", "first_order", "forward"]


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
      :class:`~mixflow_optax.ForwardTangents` of ``params``, ``inner_state``
      and ``model_state`` with respect to ``meta_params`` (leading axis:
      meta-parameter elements), else None.
    initial_params: with ``population_size`` and ``reset_every`` (without
      ``init_params_fn``), the members' starting params given to ``init``
      (leading axis P), which a member is reset to; else None.
    initial_model_state: the same for the model state (with
      ``has_model_state``), else None.
    member_age: with ``population_size``, each member's number of inner steps
      since its last reset (int32, shape ``(P,)``), else None.

  With ``population_size=P``, ``params``, ``inner_state`` and ``model_state``
  have a leading member axis P (and ``outer_state`` too with
  ``outer_per_member=True``).
  """

  meta_params: Any
  params: Any
  inner_state: optax.OptState
  outer_state: optax.OptState
  count: jax.Array
  model_state: Any = None
  tangents: Any = None
  initial_params: Any = None
  initial_model_state: Any = None
  member_age: Any = None


class MetaOptimizer(NamedTuple):
  """Pure functions ``init(meta_params, params) -> MetaState`` and
  ``step(state, inner_batches, outer_batch) -> (MetaState, metrics)``."""

  init: Callable[..., MetaState]
  step: Callable[[MetaState, Any, Any], tuple[MetaState, dict[str, jax.Array]]]


class _MetaSpec(NamedTuple):
  """Everything static about one meta-optimizer."""

  spec: UnrollSpec
  run: Callable[..., UnrollResult]
  outer_loss: Callable[..., jax.Array]
  outer_opt: optax.GradientTransformation
  init_params_fn: Callable[[Any], optax.Params] | None
  reset_inner: bool
  batched_tasks: bool
  forward: _forward.ForwardSpec | None = None
  population: _PopulationSpec | None = None


class _PopulationSpec(NamedTuple):
  """The population options of a meta-optimizer, checked once by :func:`_population_spec`."""

  size: int
  reset_every: int | None
  outer_per_member: bool


def _population_spec(
  population_size: Any,
  reset_every: Any,
  outer_per_member: Any,
  *,
  batched_tasks: Any,
  reset_inner: Any,
  carry_tangents: Any,
) -> _PopulationSpec | None:
  check_bool(_OWNER, "outer_per_member", outer_per_member)
  if population_size is None:
    if reset_every is not None or outer_per_member:
      raise ValueError(
        "reset_every and outer_per_member are options of a population of inner "
        "learners: pass population_size=P too."
      )
    return None
  size = check_positive_int(_OWNER, "population_size", population_size)
  if reset_every is not None:
    reset_every = check_positive_int(_OWNER, "reset_every", reset_every)
  if batched_tasks is True:
    raise ValueError(
      "population_size and batched_tasks=True are alternatives: batched tasks restart "
      "from one starting point every step, population members carry their own params "
      "and inner states. Drop one of them."
    )
  if reset_inner is True:
    raise ValueError(
      "with population_size, members are reset on a schedule: reset_every=1 restarts "
      "every member after every step (what reset_inner=True would mean). Drop reset_inner."
    )
  if carry_tangents is True:
    raise ValueError(
      "carry_tangents=True is not supported with population_size: use mode='forward' "
      "without carried tangents, or a reverse mode."
    )
  return _PopulationSpec(size, reset_every, bool(outer_per_member))


def _check_meta_options(
  outer_opt: Any, reset_inner: Any, init_params_fn: Any, batched_tasks: Any
) -> None:
  check_bool(_OWNER, "reset_inner", reset_inner)
  check_bool(_OWNER, "batched_tasks", batched_tasks)
  if batched_tasks and not (reset_inner or init_params_fn is not None):
    raise ValueError(
      "batched_tasks=True needs every task to start from the same point: pass "
      "reset_inner=True (start from the params given to init) or "
      "init_params_fn=... (MAML). Carrying per-task inner states over is not "
      "supported."
    )
  if callable(outer_opt) and not isinstance(outer_opt, optax.GradientTransformation):
    name = getattr(outer_opt, "__name__", repr(outer_opt))
    raise TypeError(
      f"outer_opt is {name!r}, a function that builds an optimizer: call it, e.g. "
      f"outer_opt={name}(1e-3), not outer_opt={name}."
    )
  if not isinstance(outer_opt, optax.GradientTransformation):
    raise TypeError(
      f"outer_opt must be an optax GradientTransformation, got {describe(outer_opt)}."
    )


def _check_meta_params(meta_params: Any) -> None:
  bad = first_non_array_leaf(meta_params)
  if bad is not None:
    raise TypeError(non_array_leaf_message("meta_params", *bad))
  bad = first_non_float_leaf(meta_params)
  if bad is not None:
    path, dtype = bad
    raise TypeError(
      f"meta_params leaf {path} has dtype {dtype}; meta-parameters are learned by "
      "gradient descent and must be floating point (e.g. jnp.asarray(x, "
      "jnp.float32)). Keep integer constants out of meta_params (close over them "
      "or put them in the batches)."
    )


def _check_init_args(meta: _MetaSpec, params: Any, model_state: Any) -> None:
  # Missing or unexpected arguments are TypeErrors, as in Python and in unroll's run.
  if meta.spec.has_model_state and model_state is None:
    raise TypeError(
      "meta_optimizer(..., has_model_state=True): call init(meta_params, params, "
      "model_state) with the model's initial non-parameter state."
    )
  if not meta.spec.has_model_state and model_state is not None:
    raise TypeError(
      "init() was given a model_state; build the meta-optimizer with "
      "has_model_state=True so that inner_loss and outer_loss receive it."
    )
  if meta.init_params_fn is not None and params is not None:
    raise TypeError(
      "init_params_fn is given, so the initial params are "
      "init_params_fn(meta_params): call init(meta_params) without params."
    )
  if meta.init_params_fn is None and params is None:
    raise TypeError("init(meta_params, params): params is required without init_params_fn.")


def _copy_arrays(tree: Any) -> Any:
  # The state must own its arrays: jax.jit(step, donate_argnums=0) deletes them.
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def _init_inner_state(meta: _MetaSpec, params: Any) -> Any:
  # Fresh zeros have no sharding of their own: without this, XLA replicates a
  # state re-initialised inside jit (MAML) on every device.
  return shard_like_params(meta.spec.inner_opt.init(params), params)


def _init(
  meta: _MetaSpec, meta_params: Any, params: Any = None, model_state: Any = None
) -> MetaState:
  _check_meta_params(meta_params)
  _check_init_args(meta, params, model_state)
  meta_params, params, model_state = _copy_arrays((meta_params, params, model_state))
  if meta.population is not None:
    return _init_population(meta, meta_params, params, model_state)
  if meta.init_params_fn is not None:
    params = meta.init_params_fn(meta_params)
  check_params(params)
  inner_state = _init_inner_state(meta, params)
  return MetaState(
    meta_params=meta_params,
    params=params,
    inner_state=inner_state,
    outer_state=meta.outer_opt.init(meta_params),
    count=jnp.zeros([], jnp.int32),
    model_state=model_state,
    tangents=_forward.initial_tangents(meta.forward, meta_params, params, inner_state, model_state),
  )


def _check_member_axis(size: int, name: str, tree: Any, hint: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != size:
      raise ValueError(
        f"population_size={size}: every leaf of {name} needs a leading member axis of "
        f"length {size}, but {name}{jax.tree_util.keystr(path)} has shape {shape}. {hint}"
      )


def _broadcast_members(tree: Any, size: int) -> Any:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (size,) + jnp.shape(x)), tree)


def _init_population(meta: _MetaSpec, meta_params: Any, params: Any, model_state: Any) -> MetaState:
  """The state of P members, each with its own params and inner state (leading axis P)."""
  pop = meta.population
  hint = (
    "Stack one per member, e.g. jax.vmap(init_fn)(jax.random.split(key, P)), or repeat "
    "one: jax.tree.map(lambda x: jnp.broadcast_to(x, (P,) + x.shape), tree)."
  )
  if meta.init_params_fn is not None:
    params = _broadcast_members(meta.init_params_fn(meta_params), pop.size)
  _check_member_axis(pop.size, "params", params, hint)
  _check_member_axis(pop.size, "model_state", model_state, hint)
  check_params(params)
  outer_state = meta.outer_opt.init(meta_params)
  if pop.outer_per_member:
    outer_state = _broadcast_members(outer_state, pop.size)
  resets = pop.reset_every is not None
  keep_params = resets and meta.init_params_fn is None
  return MetaState(
    meta_params=meta_params,
    params=params,
    inner_state=jax.vmap(meta.spec.inner_opt.init)(params),
    outer_state=_copy_arrays(outer_state),
    count=jnp.zeros([], jnp.int32),
    model_state=model_state,
    # Copies: one buffer may not appear twice in a donated state.
    initial_params=_copy_arrays(params) if keep_params else None,
    initial_model_state=_copy_arrays(model_state) if resets else None,
    member_age=jnp.zeros([pop.size], jnp.int32),
  )


def _check_state(meta: _MetaSpec, state: Any) -> None:
  if not isinstance(state, MetaState):
    raise TypeError(
      f"step needs the MetaState made by this meta-optimizer's init, got {describe(state)}: "
      "call state = mo.init(meta_params, params) first."
    )
  # Checked up front: an inner state of another structure would otherwise fail
  # deep inside the unrolled loop with an unrelated message.
  if _foreign_state_field(meta, state) == "inner_state":
    raise _foreign_state_error("inner_state")


def _foreign_state_error(field: str) -> TypeError:
  return TypeError(
    f"step was given a MetaState whose {field} was not made by this meta-optimizer's "
    "optimizers (was it made by another meta-optimizer's init?): call this one's init."
  )


def _outer_update(meta: _MetaSpec, grads: Any, outer_state: Any, meta_params: Any) -> tuple:
  """``outer_opt.update``, with a clear error for an outer state made by another optimizer."""
  try:
    return meta.outer_opt.update(grads, outer_state, meta_params)
  except (AttributeError, TypeError, ValueError) as err:
    # Only the outer optimizer's own update runs here: a failure with a state of
    # another structure is that state's fault; any other failure is re-raised.
    expected = jax.eval_shape(meta.outer_opt.init, meta_params)
    if jax.tree.structure(outer_state) == jax.tree.structure(expected):
      raise
    raise _foreign_state_error("outer_state") from err


def _foreign_state_field(meta: _MetaSpec, state: MetaState) -> str | None:
  """The optimizer state of ``state`` whose structure this meta-optimizer did not make."""
  want = {
    "inner_state": jax.eval_shape(meta.spec.inner_opt.init, state.params),
    "outer_state": jax.eval_shape(meta.outer_opt.init, state.meta_params),
  }
  for field, expected in want.items():
    if jax.tree.structure(getattr(state, field)) != jax.tree.structure(expected):
      return field
  return None


def _check_task_axis(inner_batches: Any, outer_batch: Any) -> None:
  sizes = {}
  for name, tree in (("inner_batches", inner_batches), ("outer_batch", outer_batch)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      shape = jnp.shape(leaf)
      sizes[f"{name}{jax.tree_util.keystr(path)}"] = shape[0] if shape else None
  if None in sizes.values() or len(set(sizes.values())) > 1:
    detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(
      "batched_tasks=True: every leaf of inner_batches and outer_batch needs a leading "
      f"task axis of the same length (tasks, ...); got leading axes {detail}. Stack the "
      "tasks' batches, or build the meta-optimizer without batched_tasks."
    )


def _task_loss(
  meta: _MetaSpec,
  meta_params,
  params,
  inner_state,
  model_state,
  inner_batches,
  outer_batch,
  step_offset,
) -> tuple[jax.Array, UnrollResult]:
  """The outer loss of one task at the unrolled parameters, and the unroll's result.

  ``step_offset`` is the index of the first inner step (per-step hyperparameters).
  """
  if meta.init_params_fn is not None and meta.population is None:
    params = meta.init_params_fn(meta_params)
    inner_state = _init_inner_state(meta, params)
  result = meta.run(meta_params, params, inner_state, inner_batches, model_state, step_offset)
  extra = (result.model_state,) if meta.spec.has_model_state else ()
  value = meta.outer_loss(result.params, meta_params, outer_batch, *extra)
  if jnp.shape(value) != ():
    name = getattr(meta.outer_loss, "__name__", repr(meta.outer_loss))
    raise TypeError(
      f"outer_loss {name!r} must return a scalar, got shape "
      f"{jnp.shape(value)}. Reduce it (e.g. jnp.mean over the batch)."
    )
  if meta.spec.check_finite:
    checkify.check(jnp.isfinite(value), "the outer loss is non-finite at the unrolled parameters.")
  return value, result


def _value_and_grad_fn(meta: _MetaSpec) -> Callable:
  """``fn(meta_params, params, inner_state, model_state, inner_batches, outer_batch, offset)``.

  It returns ``((outer loss, unroll result), meta-gradient)`` of one task (or member).
  """
  task_loss = functools.partial(_task_loss, meta)
  if meta.forward is not None:
    return _forward.value_and_grad(meta.forward, task_loss)
  return jax.value_and_grad(task_loss, has_aux=True)


def _num_inner_steps(inner_batches: Any, axis: int) -> int:
  # Malformed batches are reported by the unroll itself; 0 only feeds a step offset there.
  shapes = [jnp.shape(x) for x in jax.tree.leaves(inner_batches)]
  return shapes[0][axis] if shapes and len(shapes[0]) > axis else 0


def _step_offset(meta: _MetaSpec, state: MetaState, inner_batches: Any) -> jax.Array:
  """Index of the run's first inner step: inner steps since ``init`` online, else 0."""
  if meta.reset_inner or meta.init_params_fn is not None:
    return jnp.zeros([], jnp.int32)
  return state.count * _num_inner_steps(inner_batches, 0)


def _applied_hyperparams(meta: _MetaSpec, meta_params: Any, offset: jax.Array, num_steps: int):
  """The hyperparameters the inner optimizer used; stacked over steps if per step."""
  if not meta.spec.hyperparams_per_step:
    return hyperparams_of(meta.spec, meta_params)
  steps = offset + jnp.arange(num_steps, dtype=jnp.int32)
  return jax.vmap(lambda t: hyperparams_of(meta.spec, meta_params, t))(steps)


def _meta_value_and_grad(
  meta: _MetaSpec, state: MetaState, inner_batches: Any, outer_batch: Any, offset: jax.Array
) -> tuple[jax.Array, UnrollResult, Any, Any]:
  """``(outer loss, unroll result, meta-gradient, tangents)``, averaged over tasks if batched."""
  args = (state.meta_params, state.params, state.inner_state, state.model_state)
  if meta.forward is not None and meta.forward.carry_tangents:
    task_loss = functools.partial(_task_loss, meta)
    return _forward.carried_value_and_grad(meta.forward, task_loss, state.tangents)(
      *args, inner_batches, outer_batch, offset
    )
  value_and_grad = _value_and_grad_fn(meta)
  if not meta.batched_tasks:
    (value, result), grads = value_and_grad(*args, inner_batches, outer_batch, offset)
    return value, result, grads, None
  _check_task_axis(inner_batches, outer_batch)
  per_task = jax.vmap(lambda ib, ob: value_and_grad(*args, ib, ob, offset))
  (values, result), grads = per_task(inner_batches, outer_batch)
  return jnp.mean(values), result, jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), None


def _next_inner(meta: _MetaSpec, state: MetaState, meta_params: Any, result: UnrollResult) -> tuple:
  """``(params, inner_state, model_state)`` the next step starts from."""
  if meta.init_params_fn is not None:
    params = meta.init_params_fn(meta_params)
    return params, _init_inner_state(meta, params), state.model_state
  if meta.reset_inner:
    return state.params, state.inner_state, state.model_state
  return result.params, result.opt_state, result.model_state


def _check_meta_grads_finite(meta: _MetaSpec, grads: Any) -> None:
  if meta.spec.check_finite:
    check_finite_leaves(
      grads,
      "the meta-gradient w.r.t. meta_params leaf {leaf} is non-finite although "
      "every inner step was finite forward and backward: it comes from "
      "outer_loss's direct dependence on meta_params, or from hyperparams_fn / "
      "init_params_fn (e.g. a log or sqrt of a non-positive meta-parameter).",
    )


def _due_for_reset(pop: _PopulationSpec, count: jax.Array) -> jax.Array:
  """Members reset after meta-step ``count``: staggered, member i when (count + iK/P) % K == 0."""
  offsets = (jnp.arange(pop.size, dtype=jnp.int32) * pop.reset_every) // pop.size
  return (count + offsets) % pop.reset_every == 0


def _reset_members(
  meta: _MetaSpec, state: MetaState, meta_params: Any, result: UnrollResult, count: jax.Array
) -> tuple:
  """``(params, inner_state, model_state, member_age)`` the next step starts from."""
  age = state.member_age + jnp.shape(result.losses)[-1]
  pop = meta.population
  if pop.reset_every is None:
    return result.params, result.opt_state, result.model_state, age
  due = _due_for_reset(pop, count)
  if meta.init_params_fn is not None:
    fresh = _broadcast_members(meta.init_params_fn(meta_params), pop.size)
  else:
    fresh = state.initial_params

  def pick(fresh_tree, carried_tree):
    return jax.tree.map(
      lambda a, b: jnp.where(due.reshape((-1,) + (1,) * (jnp.ndim(b) - 1)), a, b),
      fresh_tree,
      carried_tree,
    )

  fresh_inner = jax.vmap(meta.spec.inner_opt.init)(fresh)
  model_state = pick(state.initial_model_state, result.model_state)
  return (
    pick(fresh, result.params),
    pick(fresh_inner, result.opt_state),
    model_state,
    jnp.where(due, 0, age),
  )


def _population_step(
  meta: _MetaSpec, state: MetaState, inner_batches: Any, outer_batch: Any
) -> tuple:
  """One meta-step of P members (vmapped); the meta-update is the mean over members."""
  pop = meta.population
  hint = "Stack the members' batches: inner_batches (P, T, ...), outer_batch (P, ...)."
  _check_member_axis(pop.size, "inner_batches", inner_batches, hint)
  _check_member_axis(pop.size, "outer_batch", outer_batch, hint)
  per_member = jax.vmap(_value_and_grad_fn(meta), in_axes=(None, 0, 0, 0, 0, 0, 0))
  (values, result), member_grads = per_member(
    state.meta_params,
    state.params,
    state.inner_state,
    state.model_state,
    inner_batches,
    outer_batch,
    state.member_age,
  )

  def mean(tree):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)

  grads = mean(member_grads)
  if pop.outer_per_member:
    # Each member's meta-gradient through its own outer state (e.g. its own Adam
    # normalisation); the applied update is the members' mean (DiscoRL).
    update = jax.vmap(lambda g, s: _outer_update(meta, g, s, state.meta_params))
    member_updates, outer_state = update(member_grads, state.outer_state)
    updates = mean(member_updates)
  else:
    updates, outer_state = _outer_update(meta, grads, state.outer_state, state.meta_params)
  _check_meta_grads_finite(meta, grads)
  meta_params = optax.apply_updates(state.meta_params, updates)
  count = optax.safe_increment(state.count)
  params, inner_state, model_state, age = _reset_members(meta, state, meta_params, result, count)
  metrics = {
    "outer_loss": jnp.mean(values),
    "member_outer_loss": values,
    "inner_losses": result.losses,
    "member_age": state.member_age,
    "meta_grad_norm": optax.tree.norm(grads),
  }
  if meta.spec.hyperparams_fn is not None:
    num_steps = jnp.shape(result.losses)[-1]
    applied = functools.partial(_applied_hyperparams, meta, state.meta_params)
    if meta.spec.hyperparams_per_step:
      metrics["hyperparams"] = jax.vmap(lambda a: applied(a, num_steps))(state.member_age)
    else:
      metrics["hyperparams"] = applied(state.member_age[0], num_steps)
  new_state = state._replace(
    meta_params=meta_params,
    params=params,
    inner_state=inner_state,
    outer_state=outer_state,
    count=count,
    model_state=model_state,
    member_age=age,
  )
  return new_state, metrics


def _step(meta: _MetaSpec, state: MetaState, inner_batches: Any, outer_batch: Any) -> tuple:
  _check_state(meta, state)
  if meta.population is not None:
    return _population_step(meta, state, inner_batches, outer_batch)
  offset = _step_offset(meta, state, inner_batches)
  value, result, grads, tangents = _meta_value_and_grad(
    meta, state, inner_batches, outer_batch, offset
  )
  updates, outer_state = _outer_update(meta, grads, state.outer_state, state.meta_params)
  _check_meta_grads_finite(meta, grads)
  meta_params = optax.apply_updates(state.meta_params, updates)
  params, inner_state, model_state = _next_inner(meta, state, meta_params, result)
  metrics = {
    "outer_loss": value,
    "inner_losses": result.losses,
    "meta_grad_norm": optax.tree.norm(grads),
  }
  if meta.spec.hyperparams_fn is not None:
    num_steps = jnp.shape(result.losses)[-1]
    metrics["hyperparams"] = _applied_hyperparams(meta, state.meta_params, offset, num_steps)
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


def _checked_step(meta: _MetaSpec) -> Callable:
  """``step`` with its checkify checks functionalised (``check_finite=True``)."""
  checked = checkify.checkify(lambda *a: _step(meta, *a))
  compiled = jax.jit(checked)

  def step(state: MetaState, inner_batches, outer_batch):
    if any(is_tracer(x) for x in jax.tree.leaves((state, inner_batches, outer_batch))):
      # Under the caller's jit: hand the error to an enclosing checkify.checkify.
      err, out = checked(state, inner_batches, outer_batch)
      checkify.check_error(err)
      return out
    err, out = compiled(state, inner_batches, outer_batch)
    err.throw()
    return out

  return step


def meta_optimizer(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., jax.Array],
  inner_opt: optax.GradientTransformation,
  outer_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[..., dict[str, Any]] | None = None,
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
  unroll_steps: int | bool = 1,
  carry_tangents: bool = False,
  max_forward_elements: int = _forward.DEFAULT_MAX_FORWARD_ELEMENTS,
  offload_carries: bool = False,
  hyperparams_per_step: bool = False,
  population_size: int | None = None,
  reset_every: int | None = None,
  outer_per_member: bool = False,
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
      :func:`mixflow_optax.unroll`; use ``jnp.exp`` / :func:`jax.nn.sigmoid` for
      positivity or a range.
    mode: ``"mixflow"`` (default), ``"standard"`` or ``"first_order"`` (the
      first-order MAML **approximation**: second-order terms are dropped).
      :func:`mixflow_optax.check_meta_gradient` compares ``"mixflow"`` with
      ``"standard"`` on your own loss. ``"forward"``: the same exact
      meta-gradient by forward mode, one Jacobian-vector product per
      meta-parameter element, with memory independent of T (a few
      hyperparameters over long horizons; see ``docs/forward_mode.md``).
      ``remat``, ``save_inner_grads``, ``fallback`` and ``checkpoint_every``
      have no effect there: forward mode stores nothing across inner steps.
    reset_inner: start every step from the ``params`` given to ``init`` and a
      fresh inner optimizer state, instead of carrying them over.
    init_params_fn: MAML: ``meta_params -> params``, the learned
      initialisation. Implies a reset every step; the meta-gradient flows
      through it.
    batched_tasks: ``inner_batches`` and ``outer_batch`` have a leading task
      axis; the inner problem is vmapped over tasks and the meta-gradient is
      the mean over tasks (needs ``reset_inner`` or ``init_params_fn``).
    remat: as in :func:`mixflow_optax.unroll`: recompute each inner step in the backward pass.
    save_inner_grads: as in :func:`mixflow_optax.unroll`: keep the inner gradients through
      the recomputation.
    fallback: as in :func:`mixflow_optax.unroll`: what to do where the inner loss cannot be
      differentiated in forward mode.
    checkpoint_every: as in :func:`mixflow_optax.unroll`; ``K`` for long horizons: store the
      inner carry every K steps only.
    unroll_steps: as in :func:`mixflow_optax.unroll`: the ``unroll`` of the ``lax.scan``.
    offload_carries: as in :func:`mixflow_optax.unroll`; ``True``: keep the stored carries in
      host memory on GPU/TPU.
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
      ``step`` then compiles itself: call it without :func:`jax.jit` (under
      :func:`jax.jit` it must be wrapped in ``checkify.checkify``, whose error
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
    hyperparams_per_step: per-step schedules: ``hyperparams_fn(meta_params,
      step)`` is called inside every inner step with ``step`` the int32 index
      of the inner step counted from the start of the inner run: online,
      ``state.count * T + t`` (inner steps since ``init``); with
      ``reset_inner`` or ``init_params_fn``, ``t`` in :math:`[0, T)`; in a
      population, each member's age (inner steps since its last reset).
    population_size: P inner learners that carry their own params, inner
      state (and model state) from step to step, as in DataRater and DiscoRL:
      ``init`` takes params with a leading member axis P (e.g.
      ``jax.vmap(init_fn)(keys)``; with ``init_params_fn``, every member
      starts from ``init_params_fn(meta_params)``), ``inner_batches`` leaves
      have shape ``(P, T, ...)`` and ``outer_batch`` leaves ``(P, ...)``. The
      members run vmapped (the member axis can be sharded over devices) and
      the meta-gradient is their mean. Not with ``batched_tasks``.
    reset_every: with a population, reset member :math:`i` after every
      meta-step whose new count :math:`c` satisfies :math:`(c + \lfloor
      iK/P \rfloor) \bmod K = 0` (:math:`K` = ``reset_every``): to its
      params given to ``init`` (or ``init_params_fn(meta_params)``), its
      model state given to ``init`` and a fresh inner state. Staggered: at
      most :math:`\lceil P/K \rceil` members reset per step, so the
      population always holds learners of every age.
    outer_per_member: with a population, keep one ``outer_opt`` state per
      member (leading axis P): each member's meta-gradient is transformed by
      its own state (e.g. its own Adam normalisation) and the applied update
      is the mean of the members' updates (as in DiscoRL).

  Returns:
    A :class:`MetaOptimizer` ``(init, step)``. ``init(meta_params,
    params=None, model_state=None)`` (``params`` is required unless
    ``init_params_fn`` is given; the state holds copies of the arrays, so
    ``jax.jit(step, donate_argnums=0)`` leaves the caller's own intact).
    ``step(state, inner_batches, outer_batch) -> (state, metrics)`` is pure and jit-able; ``metrics`` has
    ``outer_loss`` (before the update), ``inner_losses`` (shape ``(T,)``, or
    ``(tasks, T)``), ``meta_grad_norm`` and, with ``hyperparams_fn``,
    ``hyperparams``: the hyperparameters the inner optimizer used in this
    step, ``hyperparams_fn(meta_params)`` before the outer update (with
    ``hyperparams_per_step``, stacked over the T inner steps). With a
    population: ``outer_loss`` is the members' mean, ``member_outer_loss``
    has shape ``(P,)``, ``inner_losses`` ``(P, T)``, ``member_age`` ``(P,)``
    (the members' ages at the start of the step) and per-step
    ``hyperparams`` a leading member axis.

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
    ['hyperparams', 'inner_losses', 'meta_grad_norm', 'outer_loss']
  """
  population = _population_spec(
    population_size,
    reset_every,
    outer_per_member,
    batched_tasks=batched_tasks,
    reset_inner=reset_inner,
    carry_tangents=carry_tangents,
  )
  _check_meta_options(outer_opt, reset_inner, init_params_fn, batched_tasks)
  forward = _forward.forward_spec(
    mode,
    carry_tangents=carry_tangents,
    max_elements=max_forward_elements,
    resets=reset_inner or init_params_fn is not None,
    check_finite=check_finite,
  )
  if forward is not None:  # jax.jvp of the plain unroll; nothing to store across steps.
    mode, remat, checkpoint_every, offload_carries = "standard", False, None, False
  memory = memory_config(
    _OWNER,
    remat=remat,
    save_inner_grads=save_inner_grads,
    checkpoint_every=checkpoint_every,
    unroll_steps=unroll_steps,
    offload_carries=offload_carries,
  )
  spec = unroll_spec(
    _OWNER,
    inner_loss,
    inner_opt,
    hyperparams_fn=hyperparams_fn,
    mode=mode,
    memory=memory,
    fallback=fallback,
    has_model_state=has_model_state,
    check_finite=check_finite,
    hyperparams_per_step=hyperparams_per_step,
  )
  meta = _MetaSpec(
    spec,
    make_run(spec),
    outer_loss,
    outer_opt,
    init_params_fn,
    reset_inner,
    batched_tasks,
    forward,
    population,
  )
  step = _checked_step(meta) if check_finite else functools.partial(_step, meta)
  return MetaOptimizer(init=functools.partial(_init, meta), step=step)
