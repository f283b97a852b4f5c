"""Adapter: :func:`dot_product_attention` as the ``attention_fn`` of Flax attention modules."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mixflow_optax.nn._attention import Differentiation, dot_product_attention

__all__ = ["flax_attention"]


def flax_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  bias: jax.Array | None = None,
  mask: jax.Array | None = None,
  broadcast_dropout: bool = True,
  dropout_rng: jax.Array | None = None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype: Any = None,
  precision: Any = None,
  module: Any = None,
  is_causal: bool = False,
  *,
  block_size: int | None = None,
  differentiation: Differentiation = "flash",
) -> jax.Array:
  """:func:`dot_product_attention` with the signature of Flax's ``dot_product_attention``.

  Pass it as ``attention_fn`` of :class:`flax.nnx.MultiHeadAttention` or
  :class:`flax.linen.MultiHeadDotProductAttention` (``functools.partial`` sets
  ``block_size`` / ``differentiation``). Flax's masks (boolean or 0/1 floats,
  ``(batch..., heads, q_len, kv_len)``) are converted; several leading batch
  dimensions are flattened as Flax does. Attention dropout and sowing the
  attention weights need the full probability matrix, which this attention
  never forms, so they raise.

  Args:
    query: ``(batch..., q_len, heads, head_dim)``.
    key: ``(batch..., kv_len, kv_heads, head_dim)``.
    value: like ``key``.
    bias: optional additive bias, broadcastable to ``(batch..., heads, q_len,
      kv_len)``.
    mask: optional mask, nonzero/True = attend, broadcastable like ``bias``.
    broadcast_dropout: unused (no attention dropout).
    dropout_rng: unused (no attention dropout).
    dropout_rate: must be 0 unless ``deterministic``.
    deterministic: with ``dropout_rate > 0``, must be True.
    dtype: computation dtype (default: promoted from the inputs).
    precision: unused: the blocks use the default matmul precision.
    module: must be None (sowing attention weights is not supported).
    is_causal: causal masking (``flax.nnx`` passes it).
    block_size: keys per block, see :func:`dot_product_attention` (None: 128 on a CPU, 256 elsewhere).
    differentiation: see :func:`dot_product_attention`.

  Returns:
    ``(batch..., q_len, heads, head_dim)``.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> from flax import nnx
    >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
    ...                                attention_fn=mfo.nn.flax_attention, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 50, 8))).shape
    (1, 50, 8)
  """
  del broadcast_dropout, dropout_rng, precision
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError(
      "mixflow_optax.nn.flax_attention has no attention dropout (it never forms the "
      "attention matrix): set dropout_rate=0.0, or deterministic=True, or apply dropout "
      "to the attention output instead."
    )
  if module is not None:
    raise ValueError(
      "mixflow_optax.nn.flax_attention cannot sow attention weights (it never forms them): "
      "call the module with sow_weights=False."
    )
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  query, key, value = (x.astype(dtype) for x in (query, key, value))
  shape = query.shape
  if query.ndim > 4:
    # Several batch dimensions: flattened into one, as Flax does.
    flat = lambda x: jnp.reshape(x, (math.prod(x.shape[:-3]),) + x.shape[-3:])
    query, key, value = map(flat, (query, key, value))
    bias, mask = (None if x is None else flat(x) for x in (bias, mask))
  if mask is not None:
    mask = jnp.asarray(mask).astype(bool)
  out = dot_product_attention(
    query,
    key,
    value,
    bias,
    mask,
    is_causal=is_causal,
    block_size=block_size,
    differentiation=differentiation,
  )
  return out.reshape(shape)
