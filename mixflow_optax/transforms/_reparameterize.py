r"""Any optax optimizer factory as a reparameterised transform (the generic layer).

:func:`reparameterize` mirrors :func:`optax.inject_hyperparams`: the numeric
arguments of an optax factory become hyperparameters, and ``update`` rebuilds
the optax optimizer with the values it is given, so gradients flow into them
through optax's own arithmetic.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax.transforms._base import ReparamTransformation, per_leaf, resolve_hyperparams

__all__ = ["reparameterize"]

# Optax aliases whose update treats every parameter tensor independently: a
# per-parameter hyperparameter value can then be applied tensor by tensor.
# Per-element values additionally need an elementwise update (shape errors
# otherwise). Not listed: global couplings (lbfgs, polyak_sgd), per-tensor
# random keys (noisy_sgd), states whose structure depends on a tensor's rank
# (sm3). tests/test_reparameterize.py checks every entry.
_LEAFWISE_NAMES = (
  "adabelief",
  "adadelta",
  "adafactor",
  "adagrad",
  "adam",
  "adamax",
  "adamaxw",
  "adamw",
  "adan",
  "amsgrad",
  "fromage",
  "lamb",
  "lars",
  "lion",
  "novograd",
  "optimistic_adam",
  "optimistic_adam_v2",
  "optimistic_gradient_descent",
  "radam",
  "rmsprop",
  "rprop",
  "sgd",
  "sign_sgd",
  "signum",
  "yogi",
)
# Leafwise, but with per-tensor statistics (norms, factored moments): one
# scalar per tensor, not per element.
_PER_TENSOR_ONLY = ("adafactor", "fromage", "lamb", "lars", "novograd")
_LEAFWISE = tuple(getattr(optax, n) for n in _LEAFWISE_NAMES if hasattr(optax, n))

# Factories with a hand-written, NaN-safe reparameterised version.
_HAND_WRITTEN = (
  "adabelief",
  "adafactor",
  "adagrad",
  "adam",
  "adamw",
  "amsgrad",
  "lamb",
  "lion",
  "muon",
  "nadam",
  "nadamw",
  "rmsprop",
  "sgd",
)

# Raised when a traced value meets Python control flow or a shape computation.
_CONTROL_FLOW_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerBoolConversionError,
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerArrayConversionError,
)


def _base_function(f: Callable[..., Any]) -> Callable[..., Any]:
  while isinstance(f, functools.partial):
    f = f.func
  return f


def _is_numeric(value: Any) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return False
  return isinstance(value, (int, float, np.number, np.ndarray, jax.Array))


def _is_scalar(value: Any) -> bool:
  return (
    not callable(value)
    and jax.tree_util.treedef_is_leaf(jax.tree.structure(value))
    and (jnp.ndim(value) == 0)
  )


def _hand_written_hint(name: str) -> str:
  if name in _HAND_WRITTEN:
    return (
      f" Or use the hand-written mixflow_optax.transforms.{name}, which takes "
      "per-parameter and per-element values where they apply."
    )
  return ""


def reparameterize(
  inner_factory: Callable[..., optax.GradientTransformation],
  static_args: str | Iterable[str] = (),
) -> Callable[..., ReparamTransformation]:
  r"""Turns an optax optimizer factory into one that builds a :class:`ReparamTransformation`.

  Like :func:`optax.inject_hyperparams`, the returned factory takes the
  arguments of ``inner_factory``; its numeric arguments (Python or NumPy
  numbers and arrays, not booleans, not listed in ``static_args``) become
  the transform's hyperparameters, and everything else (booleans, ``None``,
  schedules, masks, dtypes, strings) is passed through unchanged. ``update``
  rebuilds the optax optimizer with the hyperparameter values it is given:

  .. math::

    (u_t, s_{t+1}) = \mathrm{factory}(\eta_t, \text{static}).\mathrm{update}(g_t, s_t, \theta_t),

  so derivatives with respect to :math:`\eta_t` (and :math:`g_t`) are those of
  optax's own arithmetic, exact where that arithmetic is differentiable.

  The state is the optax optimizer's own state (no wrapper), so it is
  interchangeable with stock optax.

  Values: scalars always. Per-parameter values (a pytree matching params, one
  scalar per tensor, or per element where the update is elementwise) for the
  optax aliases that treat every tensor independently (``adam``, ``yogi``,
  ``lamb``, ``adafactor``, ...); other factories raise a clear error.

  Numerics: stock optax numerics are inherited. In particular the
  Adam-family square root at exactly zero gradients gives NaN meta-gradients
  (optax's ``eps_root > 0`` avoids it); the hand-written transforms in
  :mod:`mixflow_optax.transforms` are exact and finite there.

  A factory that uses a numeric argument in Python control flow or in a shape
  (:func:`optax.adafactor`'s ``min_dim_size_to_factor``) cannot take a traced
  value: ``init`` detects this and names the argument, to be passed in
  ``static_args``.

  Args:
    inner_factory: an optax optimizer factory, e.g. :func:`optax.yogi`.
    static_args: names of numeric arguments to keep static (not
      hyperparameters).

  Returns:
    A factory with the signature of ``inner_factory`` returning a
    :class:`ReparamTransformation`.

  Examples:
    >>> import optax, mixflow_optax as mfo
    >>> opt = mfo.transforms.reparameterize(optax.yogi)(learning_rate=1e-3, b1=0.9)
    >>> opt.hyperparams
    {'learning_rate': 0.001, 'b1': 0.9, 'b2': 0.999, 'eps': 0.001}
    >>> sorted(mfo.transforms.reparameterize(
    ...     optax.adafactor, static_args=("min_dim_size_to_factor",))(1e-2).hyperparams)
    ['clipping_threshold', 'decay_offset', 'decay_rate', 'eps', 'learning_rate']
  """
  name = getattr(_base_function(inner_factory), "__name__", repr(inner_factory))
  owner = f"mixflow_optax.transforms.reparameterize({name})"
  static_args = (static_args,) if isinstance(static_args, str) else tuple(static_args)
  signature = inspect.signature(inner_factory)
  unknown = sorted(set(static_args) - set(signature.parameters))
  if unknown:
    raise ValueError(
      f"{owner}: static_args {unknown} are not arguments of the factory; its "
      f"arguments are {list(signature.parameters)}."
    )
  leafwise = _base_function(inner_factory) in _LEAFWISE

  @functools.wraps(inner_factory)
  def factory(*args, **kwargs) -> ReparamTransformation:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    numeric, static = {}, {}
    for arg, value in bound.arguments.items():
      if signature.parameters[arg].kind is inspect.Parameter.VAR_KEYWORD:
        static.update(value)
      elif arg not in static_args and _is_numeric(value):
        numeric[arg] = value
      else:
        static[arg] = value

    def build(hp, static=static):
      return optax.with_extra_args_support(inner_factory(**static, **hp))

    probed = set()

    def init_fn(params):
      leaves, treedef = jax.tree.flatten(params)
      key = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
      if key not in probed:
        _check_no_value_control_flow(build, numeric, params, owner)
        probed.add(key)
      return build(numeric).init(params)

    def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
      hp = resolve_hyperparams(hyperparams, numeric, owner)
      if all(_is_scalar(v) for v in hp.values()):
        return build(hp).update(updates, state, params, **extra_args)
      for k, v in hp.items():
        if callable(v):
          raise TypeError(f"{owner}: hyperparameter {k!r} is a callable; pass an array value.")
      if not leafwise:
        per_param = sorted(k for k, v in hp.items() if not _is_scalar(v))
        raise ValueError(
          f"{owner}: hyperparameter(s) {per_param} have per-parameter values, which "
          f"reparameterize supports only for optax aliases that treat every parameter "
          f"tensor independently ({', '.join(_LEAFWISE_NAMES)}). Pass scalars."
          + _hand_written_hint(name)
        )
      if name in _PER_TENSOR_ONLY:
        per_element = sorted(
          k for k, v in hp.items() if any(jnp.ndim(x) for x in per_leaf(k, v, updates, owner))
        )
        if per_element:
          raise ValueError(
            f"{owner}: hyperparameter(s) {per_element} have per-element values, but "
            f"{name} computes per-tensor statistics: give one scalar per tensor."
            + _hand_written_hint(name)
          )
      return _update_per_leaf(build, static, hp, updates, state, params, extra_args, owner)

    return ReparamTransformation(init_fn, update_fn, numeric)

  return factory


def _check_no_value_control_flow(build, numeric, params, owner) -> None:
  """Traces init + update with each hyperparameter abstract; names those that cannot be traced."""

  def run(hp):
    opt = build(hp)
    return opt.update(params, opt.init(params), params)

  try:
    jax.eval_shape(lambda: run(numeric))
  except Exception:  # noqa: BLE001 - inconclusive: update needs more (the user sees it there).
    return
  bad = []
  for arg, value in numeric.items():
    spec = jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value))
    try:
      jax.eval_shape(lambda v, arg=arg: run({**numeric, arg: v}), spec)
    except _CONTROL_FLOW_ERRORS:
      bad.append(arg)
  if bad:
    raise ValueError(
      f"{owner}: argument(s) {bad} are used in Python control flow or shapes by the "
      "optimizer, so they cannot be differentiable hyperparameters. Pass "
      f"static_args={tuple(bad)!r} to reparameterize."
    )


def _update_per_leaf(build, static, hp, updates, state, params, extra_args, owner):
  """Runs the optimizer tensor by tensor, each with its own hyperparameter values."""
  leaves, treedef = jax.tree.flatten(updates)
  n = len(leaves)
  cols = {k: per_leaf(k, v, updates, owner) for k, v in hp.items()}
  param_leaves = [None] * n if params is None else treedef.flatten_up_to(params)

  def split(value):
    # Masks and other pytrees shaped like the parameters go tensor by tensor.
    if n > 1 and not callable(value) and jax.tree.structure(value) == treedef:
      return treedef.flatten_up_to(value)
    return [value] * n

  statics = {k: split(v) for k, v in static.items()}
  opts = [
    build({k: c[i] for k, c in cols.items()}, {k: s[i] for k, s in statics.items()})
    for i in range(n)
  ]
  # One tensor's state has the skeleton of the full state, with a leaf where
  # the full state has a parameter-shaped subtree (moments) or a shared leaf
  # (step counts).
  skeleton = jax.tree.structure(jax.eval_shape(opts[0].init, leaves[0]))
  parts = skeleton.flatten_up_to(state)
  per_param = [n > 1 and jax.tree.structure(p) == treedef for p in parts]
  part_leaves: list[Any] = [
    treedef.flatten_up_to(p) if pp else None for p, pp in zip(parts, per_param)
  ]
  outs = []
  for i in range(n):
    state_i = skeleton.unflatten(
      [pl[i] if pp else p for p, pp, pl in zip(parts, per_param, part_leaves)]
    )
    outs.append(opts[i].update(leaves[i], state_i, param_leaves[i], **extra_args))
  new_parts_each = [skeleton.flatten_up_to(s) for _, s in outs]
  new_parts = [
    treedef.unflatten([ps[j] for ps in new_parts_each]) if pp else new_parts_each[0][j]
    for j, pp in enumerate(per_param)
  ]
  return treedef.unflatten([u for u, _ in outs]), skeleton.unflatten(new_parts)
