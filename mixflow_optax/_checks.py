"""Input checks shared by the layers (each layer words its own error)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def first_non_float_leaf(tree: Any) -> tuple[str, Any] | None:
  """``(path, dtype)`` of the first leaf of ``tree`` that is not floating point, else None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      return jax.tree_util.keystr(path) or "<root>", dtype
  return None
