"""Input checks shared by the layers (each layer words its own error)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def is_float(x: Any) -> bool:
  """Whether ``x`` (an array or Python number) has an inexact dtype."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def describe(x: Any) -> str:
  """``x`` in words for a message: "an array of shape (3,) and dtype float32", "a str"."""
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return f"an array of shape {tuple(np.shape(x))} and dtype {x.dtype}"
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)}"
  return f"a {type(x).__name__}"


def first_non_array_leaf(tree: Any) -> tuple[str, Any] | None:
  """``(path, leaf)`` of the first leaf of ``tree`` that is not an array or number."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(leaf, _ARRAY_TYPES):
      return jax.tree_util.keystr(path) or "<root>", leaf
  return None


def non_array_leaf_message(name: str, path: str, leaf: Any) -> str:
  """The error for a non-array leaf in ``params`` / ``meta_params``."""
  return (
    f"{name} leaf {path} is {describe(leaf)}, not an array: every leaf of {name} is "
    "differentiated and updated, so it must be a floating-point array. Keep names, "
    "functions and other static values out of it (close over them in the loss). For "
    "an Equinox module, split it with params, static = eqx.partition(model, "
    "eqx.is_inexact_array) and rebuild it inside the loss with eqx.combine(params, "
    "static)."
  )


def first_non_float_leaf(tree: Any) -> tuple[str, Any] | None:
  """``(path, dtype)`` of the first leaf of ``tree`` that is not floating point, else None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_float(leaf):
      return jax.tree_util.keystr(path) or "<root>", jnp.result_type(leaf)
  return None


def check_float_tree(name: str, tree: Any, non_float_message: Callable[[str, Any], str]) -> None:
  """Every leaf of ``tree`` must be a floating-point array: a TypeError names the first that is not.

  Args:
    name: what ``tree`` is, in the message for a non-array leaf (``"params"``).
    tree: the pytree to check.
    non_float_message: ``(path, dtype) -> message`` for an array leaf that is not floating
      point; each caller words its own fix.
  """
  bad = first_non_array_leaf(tree)
  if bad is not None:
    raise TypeError(non_array_leaf_message(name, *bad))
  bad = first_non_float_leaf(tree)
  if bad is not None:
    raise TypeError(non_float_message(*bad))


def check_meta_params(meta_params: Any) -> None:
  """Meta-parameters: floating-point arrays only."""
  check_float_tree(
    "meta_params",
    meta_params,
    lambda path, dtype: (
      f"meta_params leaf {path} has dtype {dtype}; meta-parameters are learned by "
      "gradient descent and must be floating point (e.g. jnp.asarray(x, "
      "jnp.float32)). Keep integer constants out of meta_params (close over them "
      "or put them in the batches)."
    ),
  )


def check_hyperparam_values(hyperparams: dict[str, Any]) -> None:
  """``hyperparams_fn``'s values: real numbers or arrays (a string fails deep in NumPy,
  a complex value would be cast to real with only a warning). A callable is a schedule
  (``count -> value``): the transforms that take one use it, the others say they do not."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(hyperparams):
    where = jax.tree_util.keystr(path)
    if callable(leaf):
      continue
    if not isinstance(leaf, _ARRAY_TYPES) or isinstance(leaf, complex):
      bad = describe(leaf)
    elif jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      bad = f"complex ({jnp.result_type(leaf)})"
    else:
      continue
    raise TypeError(
      f"hyperparams_fn returned hyperparameter {where} as {bad}: hyperparameter values "
      "must be real numbers or real arrays (e.g. jnp.exp(meta_params['log_lr']))."
    )


def check_outer_loss_value(outer_loss: Callable, value: Any) -> None:
  """``outer_loss`` must return a real floating-point scalar (it is differentiated)."""
  name = getattr(outer_loss, "__name__", repr(outer_loss))
  if not isinstance(value, _ARRAY_TYPES):
    got = describe(value)
  elif jnp.shape(value) != () or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    got = f"shape {jnp.shape(value)} and dtype {jnp.result_type(value)}"
  else:
    return
  raise TypeError(
    f"outer_loss {name!r} must return a real scalar (shape (), floating dtype), got {got}. "
    "Reduce it (e.g. jnp.mean over the batch); return metrics from a separate function; "
    "an integer count (accuracy) has no gradient: use a differentiable surrogate."
  )


def check_opt_state(init: Callable, params: Any, opt_state: Any, owner: str) -> None:
  """``opt_state`` must have the structure ``init(params)`` gives (JAX fails obscurely otherwise)."""
  try:
    want = jax.tree.structure(jax.eval_shape(init, params))
  except Exception:  # noqa: BLE001 - inconclusive: the update reports its own error
    return
  got = jax.tree.structure(opt_state)
  if got != want:
    raise TypeError(
      f"{owner}: opt_state does not have the structure of inner_opt.init(params) (was it "
      "made by another optimizer, or before params changed shape?): pass "
      f"inner_opt.init(params).\n  expected: {want}\n  got:      {got}"
    )


def check_bool(owner: str, name: str, value: Any) -> None:
  """``value`` must be a bool: ``"no"`` or ``1`` would silently mean True."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}: {name} must be True or False, got {value!r}.")


def _is_positive_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and bool(x >= 1)


def check_positive_int(owner: str, name: str, value: Any) -> int:
  """``value`` must be a positive int (not a bool, not a string)."""
  if not _is_positive_int(value):
    raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
  return int(value)


def check_positive_ints(owner: str, name: str, value: Any) -> tuple[int, ...]:
  """A positive int, or a non-empty sequence of them, as a tuple."""
  if isinstance(value, np.ndarray):
    value = value.tolist()
  values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
  if not values or not all(_is_positive_int(k) for k in values):
    raise ValueError(
      f"{owner}: {name} must be a positive int (or a non-empty tuple of them), got {value!r}."
    )
  return tuple(int(k) for k in values)


def check_finite_leaves(tree: Any, message: str, **fmt: jax.Array) -> None:
  """One ``checkify.check`` per leaf, naming the leaf in the message."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_float(leaf):
      continue
    where = jax.tree_util.keystr(path) or "<root>"
    # checkify.check's annotations make every keyword a bool (its `debug` flag).
    checkify.check(jnp.all(jnp.isfinite(leaf)), message.replace("{leaf}", where), **fmt)  # type: ignore[arg-type]


# Primitives whose one sub-jaxpr maps the equation's inputs to its outputs
# one to one: the dependence analysis looks inside them.
_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call", "checkpoint", "remat")


def _dependence(jaxpr: Any, labels: Sequence[frozenset]) -> list[frozenset]:
  """For each output of ``jaxpr``, the labels of the inputs its value depends on.

  Data flow through the equations; inside calls (``jit``) exactly, through any
  other equation with a sub-jaxpr (``scan``, ``cond``) conservatively: every
  output depends on every input.
  """
  env: dict[Any, frozenset] = dict(zip(jaxpr.invars, labels))
  read = lambda v: (
    frozenset() if isinstance(v, jax.extend.core.Literal) else env.get(v, frozenset())
  )
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = eqn.params.get("jaxpr") if eqn.primitive.name in _CALL_PRIMITIVES else None
    sub = getattr(sub, "jaxpr", sub)
    if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
      outs = _dependence(sub, ins)
    else:
      union = frozenset().union(*ins)
      outs = [union] * len(eqn.outvars)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _spec(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  weak = isinstance(x, (int, float)) or getattr(getattr(x, "aval", None), "weak_type", False)
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), weak_type=bool(weak))


def _tangent_labels(
  fn: Callable, primals: Any, labels: Sequence[Any]
) -> tuple[list[frozenset], Any]:
  """Which labelled float leaves of ``primals`` reach each output leaf of ``fn`` differentiably.

  ``labels`` has one entry per leaf of ``primals`` (None: not followed). The
  dependence is that of ``jax.jvp``: a sign, comparison, ``stop_gradient`` or
  integer operation ends it, as it ends a derivative.
  """
  leaves, treedef = jax.tree.flatten(primals)
  label_leaves = list(labels)
  idx = [
    i for i, (x, lab) in enumerate(zip(leaves, label_leaves)) if lab is not None and is_float(x)
  ]

  def tangent_fn(primal_leaves, tangents):
    def of_labelled(*xs):
      merged = list(primal_leaves)
      for i, x in zip(idx, xs):
        merged[i] = x
      return fn(treedef.unflatten(merged))

    return jax.jvp(of_labelled, [primal_leaves[i] for i in idx], tangents)[1]

  specs = [_spec(x) for x in leaves]
  closed, out_shape = jax.make_jaxpr(tangent_fn, return_shape=True)(specs, [specs[i] for i in idx])
  jaxpr = closed.jaxpr
  n = len(leaves)
  labels = [frozenset()] * n + [frozenset([label_leaves[i]]) for i in idx]
  return _dependence(jaxpr, labels), out_shape


# The answer is structural (shapes, dtypes, trees): computed once per combination.
_USED_CACHE: dict[Any, list[str]] = {}


def _structure_key(tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), str(jnp.result_type(x))) for x in leaves)


def check_hyperparams_used(
  inner_opt: Any,
  hyperparams_fn: Callable,
  meta_params: Any,
  params: Any,
  opt_state: Any,
  *,
  per_step: bool = False,
) -> None:
  """Raises if a hyperparameter derived from ``meta_params`` cannot change the inner trajectory.

  Its meta-gradient would be exactly 0 at every step: a silent wrong answer
  for whoever meant to learn it. A probe that cannot be traced (the update
  needs more than ``(grads, state, params, hyperparams=)``) is inconclusive:
  the run itself then reports the problem. ``per_step``: ``hyperparams_fn``
  also takes the step index; the structure is probed at step 0.
  """
  key = (
    inner_opt.update,
    hyperparams_fn,
    per_step,
    _structure_key((meta_params, params, opt_state)),
  )
  if key in _USED_CACHE:
    ignored = _USED_CACHE[key]
  else:
    if per_step:
      fn = lambda meta: hyperparams_fn(meta, jnp.zeros((), jnp.int32))  # noqa: E731
    else:
      fn = hyperparams_fn
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run itself emits the same warnings
        ignored = hyperparams_without_effect(inner_opt.update, fn, meta_params, params, opt_state)
    except Exception:  # noqa: BLE001 - inconclusive: the run raises its own error.
      ignored = []
    if len(_USED_CACHE) >= 64:
      _USED_CACHE.clear()
    _USED_CACHE[key] = ignored
  if ignored:
    raise ValueError(
      f"hyperparams_fn computes hyperparameter(s) {ignored} from meta_params, but "
      "inner_opt's update has no differentiable dependence on them: neither the updates "
      "nor any optimizer-state entry that later updates read depend on them, or only "
      "through a sign, comparison or integer operation (derivative 0). Their meta-"
      "gradient would be exactly 0 at every step. Common causes: a value used only by "
      "init (reparameterize(optax.rprop)'s learning_rate is the initial step size), a "
      "threshold used only in a comparison (optax.radam's threshold), sign-based updates "
      "(lion, signum: use a smooth variant), an optimizer that reads its hyperparameters "
      "from its own state (optax.inject_hyperparams). Remove them from hyperparams_fn, "
      "or pass a constant (jax.lax.stop_gradient(...)) to set them deliberately."
    )


def hyperparams_without_effect(
  update: Callable, hyperparams_fn: Callable, meta_params: Any, params: Any, opt_state: Any
) -> list[str]:
  """Hyperparameters that ``hyperparams_fn`` derives from ``meta_params`` but ``update`` ignores.

  A hyperparameter influences the inner trajectory when the updates depend on
  it differentiably, directly or through an optimizer-state entry that (after
  any number of steps) the updates depend on. One ``jax.jvp`` of the update is
  traced (nothing runs); the answer is structural, the same at every step.
  """
  meta_labels = ["meta"] * len(jax.tree.leaves(meta_params))
  hp_deps, hp_shape = _tangent_labels(hyperparams_fn, meta_params, meta_labels)
  derived = {
    path[0].key
    for (path, _), deps in zip(jax.tree_util.tree_leaves_with_path(hp_shape), hp_deps)
    if deps
  }
  if not derived:
    return []
  hyperparams = jax.eval_shape(hyperparams_fn, meta_params)
  state_leaves = jax.tree.leaves(opt_state)
  primals = (hyperparams, opt_state, params)
  hp_labels = [path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(hyperparams)]
  wrt = hp_labels + list(range(len(state_leaves))) + [None] * len(jax.tree.leaves(params))

  def step(primals):
    hp, state, params = primals
    updates, new_state = update(params, state, params, hyperparams=hp)
    return jax.tree.leaves(updates), jax.tree.leaves(new_state)

  deps, (u_shape, new_state_shape) = _tangent_labels(step, primals, wrt)
  if len(new_state_shape) != len(state_leaves):
    return []  # a state of another structure: inconclusive
  n_u = len(u_shape)
  reach_updates = frozenset().union(*deps[:n_u])
  # State entry j (new) takes the dependences of deps[n_u + j]; fixpoint over steps.
  influential = set(reach_updates)
  changed = True
  while changed:
    changed = False
    for j, d in enumerate(deps[n_u:]):
      if j in influential and not d <= influential:
        influential |= d
        changed = True
  return sorted(k for k in derived if k not in influential)
