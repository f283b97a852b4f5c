"""Input checks shared by the layers (each layer words its own error)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
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
