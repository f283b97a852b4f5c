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

from mixflow_optax.transforms._base import (
  ReparamTransformation,
  check_params_leaves,
  per_leaf,
  resolve_hyperparams,
)
from mixflow_optax.transforms._transforms import safe_sqrt

__all__ = ["optax_source", "reparameterize"]

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


def _with_base_function(f: Callable[..., Any], base: Callable[..., Any]) -> Callable[..., Any]:
  """``f`` (a function or nested ``functools.partial`` of one) with its function replaced."""
  if isinstance(f, functools.partial):
    return functools.partial(_with_base_function(f.func, base), *f.args, **f.keywords)
  return base


def _scale_by_radam(b1, b2, eps, eps_root, threshold, *, nesterov):
  r""":func:`optax.scale_by_radam` (same state, same values) with finite derivatives.

  optax evaluates the rectified update on both sides of ``jnp.where(ro >=
  threshold, rectified, mu_hat)``. Before the threshold the rectification
  term :math:`(\rho_t - 4)(\rho_t - 2)/\rho_t` is negative for
  :math:`\rho_t \in (2, 4)` (steps 3 and 4 with the default ``b2``): its
  square root is NaN in the discarded branch, and the branch's zero cotangent
  times NaN makes every meta-gradient NaN. Here the discarded branch computes
  on safe values (double ``where``), and the second moment's square root is
  :func:`~mixflow_optax.transforms.safe_sqrt`, exact at zero gradients.
  """
  ro_inf = 2.0 / (1.0 - b2) - 1.0

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    b2t = b2**count_inc
    ro = ro_inf - 2 * count_inc * b2t / (1 - b2t)
    if nesterov:
      mu_hat = jax.tree.map(
        lambda m, g: b1 * m + (1 - b1) * g,
        optax.tree.bias_correction(mu, b1, optax.safe_increment(count_inc)),
        optax.tree.bias_correction(updates, b1, count_inc),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    take = ro >= threshold
    safe_ro = jnp.where(take, ro, ro_inf)  # r = 1 there: finite, never used
    r = jnp.sqrt(
      (safe_ro - 4.0) * (safe_ro - 2.0) * ro_inf / ((ro_inf - 4.0) * (ro_inf - 2.0) * safe_ro)
    )

    def leaf(m, v):
      rectified = r.astype(m.dtype) * m / (safe_sqrt(jnp.where(take, v + eps_root, 1.0)) + eps)
      return jnp.where(take, rectified, m)

    new_updates = jax.tree.map(leaf, mu_hat, nu_hat)
    return new_updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(optax.scale_by_adam().init, update_fn)


def _radam(
  learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, threshold=5.0, *, nesterov=False
):
  """:func:`optax.radam` with :func:`_scale_by_radam`: same state and values."""
  return optax.chain(
    _scale_by_radam(b1, b2, eps, eps_root, threshold, nesterov=nesterov),
    optax.scale_by_learning_rate(learning_rate),
  )


# Stock optax factories whose plain autodiff is NaN where the maths is finite,
# replaced by a copy with the same signature, state and values.
# Only while the signatures agree (a new optax argument falls back to stock optax).
_NAN_SAFE = {
  stock: safe
  for stock, safe in ((optax.radam, _radam),)
  if list(inspect.signature(stock).parameters) == list(inspect.signature(safe).parameters)
}


def optax_source(transform: Any) -> str | None:
  """``"optax.<name>"`` when ``transform`` was made by ``reparameterize`` of a stock optax factory."""
  return getattr(getattr(transform, "update", None), "_mixflow_optax_source", None)


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
  :mod:`mixflow_optax.transforms` are exact and finite there. One exception:
  ``optax.radam``, whose stock update takes the square root of a negative
  number in the discarded branch of a ``jnp.where`` at steps 3-4 (NaN
  meta-gradients from the third step), is rebuilt from a copy with the same
  state and values, finite there and exact at zero gradients.

  Not factories: ``optax.chain`` / ``optax.named_chain`` (``*args``; use
  :func:`mixflow_optax.transforms.chain`) raise here, and a factory wrapped
  in ``optax.inject_hyperparams`` (which reads its hyperparameters from its
  state) raises at ``init``.

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
  _check_named_arguments(signature, name, owner)
  base = _base_function(inner_factory)
  leafwise = base in _LEAFWISE
  stock = getattr(base, "__module__", "").startswith("optax") and base is getattr(optax, name, None)
  implementation = (
    _with_base_function(inner_factory, _NAN_SAFE[base]) if base in _NAN_SAFE else (inner_factory)
  )

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
      return optax.with_extra_args_support(implementation(**static, **hp))

    probed = set()

    def init_fn(params):
      check_params_leaves(params, owner)
      leaves, treedef = jax.tree.flatten(params)
      key = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
      if key not in probed:
        _check_not_injected(build, numeric, params, name, owner)
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

    if stock:
      update_fn._mixflow_optax_source = f"optax.{name}"  # type: ignore[attr-defined]
    return ReparamTransformation(init_fn, update_fn, numeric)

  return factory


def _check_named_arguments(signature: inspect.Signature, name: str, owner: str) -> None:
  """A factory with ``*args`` (``optax.chain``) has no named arguments to turn into hyperparameters."""
  if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
    hint = (
      " optax.chain / optax.named_chain combine transforms: use "
      "mixflow_optax.transforms.chain(...) / named_chain(...), whose members (e.g. "
      "reparameterize(optax.adam)(1e-3), mfo.transforms.adam(1e-3) or any stock optax "
      "transform) keep their own hyperparameters."
      if name in ("chain", "named_chain")
      else ""
    )
    raise TypeError(
      f"{owner}: reparameterize turns the named numeric arguments of an optimizer "
      f"factory into hyperparameters, but {name} takes *args.{hint}"
    )


def _check_not_injected(build, numeric, params, name, owner) -> None:
  """``optax.inject_hyperparams`` reads its hyperparameters from its state, not from ``update``."""
  state = jax.eval_shape(build(numeric).init, params)
  if isinstance(state, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
    raise TypeError(
      f"{owner}: the factory is wrapped in optax.inject_hyperparams, whose update reads "
      "the hyperparameters from its own state (set by init), so values passed to update "
      "would be ignored and their meta-gradients would be exactly 0. Reparameterize the "
      f"factory itself: reparameterize(optax.{name})."
    )


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
