"""Input checks shared by the layers (each layer words its own error)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify


def is_float(x: Any) -> bool:
  """Whether ``x`` (an array or Python number) has an inexact dtype."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def first_non_float_leaf(tree: Any) -> tuple[str, Any] | None:
  """``(path, dtype)`` of the first leaf of ``tree`` that is not floating point, else None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_float(leaf):
      return jax.tree_util.keystr(path) or "<root>", jnp.result_type(leaf)
  return None


def check_finite_leaves(tree: Any, message: str, **fmt: jax.Array) -> None:
  """One ``checkify.check`` per leaf, naming the leaf in the message."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_float(leaf):
      continue
    where = jax.tree_util.keystr(path) or "<root>"
    checkify.check(jnp.all(jnp.isfinite(leaf)), message.replace("{leaf}", where), **fmt)
