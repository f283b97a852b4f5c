"""Reparameterised gradient transformations: the base type, hyperparameters, chains."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax._checks import describe

__all__ = [
  "PerLeaf",
  "ReparamTransformation",
  "chain",
  "named_chain",
  "rename_hyperparams",
  "resolve_hyperparams",
  "per_leaf",
  "map_leaves",
  "leaf_results",
]

Hyperparams = Mapping[str, Any]


class ReparamUpdateFn(Protocol):
  def __call__(
    self,
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    hyperparams: Hyperparams | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]: ...


class ReparamTransformation(optax.GradientTransformationExtraArgs):
  """An optax transform whose update is an explicit function of its hyperparameters.

  It *is* an :class:`optax.GradientTransformationExtraArgs` (``init``,
  ``update``), so it works wherever optax transforms work. Its ``update``
  additionally takes ``hyperparams=``, a dict mapping hyperparameter names to
  values (scalars, or pytrees matching ``params`` for per-parameter or
  per-element values) that replace the defaults given at construction:

  .. code-block:: python

    updates, state = opt.update(grads, state, params)  # defaults
    updates, state = opt.update(grads, state, params,
                                hyperparams={"learning_rate": lr})

  Gradients flow into every hyperparameter value passed this way. To write
  one's own, build ``update`` with :func:`resolve_hyperparams`,
  :func:`per_leaf` and :func:`map_leaves` / :func:`leaf_results` (see the
  guide "Writing your own reparameterised transform", docs/custom_transforms.md).
  The defaults are kept through ``_replace``, ``_make``, ``copy`` and pickling.

  Attributes:
    init: ``init(params) -> state``.
    update: ``update(updates, state, params=None, *, hyperparams=None,
      **extra_args) -> (updates, state)``.
    hyperparams: dict, hyperparameter name -> default value (a copy).
  """

  # NamedTuple subclasses cannot add fields; the defaults live on the instance
  # so that the object stays a 2-tuple (init, update) for optax. The methods
  # below carry them through every tuple operation (_replace, _make, copy,
  # deepcopy, pickle).
  def __new__(
    cls,
    init: optax.TransformInitFn,
    update: ReparamUpdateFn,
    hyperparams: Hyperparams | None = None,
  ):
    obj = super().__new__(cls, init, update)
    obj.__dict__["_hyperparams"] = types.MappingProxyType(dict(hyperparams or {}))
    return obj

  @property
  def hyperparams(self) -> dict[str, Any]:
    """Each hyperparameter's default, by name, in a fresh dict (editing it changes nothing)."""
    return dict(self.__dict__.get("_hyperparams", {}))

  @classmethod
  def _make(cls, iterable: Any) -> ReparamTransformation:
    """From ``(init, update)``, ``(init, update, hyperparams)`` or another transform."""
    hyperparams = iterable.hyperparams if isinstance(iterable, ReparamTransformation) else None
    items = tuple(iterable)
    if len(items) == 3:
      *items, hyperparams = items
    if len(items) != 2:
      raise TypeError(f"Expected 2 or 3 arguments (init, update[, hyperparams]), got {len(items)}.")
    return cls(*items, hyperparams)

  def _replace(self, **changes: Any) -> ReparamTransformation:
    """A copy with ``init``, ``update`` and/or ``hyperparams`` replaced."""
    fields = {"init": self.init, "update": self.update, "hyperparams": self.hyperparams}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
      raise ValueError(f"Got unexpected field names: {unknown!r}")
    fields.update(changes)
    return type(self)(**fields)

  def __getnewargs__(self) -> tuple:
    return (self.init, self.update, self.hyperparams)

  def __reduce__(self) -> tuple:
    return (type(self), self.__getnewargs__())

  def __copy__(self) -> ReparamTransformation:
    return self._replace()

  def __repr__(self) -> str:
    names = ", ".join(self.hyperparams)
    return f"ReparamTransformation(hyperparams=[{names}])"


def resolve_hyperparams(
  hyperparams: Hyperparams | None, defaults: Mapping[str, Any], owner: str
) -> dict[str, Any]:
  """Merges the ``hyperparams`` given to ``update`` over the transform's defaults.

  The first line of every reparameterised ``update``: it checks the names
  (an unknown name raises, listing the valid ones) and returns a dict with a
  value for every hyperparameter.

  Args:
    hyperparams: the ``hyperparams=`` argument of ``update`` (None: defaults).
    defaults: the defaults given to the transform's constructor.
    owner: the transform's name, for error messages.

  Returns:
    A new dict, ``defaults`` updated with ``hyperparams``.

  Examples:
    >>> import mixflow_optax as mfo
    >>> mfo.transforms.resolve_hyperparams({"eps": 1e-6}, {"eps": 1e-8, "decay": 0.9}, "mine")
    {'eps': 1e-06, 'decay': 0.9}
  """
  if hyperparams is None:
    return dict(defaults)
  if not isinstance(hyperparams, Mapping):
    raise TypeError(
      f"{owner}: hyperparams must be a dict mapping hyperparameter names to "
      f"values, got {describe(hyperparams)}. Valid names: "
      f"{sorted(defaults)}."
    )
  unknown = sorted(set(hyperparams) - set(defaults))
  if unknown:
    raise ValueError(
      f"{owner}: unknown hyperparameter name(s) {unknown}. This optimizer's "
      f"hyperparameters are {sorted(defaults)} (see `opt.hyperparams`). If a "
      "name is missing because the optimizer was built without it (e.g. "
      "momentum=None), construct it with a value for that argument."
    )
  merged = dict(defaults)
  merged.update(hyperparams)
  return merged


class PerLeaf(list):
  """One value per leaf of the updates (from :func:`per_leaf`).

  A distinct type, so that :func:`leaf_results` can tell it from a pytree that
  happens to be a Python list (parameters given as a list of layers).
  """


def _key_name(key: Any) -> Any:
  """The name a path entry stands for, whatever the container (dict, nnx.State, dataclass)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _path_str(path: tuple) -> str:
  return "".join(f"[{k!r}]" for k in path) or "<root>"


def broadcast_prefix(
  name: str, value: Any, updates: Any, owner: str, is_leaf: Callable[[Any], bool] | None = None
) -> list[Any]:
  """One value per leaf of ``updates`` from a ``value`` tree that is a prefix of it.

  Matching is by path names (dict keys, attribute names, sequence indices), not
  by container types, so that a plain dict ``{"Dense_0": lr0, ...}`` is a prefix
  of an ``nnx.State`` (whose leaves sit under ``.../kernel/value``) as well as
  of a dict of Linen parameters. ``is_leaf`` flattens ``updates`` (e.g. to keep
  ``optax.MaskedNode`` entries as leaves).
  """
  prefixes = [
    (tuple(map(_key_name, path)), v) for path, v in jax.tree_util.tree_leaves_with_path(value)
  ]
  used = [False] * len(prefixes)
  vals = []
  for path, _ in jax.tree_util.tree_leaves_with_path(updates, is_leaf=is_leaf):
    names = tuple(map(_key_name, path))
    match = [i for i, (prefix, _) in enumerate(prefixes) if names[: len(prefix)] == prefix]
    if not match:
      raise ValueError(
        f"{owner}: hyperparameter {name!r} is neither a scalar, nor a pytree with the "
        "same structure as the parameters, nor a prefix of it (one value per module): "
        f"parameter {_path_str(names)} has no value in it (its paths are "
        f"{', '.join(_path_str(p) for p, _ in prefixes)}). Give one value for every top-level "
        "module, e.g. {'Dense_0': 1e-3, 'Dense_1': 1e-2}, or a scalar."
      )
    # The longest matching path: leaves of a prefix tree are not nested, so this is the only one.
    i = max(match, key=lambda j: len(prefixes[j][0]))
    used[i] = True
    vals.append(prefixes[i][1])
  for (prefix, _), was_used in zip(prefixes, used):
    if not was_used:
      raise ValueError(
        f"{owner}: hyperparameter {name!r} has a value at {_path_str(prefix)}, which is "
        "not a path (or a prefix of a path) of the parameters: it must be a scalar, a "
        "pytree with the same structure as the parameters, or a prefix of it. Check the "
        f"module names (the parameters' top-level paths are "
        f"{', '.join(sorted({_path_str(p[:1]) for p in _param_paths(updates)}))})."
      )
  return vals


def _param_paths(updates: Any) -> list[tuple]:
  return [tuple(map(_key_name, p)) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]


def per_leaf(name: str, value: Any, updates: Any, owner: str) -> PerLeaf:
  """Expands a hyperparameter to one value per leaf of ``updates``.

  A single array (or Python number) applies to every leaf; a pytree with the
  structure of ``updates`` gives one value per leaf, each broadcastable to
  that leaf's shape (a scalar per tensor, or one value per element). A pytree
  that is a *prefix* of ``updates`` (one value per module, e.g.
  ``{"Dense_0": lr0, "Dense_1": lr1}`` for a Flax state, ``nnx.State``
  included) is broadcast to the leaves below each of its leaves; paths are
  matched by their names, not their container types. Other trees raise an
  error that names ``owner``, ``name`` and the path that does not match. Integer values are
  cast to the leaf's dtype; float values keep theirs.

  Args:
    name: the hyperparameter's name, for error messages.
    value: its value (from :func:`resolve_hyperparams`).
    updates: the gradient (or updates) pytree the transform is applied to.
    owner: the transform's name, for error messages.

  Returns:
    A :class:`PerLeaf` list, a column for :func:`map_leaves` and
    :func:`leaf_results`.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> grads = {"b": jnp.zeros(2), "w": jnp.zeros((2, 3))}
    >>> rates = mfo.transforms.per_leaf("learning_rate", 0.1, grads, "mine")
    >>> len(rates)
    2
    >>> per_tensor = {"b": 0.1, "w": jnp.full((2, 3), 0.2)}
    >>> [jnp.shape(r) for r in mfo.transforms.per_leaf("lr", per_tensor, grads, "mine")]
    [(), (2, 3)]
    >>> layers = {"dense": {"b": jnp.zeros(2), "w": jnp.zeros((2, 3))}, "out": {"w": jnp.zeros(3)}}
    >>> per_module = {"dense": 0.1, "out": 0.01}  # a prefix: one value per module
    >>> mfo.transforms.per_leaf("learning_rate", per_module, layers, "mine")
    [0.1, 0.1, 0.01]
  """
  leaves, treedef = jax.tree.flatten(updates)
  if callable(value):
    raise TypeError(
      f"{owner}: hyperparameter {name!r} is a callable; schedules are only "
      "supported as the constructor's learning_rate. Pass an array value here."
    )
  vtree = jax.tree.structure(value)
  if jax.tree_util.treedef_is_leaf(vtree) and vtree.num_leaves == 1:
    vals = [value] * len(leaves)
  elif vtree == treedef:
    vals = jax.tree.leaves(value)
  else:
    vals = broadcast_prefix(name, value, updates, owner)
  out = []
  for path_leaf, v in zip(jax.tree_util.tree_leaves_with_path(updates), vals):
    path, leaf = path_leaf
    vshape, lshape = np.shape(v), np.shape(leaf)
    try:
      ok = np.broadcast_shapes(vshape, lshape) == tuple(lshape)
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
        f"{owner}: hyperparameter {name!r} at {jax.tree_util.keystr(path)} has "
        f"shape {vshape}, which does not broadcast to the parameter's shape "
        f"{lshape}. Use a scalar (per tensor) or an array of shape {lshape} "
        "(per element)."
      )
    if jnp.issubdtype(jnp.result_type(v), jnp.integer) or isinstance(v, bool):
      v = jnp.asarray(v, jnp.result_type(leaf))
    # Float values keep their dtype: the arithmetic runs in the promoted dtype
    # (e.g. f32 rates with bf16 params, so b2 = 0.999 does not round to 1) and
    # each transform casts its outputs back to the dtypes of its inputs/state.
    out.append(v)
  return PerLeaf(out)


def leaf_results(fn: Callable[..., Any], updates: Any, *cols: Any) -> list[Any]:
  """``fn`` applied per leaf of ``updates``, with the matching leaf of each column.

  A column is a :class:`PerLeaf` list (from :func:`per_leaf`) or a pytree
  with the structure of ``updates`` (e.g. an optimizer moment). Use it when
  ``fn`` returns several values per leaf (the update and new state entries);
  :func:`map_leaves` when it returns one.

  Args:
    fn: ``fn(leaf, *column_leaves)``, called once per leaf of ``updates``.
    updates: the pytree whose leaves are iterated.
    *cols: per-leaf columns: :class:`PerLeaf` lists or pytrees shaped like ``updates``.

  Returns:
    A list, one ``fn(leaf, *column_leaves)`` per leaf of ``updates``.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> mu = {"w": jnp.zeros(2)}
    >>> decay = mfo.transforms.per_leaf("decay", 0.9, g, "mine")
    >>> out = mfo.transforms.leaf_results(lambda g, m, d: (d * m + g, g), g, mu, decay)
    >>> [new_mu.tolist() for new_mu, _ in out]
    [[1.0, -2.0]]
  """
  leaves, treedef = jax.tree.flatten(updates)
  cols = [c if isinstance(c, PerLeaf) else treedef.flatten_up_to(c) for c in cols]
  return [fn(*xs) for xs in zip(leaves, *cols)]


def map_leaves(fn: Callable[..., Any], updates: Any, *cols: Any) -> Any:
  """:func:`jax.tree.map` over ``updates`` and per-leaf columns, into the tree of ``updates``.

  Args:
    fn: ``fn(leaf, *column_leaves) -> new leaf``.
    updates: the pytree whose structure the result has.
    *cols: per-leaf columns: :class:`PerLeaf` lists or pytrees shaped like ``updates``.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> g = {"w": jnp.array([1.0, -2.0])}
    >>> lr = mfo.transforms.per_leaf("learning_rate", 0.5, g, "mine")
    >>> mfo.transforms.map_leaves(lambda g, r: -r * g, g, lr)["w"].tolist()
    [-0.5, 1.0]
  """
  return jax.tree.unflatten(jax.tree.structure(updates), leaf_results(fn, updates, *cols))


def _as_member(t: optax.GradientTransformation):
  if isinstance(t, ReparamTransformation):
    return t
  if not isinstance(t, optax.GradientTransformation):
    raise TypeError(
      "chain members must be optax GradientTransformations (mixflow_optax or "
      f"stock optax), got {describe(t)}."
    )
  return optax.with_extra_args_support(t)


def _chain_from(
  members: list[tuple[str | None, optax.GradientTransformation]],
  owner: str,
) -> ReparamTransformation:
  """A chain whose hyperparameter names are ``prefix + name`` of each member."""
  members = [(prefix, _as_member(t)) for prefix, t in members]
  defaults: dict[str, Any] = {}
  keymaps: list[dict[str, str] | None] = []
  for i, (prefix, t) in enumerate(members):
    if not isinstance(t, ReparamTransformation):
      keymaps.append(None)
      continue
    km = {}
    for name, default in t.hyperparams.items():
      key = f"{prefix}/{name}" if prefix else name
      if key in defaults:
        raise ValueError(
          f"{owner}: hyperparameter name {key!r} is used by more than one "
          f"member (member {i} and an earlier one). Use "
          "mixflow_optax.transforms.named_chain(('a', t1), ('b', t2), ...) to "
          "namespace them as 'a/<name>', 'b/<name>'."
        )
      defaults[key] = default
      km[key] = name
    keymaps.append(km)

  def init_fn(params):
    return tuple(t.init(params) for _, t in members)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    if len(state) != len(members):
      raise ValueError(
        f"{owner}: the optimizer state has {len(state)} entries but the chain "
        f"has {len(members)} members; was it created by this optimizer's init?"
      )
    new_state = []
    for (_, t), s, km in zip(members, state, keymaps):
      if km is None:
        updates, s = t.update(updates, s, params, **extra_args)
      else:
        sub = {name: hp[key] for key, name in km.items()}
        updates, s = t.update(updates, s, params, hyperparams=sub, **extra_args)
      new_state.append(s)
    return updates, tuple(new_state)

  return ReparamTransformation(init_fn, update_fn, defaults)


def chain(*transforms: optax.GradientTransformation) -> ReparamTransformation:
  """Chains mixflow_optax and stock optax transforms, like :func:`optax.chain`.

  The state is a tuple of the members' states, exactly as in :func:`optax.chain`.
  Hyperparameters are exposed under the members' own names in one flat dict
  (e.g. ``chain(optax.clip_by_global_norm(1.0), adam(1e-3)).hyperparams`` has
  ``learning_rate``, ``b1``, ...). Stock optax members have none and are
  applied as they are (their internals are still differentiated exactly by
  autodiff). Two members with the same hyperparameter name are an error: use
  :func:`named_chain` to namespace them.

  Args:
    *transforms: mixflow_optax transforms (whose hyperparameters are exposed) and stock optax
      transforms, applied in order.

  Examples:
    >>> import optax, mixflow_optax as mfo
    >>> opt = mfo.transforms.chain(optax.clip_by_global_norm(1.0),
    ...                            mfo.transforms.sgd(0.1, momentum=0.9))
    >>> sorted(opt.hyperparams)
    ['learning_rate', 'momentum']
  """
  return _chain_from([(None, t) for t in transforms], "mixflow_optax.transforms.chain")


def named_chain(
  *named: tuple[str, optax.GradientTransformation],
) -> ReparamTransformation:
  """Chains transforms with namespaced hyperparameters ``'<name>/<hyperparam>'``.

  Like :func:`optax.named_chain`, but the state is a tuple like
  :func:`chain`. Use it when two members share a hyperparameter name.

  Args:
    *named: ``(name, transform)`` pairs, applied in order; ``name`` prefixes the transform's
      hyperparameters.

  Examples:
    >>> import mixflow_optax as mfo
    >>> opt = mfo.transforms.named_chain(
    ...     ("rms", mfo.transforms.scale_by_rms()),
    ...     ("lr", mfo.transforms.scale_by_learning_rate(0.1)))
    >>> sorted(opt.hyperparams)
    ['lr/learning_rate', 'rms/decay', 'rms/eps']
  """
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise ValueError(f"named_chain: member names must be unique, got {names}.")
  for n in names:
    if not isinstance(n, str) or not n or "/" in n:
      raise ValueError(
        f"named_chain: member names must be non-empty strings without '/', got {n!r}."
      )
  return _chain_from(list(named), "mixflow_optax.transforms.named_chain")


def rename_hyperparams(
  t: ReparamTransformation, mapping: Mapping[str, str]
) -> ReparamTransformation:
  """Exposes some of ``t``'s hyperparameters under other names.

  Args:
    t: the transform.
    mapping: ``{old_name: new_name}``; names not in it keep their names.
  """
  inverse = {new: old for old, new in mapping.items()}
  defaults = {mapping.get(k, k): v for k, v in t.hyperparams.items()}

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    if hyperparams is not None:
      # Validate against the public (renamed) names, so errors list those.
      resolve_hyperparams(hyperparams, defaults, "mixflow_optax.transforms.rename_hyperparams")
      hyperparams = {inverse.get(k, k): v for k, v in hyperparams.items()}
    return t.update(updates, state, params, hyperparams=hyperparams, **extra_args)

  return ReparamTransformation(t.init, update_fn, defaults)
