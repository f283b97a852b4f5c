r"""Memory-efficient attention that can be differentiated forward-over-reverse.

Scaled dot-product attention with the semantics of
:func:`jax.nn.dot_product_attention`, computed over blocks of keys with an online
softmax so that the :math:`B N T S` score matrix never exists at once. Fused
attention kernels (cuDNN, Pallas, TPU flash/splash) are :class:`jax.custom_vjp` or
``pallas_call`` functions whose rules JAX cannot run under :func:`jax.jvp`; the
meta-gradient rule of this library needs :func:`jax.jvp` of :func:`jax.grad` of the
inner loss. Everything here is plain JAX, so both orders work, and the memory
stays :math:`O(S \cdot \text{block})` in the forward pass, the gradient and
the forward-over-reverse pass.

References:
  Rabe and Staats, `Self-attention Does Not Need O(n^2) Memory
  <https://arxiv.org/abs/2112.05682>`_, 2021.

  Dao, `FlashAttention-2: Faster Attention with Better Parallelism and Work
  Partitioning <https://arxiv.org/abs/2307.08691>`_, ICLR 2024 (Algorithms 1-2).
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mixflow_optax._jax_internals import is_jvp_now

__all__ = ["ATTENTION_RESIDUALS", "dot_product_attention"]

#: The :func:`jax.ad_checkpoint.checkpoint_name` of what the ``"flash"`` path's
#: backward needs from its forward pass (the output and the softmax row
#: statistics). A per-block :func:`jax.checkpoint` with
#: ``policy=jax.checkpoint_policies.save_only_these_names(ATTENTION_RESIDUALS)`` keeps
#: them (``O(B T N d)`` per layer, no ``T x S`` array) instead of running the
#: block loop again when the block is recomputed.
ATTENTION_RESIDUALS = "mixflow_attention_residuals"

Differentiation = Literal["flash", "checkpoint"]


class _Config(NamedTuple):
  """Static description of one attention call (hashable: a custom_vjp nondiff argument)."""

  seq_q: int
  seq_kv: int
  block: int
  num_blocks: int
  is_causal: bool
  window: tuple[int, ...] | None  # (left, right)
  bias_full_kv: bool
  mask_full_kv: bool
  # Causal / windowed self-attention with nothing else masked: the (query block,
  # key block) pairs that are not fully masked, as two index tuples; None when
  # every key block is visited for all queries at once.
  pairs: tuple[tuple[int, ...], tuple[int, ...]] | None = None


#: Keys per block by backend when ``block_size`` is not given. On a CPU, 128 was
#: measured 10-15% faster than 256 for the gradient and the forward-over-reverse
#: HVP of causal attention (batch 4, 4 heads of 32, 256 and 1024 tokens), and
#: 512 slower still: a block's scores then stay in cache.
_DEFAULT_BLOCK = {"cpu": 128}
_DEFAULT_BLOCK_OTHER = 256


def _default_block_size(backend: str | None = None) -> int:
  """Keys per block of :func:`dot_product_attention` when ``block_size`` is None.

  Args:
    backend: a JAX backend name (``"cpu"``, ``"gpu"``, ``"tpu"``); default
      ``jax.default_backend()``.

  Returns:
    128 on a CPU, 256 on other backends.
  """
  return _DEFAULT_BLOCK.get(backend or jax.default_backend(), _DEFAULT_BLOCK_OTHER)


def _large_negative(dtype: Any) -> jax.Array:
  # The value jax.nn.dot_product_attention writes into masked logits: finite, so
  # that a fully masked row is a uniform average (as there), capped at the
  # float32 range as there.
  big = min(float(jnp.finfo(dtype).max), float(jnp.finfo(np.float32).max))
  return jnp.asarray(-0.7 * big, dtype=dtype)


def _ensure_4d(x: Any) -> jax.Array:
  x = jnp.asarray(x)
  return x.reshape((1,) * (4 - x.ndim) + x.shape) if x.ndim < 4 else x


def _check_ranks(query: Any, key: Any, value: Any) -> None:
  # Padding a 1-D or 2-D input on the left would read it as one position with
  # many heads (or one head): refuse it, as jax.nn.dot_product_attention does.
  for name, x in (("query", query), ("key", key), ("value", value)):
    if jnp.ndim(x) not in (3, 4):
      raise ValueError(
        f"{name} must be (batch, seq, heads, head_dim) or (seq, heads, head_dim); got "
        f"shape {jnp.shape(x)} ({jnp.ndim(x)}-D). For a single head, add the heads "
        "axis: x[..., None, :]."
      )


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_options(
  block_size: Any, is_causal: Any, window: Any
) -> tuple[int, bool, tuple[int, int] | None]:
  """``block_size`` a positive int, ``is_causal`` a bool, the window non-negative ints."""
  if not _is_int(block_size) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be True or False, got {is_causal!r}.")
  if _is_int(window):
    window = (window, window)
  if window is not None and (
    not isinstance(window, (tuple, list))
    or len(window) != 2
    or not all(_is_int(w) and w >= 0 for w in window)
  ):
    raise ValueError(
      f"local_window_size must be a non-negative int or a pair (left, right) of them, got "
      f"{window!r}."
    )
  return (
    int(block_size),
    bool(is_causal),
    None if window is None else (int(window[0]), int(window[1])),
  )


def _check_inputs(query, key, value, bias, mask, q_len, kv_len) -> None:
  if key.ndim != 4 or query.ndim != 4:
    raise ValueError(
      f"query and key must be (batch, seq, heads, head_dim) or (seq, heads, head_dim); got "
      f"query {query.shape}, key {key.shape}."
    )
  b, s, k, h = key.shape
  if value.shape != key.shape or value.dtype != key.dtype:
    raise ValueError(
      f"value must have key's shape and dtype {key.shape} {key.dtype}; got {value.shape} "
      f"{value.dtype}."
    )
  if query.shape[0] != b or query.shape[3] != h or query.dtype != key.dtype:
    raise ValueError(
      f"query {query.shape} {query.dtype} must share batch, head_dim and dtype with key "
      f"{key.shape} {key.dtype}."
    )
  if query.shape[2] % k:
    raise ValueError(
      f"The number of query heads ({query.shape[2]}) must be a multiple of the number of "
      f"key/value heads ({k})."
    )
  if s == 0:
    raise ValueError("key and value need at least one position (seq length 0 given).")
  if mask is not None and mask.dtype != np.dtype(bool):
    raise ValueError(
      f"mask must be boolean (True = attend), got {mask.dtype}; pass additive masks as bias."
    )
  for name, x in (("bias", bias), ("mask", mask)):
    if x is None:
      continue
    target = (b, query.shape[2], query.shape[1], s)
    if x.ndim != 4 or any(d not in (1, t) for d, t in zip(x.shape, target)):
      raise ValueError(
        f"{name} of shape {x.shape} does not broadcast to (batch, heads, q_len, kv_len) = {target}."
      )
  for name, x in (("query_seq_lengths", q_len), ("key_value_seq_lengths", kv_len)):
    if x is not None and (x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an integer array of shape ({b},); got {x.shape} {x.dtype}.")


def _grouped(x: jax.Array | None, num_kv_heads: int) -> jax.Array | None:
  """(b, n, t, s) with n in {1, N} -> (b, K or 1, G or 1, t, s)."""
  if x is None:
    return None
  b, n, t, s = x.shape
  return x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def _blocks(x: jax.Array, axis: int, cfg: _Config, fill: Any = 0) -> jax.Array:
  """Pads ``axis`` (length S) to whole blocks and moves the block index to the front."""
  pad = cfg.num_blocks * cfg.block - x.shape[axis]
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  x = jnp.pad(x, widths, constant_values=fill)
  shape = x.shape[:axis] + (cfg.num_blocks, cfg.block) + x.shape[axis + 1 :]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int, cfg: _Config) -> jax.Array:
  """Inverse of :func:`_blocks` (``axis`` counted without the leading block axis)."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (cfg.num_blocks * cfg.block,) + x.shape[axis + 2 :])
  return jax.lax.slice_in_dim(x, 0, cfg.seq_kv, axis=axis)


def _split(bias, mask, key, value, cfg: _Config):
  """Scanned inputs (one slice per key block) and per-call constants."""
  xs = {
    "index": jnp.arange(cfg.num_blocks),
    "key": _blocks(key, 1, cfg),
    "value": _blocks(value, 1, cfg),
  }
  consts: dict[str, Any] = {}
  for name, x, full, fill in (
    ("bias", bias, cfg.bias_full_kv, 0),
    ("mask", mask, cfg.mask_full_kv, False),
  ):
    if x is not None:
      (xs if full else consts)[name] = _blocks(x, 4, cfg, fill) if full else x
  return xs, consts


def _block_scores(q, blk, consts, q_len, kv_len, cfg: _Config):
  """Logits of one key block, masked as jax.nn does; and where keys are real (not padding).

  Returns ``(s, keep, real)``: ``s`` (B, K, G, T, block) with masked logits set
  to the large negative value, ``keep`` the mask of logits that depend on the
  inputs (None when nothing is masked), ``real`` (block,) False on padding (None
  when the keys fill whole blocks).
  """
  s = jnp.einsum("btkgh,bskh->bkgts", q, blk["key"])
  bias = blk.get("bias", consts.get("bias"))
  if bias is not None:
    s = s + bias
  k_pos = blk["index"] * cfg.block + jnp.arange(cfg.block)
  q_pos = jnp.arange(cfg.seq_q)
  real = k_pos < cfg.seq_kv
  keep = blk.get("mask", consts.get("mask"))
  conds = []
  if cfg.is_causal:
    conds.append(q_pos[:, None] >= k_pos[None, :])
  if cfg.window is not None:
    left, right = cfg.window
    conds.append(q_pos[:, None] <= k_pos[None, :] + left)
    conds.append(q_pos[:, None] >= k_pos[None, :] - right)
  if q_len is not None:
    conds.append(
      jnp.broadcast_to(q_pos[None, :, None] < q_len[:, None, None], s.shape[:1] + s.shape[3:])
    )
  if kv_len is not None:
    conds.append(
      jnp.broadcast_to(k_pos[None, None, :] < kv_len[:, None, None], s.shape[:1] + s.shape[3:])
    )
  for c in conds:
    c = c.reshape(((c.shape[0],) if c.ndim == 3 else (1,)) + (1, 1) + c.shape[-2:])
    keep = c if keep is None else jnp.logical_and(keep, c)
  neg = _large_negative(s.dtype)
  if keep is not None:
    s = jnp.where(keep, s, neg)
  if cfg.num_blocks * cfg.block == cfg.seq_kv:
    return s, keep, None  # no padding
  return jnp.where(real[None, None, None, None, :], s, neg), keep, real


def _drop_padding(p: jax.Array, real: jax.Array | None) -> jax.Array:
  return p if real is None else jnp.where(real[None, None, None, None, :], p, 0)


def _forward(q, key, value, bias, mask, q_len, kv_len, cfg: _Config, remat: bool):
  """Online softmax over key blocks: output (B, K, G, T, H), row maxima and sums (B, K, G, T).

  The log-sum-exp is ``m + log(row_sum)``; it is kept as a pair because for a
  fully masked row ``m`` is the large negative value and ``m + log(row_sum)``
  rounds to it.
  """
  xs, consts = _split(bias, mask, key, value, cfg)
  b, t, k, g, h = q.shape
  neg = _large_negative(q.dtype)

  def step(carry, blk):
    m, row_sum, acc = carry
    s, _, real = _block_scores(q, blk, consts, q_len, kv_len, cfg)
    # The output does not depend on the running maximum (a shift of every
    # logit), so it is a constant for differentiation: exact, and no
    # derivative of max (ties, padding) enters any order of derivative.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
    alpha = jnp.exp(m - m_new)
    p = _drop_padding(jnp.exp(s - m_new[..., None]), real)
    row_sum = alpha * row_sum + p.sum(axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bkgts,bskh->bkgth", p, blk["value"])
    return (m_new, row_sum, acc), None

  if remat:
    step = jax.checkpoint(step, prevent_cse=False)
  init = (
    jnp.full((b, k, g, t), neg, q.dtype),
    jnp.zeros((b, k, g, t), q.dtype),
    jnp.zeros((b, k, g, t, h), q.dtype),
  )
  (m, row_sum, acc), _ = jax.lax.scan(step, init, xs)
  # row_sum >= 1: the running maximum is one of the row's logits.
  return acc / row_sum[..., None], (m, row_sum)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return x.sum(axis=axes, keepdims=True)


def _pair_scores(q_blk, k_blk, i, j, cfg: _Config):
  """Logits of query block ``i`` against key block ``j`` (B, K, G, block, block), masked.

  ``q_blk`` is head-major (B, K, G, block, H), ``k_blk`` (B, K, block, H).
  """
  s = jnp.einsum("bkgth,bksh->bkgts", q_blk, k_blk)
  q_pos = i * cfg.block + jnp.arange(cfg.block)
  k_pos = j * cfg.block + jnp.arange(cfg.block)
  keep = k_pos[None, :] < cfg.seq_kv  # padding keys
  if cfg.is_causal:
    keep = keep & (q_pos[:, None] >= k_pos[None, :])
  if cfg.window is not None:
    left, right = cfg.window
    keep = keep & (q_pos[:, None] <= k_pos[None, :] + left)
    keep = keep & (q_pos[:, None] >= k_pos[None, :] - right)
  return jnp.where(keep, s, _large_negative(s.dtype)), keep


def _head_major_blocks(q, key, value, cfg: _Config):
  """q (B, T, K, G, H), key/value (B, S, K, H) as head-major blocks.

  Returns ``(nb, B, K, G, block, H)`` and twice ``(nb, B, K, block, H)``. Transposed
  once here, every product inside the pair loop has its batch axes leading and
  its contraction axis minor: XLA's CPU backend would otherwise copy the operands
  into that layout in every step (the pair loop ran 1.4x slower that way).
  """
  return (
    _blocks(jnp.moveaxis(q, 1, 3), 3, cfg),
    _blocks(jnp.moveaxis(key, 1, 2), 2, cfg),
    _blocks(jnp.moveaxis(value, 1, 2), 2, cfg),
  )


def _forward_pairs(q, key, value, cfg: _Config):
  """:func:`_forward` for self-attention over the visible block pairs only (``cfg.pairs``)."""
  b, t, k, g, h = q.shape
  qb, kb, vb = _head_major_blocks(q, key, value, cfg)
  nb, blk = cfg.num_blocks, cfg.block
  neg = _large_negative(q.dtype)

  def step(carry, ij):
    m, row_sum, acc = carry
    i, j = ij
    s, keep = _pair_scores(qb[i], kb[j], i, j, cfg)
    m_i = m[i]
    m_new = jax.lax.stop_gradient(jnp.maximum(m_i, s.max(axis=-1)))
    alpha = jnp.exp(m_i - m_new)
    p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0)
    row_sum = row_sum.at[i].set(alpha * row_sum[i] + p.sum(axis=-1))
    acc = acc.at[i].set(alpha[..., None] * acc[i] + jnp.einsum("bkgts,bksh->bkgth", p, vb[j]))
    return (m.at[i].set(m_new), row_sum, acc), None

  init = (
    jnp.full((nb, b, k, g, blk), neg, q.dtype),
    jnp.zeros((nb, b, k, g, blk), q.dtype),
    jnp.zeros((nb, b, k, g, blk, h), q.dtype),
  )
  assert cfg.pairs is not None
  pairs = tuple(jnp.asarray(x, jnp.int32) for x in cfg.pairs)
  (m, row_sum, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, pairs)

  # Query blocks back to the query axis (B, K, G, T, ...), padding rows dropped
  # before dividing (a padding row may have seen no key).
  def unblock(x):
    return jnp.moveaxis(x, 0, 3).reshape(b, k, g, nb * blk, *x.shape[5:])[:, :, :, :t]

  m, row_sum, acc = unblock(m), unblock(row_sum), unblock(acc)
  return acc / row_sum[..., None], (m, row_sum)


def _bwd_pairs(cfg: _Config, q, key, value, out, m, row_sum, d_out):
  """:func:`_flash_bwd` over the visible block pairs only; returns (d_q, d_key, d_value)."""
  qb, kb, vb = _head_major_blocks(q, key, value, cfg)
  d_out_b = _blocks(d_out, 3, cfg)  # (nb, B, K, G, blk, H)
  # Row statistics by query block; padding rows get m = 0 and 1 / row_sum = 0 (p = 0).
  m_b = _blocks(m, 3, cfg)  # (nb, B, K, G, blk)
  inv_l_b = _blocks(1 / row_sum, 3, cfg)
  delta_b = _blocks(jnp.sum(d_out * out, axis=-1), 3, cfg)

  def step(carry, ij):
    d_q, d_key, d_value = carry
    i, j = ij
    s, keep = _pair_scores(qb[i], kb[j], i, j, cfg)
    p = jnp.where(keep, jnp.exp(s - m_b[i][..., None]) * inv_l_b[i][..., None], 0)
    d_value = d_value.at[j].add(jnp.einsum("bkgts,bkgth->bksh", p, d_out_b[i]))
    d_p = jnp.einsum("bkgth,bksh->bkgts", d_out_b[i], vb[j])
    d_s = jnp.where(keep, p * (d_p - delta_b[i][..., None]), 0)
    d_q = d_q.at[i].add(jnp.einsum("bkgts,bksh->bkgth", d_s, kb[j]))
    d_key = d_key.at[j].add(jnp.einsum("bkgts,bkgth->bksh", d_s, qb[i]))
    return (d_q, d_key, d_value), None

  init = (jnp.zeros_like(qb), jnp.zeros_like(kb), jnp.zeros_like(vb))
  assert cfg.pairs is not None
  pairs = tuple(jnp.asarray(x, jnp.int32) for x in cfg.pairs)
  (d_q, d_key, d_value), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, pairs)
  d_q = jnp.moveaxis(_unblocks(d_q, 3, cfg), 3, 1)  # (B, T, K, G, H)
  d_key = jnp.moveaxis(_unblocks(d_key, 2, cfg), 2, 1)  # (B, S, K, H)
  d_value = jnp.moveaxis(_unblocks(d_value, 2, cfg), 2, 1)
  return d_q, d_key, d_value


def _flash_forward(q, key, value, bias, mask, q_len, kv_len, cfg: _Config):
  if cfg.pairs is not None:
    return _forward_pairs(q, key, value, cfg)
  return _forward(q, key, value, bias, mask, q_len, kv_len, cfg, remat=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, key, value, bias, mask, q_len, kv_len, cfg: _Config):
  return _flash_forward(q, key, value, bias, mask, q_len, kv_len, cfg)[0]


def _flash_fwd(q, key, value, bias, mask, q_len, kv_len, cfg: _Config):
  # Calls _forward, never _flash: jax.jvp of jax.grad differentiates these
  # rules, and a custom_vjp function inside them could not be differentiated
  # in forward mode.
  out, stats = _flash_forward(q, key, value, bias, mask, q_len, kv_len, cfg)
  out, stats = checkpoint_name((out, stats), ATTENTION_RESIDUALS)
  return out, (q, key, value, bias, mask, q_len, kv_len, out, stats)


def _flash_bwd(cfg: _Config, res, d_out):
  """FlashAttention-2 backward: recomputes each key block's probabilities from the row stats."""
  q, key, value, bias, mask, q_len, kv_len, out, (m, row_sum) = res
  if cfg.pairs is not None:
    d_q, d_key, d_value = _bwd_pairs(cfg, q, key, value, out, m, row_sum, d_out)
    return d_q, d_key, d_value, None, None, None, None
  inv_l = 1 / row_sum
  xs, consts = _split(bias, mask, key, value, cfg)
  delta = jnp.sum(d_out * out, axis=-1)  # (B, K, G, T)
  d_out_t = jnp.moveaxis(d_out, 3, 1)  # (B, T, K, G, H)
  bias_shape = None if bias is None else bias.shape[:4] + (cfg.block,)

  def step(carry, blk):
    d_q, d_bias_const = carry
    s, keep, real = _block_scores(q, blk, consts, q_len, kv_len, cfg)
    p = _drop_padding(jnp.exp(s - m[..., None]) * inv_l[..., None], real)
    d_value = jnp.einsum("bkgts,btkgh->bskh", p, d_out_t)
    d_p = jnp.einsum("btkgh,bskh->bkgts", d_out_t, blk["value"])
    d_s = p * (d_p - delta[..., None])
    if keep is not None:
      # Masked logits are the constant large negative value: no gradient.
      d_s = jnp.where(keep, d_s, 0)
    d_q = d_q + jnp.einsum("bkgts,bskh->btkgh", d_s, blk["key"])
    d_key = jnp.einsum("bkgts,btkgh->bskh", d_s, q)
    d_bias = None
    if bias_shape is not None:  # a bias was given
      d_bias = _sum_to(d_s, bias_shape)
      if not cfg.bias_full_kv:
        d_bias_const = d_bias_const + d_bias.sum(axis=-1, keepdims=True)
        d_bias = None
    return (d_q, d_bias_const), (d_key, d_value, d_bias)

  init = (jnp.zeros_like(q), None if bias is None or cfg.bias_full_kv else jnp.zeros_like(bias))
  (d_q, d_bias_const), (d_key, d_value, d_bias) = jax.lax.scan(
    jax.checkpoint(step, prevent_cse=False), init, xs
  )
  d_key, d_value = _unblocks(d_key, 1, cfg), _unblocks(d_value, 1, cfg)
  if bias is not None:
    d_bias = _unblocks(d_bias, 4, cfg) if cfg.bias_full_kv else d_bias_const
  return d_q, d_key, d_value, d_bias, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _visible_pairs(
  seq: int, block: int, num_blocks: int, is_causal: bool, window: tuple[int, int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """The (query block, key block) pairs of self-attention that causal/window masks leave open.

  Query block ``i`` holds positions ``i * block ...`` (like the key blocks). With a causal mask
  query ``q`` sees keys ``q - left <= k <= q``, without one ``q - left <= k <= q + right``
  (``left``/``right`` unbounded without a window). A skipped pair is masked for every real
  query of its block, so leaving it out changes no value: every row still sees its own key,
  whose logit replaces the running maximum, and a masked logit's probability is exactly 0
  next to it. Returns None when no pair can be skipped.
  """
  inf = seq + block
  left = inf if window is None else window[0]
  right = 0 if is_causal else (inf if window is None else window[1])
  q_idx, k_idx = [], []
  for i in range(num_blocks):
    q0, q1 = i * block, min((i + 1) * block, seq) - 1
    for j in range(num_blocks):
      k0, k1 = j * block, min((j + 1) * block, seq) - 1
      if max(q0, k0 - right) <= min(q1, k1 + left):
        q_idx.append(i)
        k_idx.append(j)
  if len(q_idx) == num_blocks * num_blocks:
    return None
  return tuple(q_idx), tuple(k_idx)


def dot_product_attention(
  query: jax.typing.ArrayLike,
  key: jax.typing.ArrayLike,
  value: jax.typing.ArrayLike,
  bias: jax.typing.ArrayLike | None = None,
  mask: jax.typing.ArrayLike | None = None,
  *,
  scale: jax.typing.ArrayLike | None = None,
  is_causal: bool = False,
  query_seq_lengths: jax.typing.ArrayLike | None = None,
  key_value_seq_lengths: jax.typing.ArrayLike | None = None,
  local_window_size: int | tuple[int, int] | None = None,
  block_size: int | None = None,
  differentiation: Differentiation = "flash",
) -> jax.Array:
  r"""Scaled dot-product attention in key blocks; differentiable in every order.

  .. math::

    \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\Big(s\, Q K^\top + B\Big) V,
    \qquad s = 1 / \sqrt{d} \text{ by default},

  with the arguments, layout and semantics of :func:`jax.nn.dot_product_attention`
  (grouped-query attention, bias and mask broadcasting, causal masking,
  sequence lengths, local windows, fully masked rows averaging every value as
  there), computed over blocks of ``block_size`` keys with an online softmax
  (FlashAttention-2, Algorithm 1). For causal or windowed self-attention with
  no bias, mask or sequence lengths, the ``"flash"`` path also splits the
  queries into blocks and skips the (query block, key block) pairs the masks
  close (about half of them for a long causal sequence); the values are the
  same. Memory is :math:`O(B N T \cdot
  \text{block})` instead of :math:`O(B N T S)`, for the output, its gradient
  *and* :func:`jax.jvp` of :func:`jax.grad` (forward-over-reverse, what
  ``mfo.unroll(mode="mixflow")`` runs). The softmax runs in
  ``promote_types(dtype, float32)``: float64 inputs give float64 attention
  (:mod:`jax.nn`'s XLA path computes it in float32).

  Args:
    query: ``(batch, q_len, heads, head_dim)`` or ``(q_len, heads, head_dim)``.
    key: ``(batch, kv_len, kv_heads, head_dim)``; ``heads`` a multiple of
      ``kv_heads`` (grouped-query attention).
    value: same shape and dtype as ``key``.
    bias: optional additive logits bias, broadcastable to ``(batch, heads,
      q_len, kv_len)`` (fewer dimensions are padded on the left).
    mask: optional boolean mask (True = attend), broadcastable like ``bias``.
    scale: logits scale; default ``1 / sqrt(head_dim)``. May be a traced array
      (e.g. a meta-learned temperature).
    is_causal: query ``i`` attends to keys ``j <= i``.
    query_seq_lengths: ``(batch,)`` int; output rows past the length are 0.
    key_value_seq_lengths: ``(batch,)`` int; keys past the length are masked.
    local_window_size: ``(left, right)`` or ``w`` for ``(w, w)``: query ``i``
      attends to keys ``i - left ... i + right``.
    block_size: keys per block (any sequence length works; the last block is
      padded). Memory grows with it, time shrinks with it up to a point.
      Default ``None``: the default backend's size (128
      on a CPU, 256 elsewhere).
    differentiation: ``"flash"`` (default): a :class:`jax.custom_vjp` whose rules
      are plain JAX: the forward saves only the output and the softmax row
      statistics (maximum and sum),
      the backward recomputes each block's probabilities (FlashAttention-2,
      Algorithm 2). :func:`jax.grad` and :func:`jax.jvp` of :func:`jax.grad` use it.
      Under a bare :func:`jax.jvp` / :func:`jax.jacfwd` (e.g. the outer loss of
      ``meta_optimizer(mode="forward")``), where a ``custom_vjp`` cannot run,
      the call switches itself to ``"checkpoint"`` (same values). It cannot
      see a :func:`jax.jvp` applied outside a :func:`jax.jit`, :func:`jax.checkpoint` or
      :func:`jax.lax.scan` that contains it: there JAX raises "can't apply
      forward-mode autodiff (jvp) to a custom_vjp function"; pass
      ``"checkpoint"`` for such uses. Inside a per-layer :func:`jax.checkpoint`,
      ``policy=jax.checkpoint_policies.save_only_these_names(mfo.nn.ATTENTION_RESIDUALS)``
      keeps the forward's output and row statistics, so recomputing the layer
      does not run the block loop again (see :data:`ATTENTION_RESIDUALS`).
      ``"checkpoint"``: plain differentiable JAX with :func:`jax.checkpoint` per
      block: every transformation works (a bare :func:`jax.jvp` too), with less
      memory for a plain gradient but slightly more for :func:`jax.jvp` of
      :func:`jax.grad` and much more reverse-over-reverse (the online-softmax
      carry is stored per block); it never skips closed block pairs, so for
      causal self-attention ``"flash"`` needs less memory and time in every case.

  Returns:
    The attention output, shaped and typed like ``query``.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 4, 8))
    >>> out = mfo.nn.dot_product_attention(q, k, v, is_causal=True, block_size=32)
    >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True

  References:
    Dao, `FlashAttention-2 <https://arxiv.org/abs/2307.08691>`_, ICLR 2024.
  """
  output_shape = jnp.shape(query)
  _check_ranks(query, key, value)
  query, key, value = _ensure_4d(query), _ensure_4d(key), _ensure_4d(value)
  bias = None if bias is None else _ensure_4d(bias)
  mask = None if mask is None else _ensure_4d(mask)
  q_len = None if query_seq_lengths is None else jnp.asarray(query_seq_lengths)
  kv_len = None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths)
  _check_inputs(query, key, value, bias, mask, q_len, kv_len)
  if differentiation not in ("flash", "checkpoint"):
    raise ValueError(f'differentiation must be "flash" or "checkpoint", got {differentiation!r}.')
  if block_size is None:
    block_size = _default_block_size()
  block_size, is_causal, window = _check_options(block_size, is_causal, local_window_size)
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  block = max(1, min(int(block_size), s))
  cfg = _Config(
    seq_q=t,
    seq_kv=s,
    block=block,
    num_blocks=-(-s // block),
    is_causal=bool(is_causal),
    window=window,
    bias_full_kv=bias is not None and bias.shape[3] > 1,
    mask_full_kv=mask is not None and mask.shape[3] > 1,
  )
  if (
    (is_causal or window is not None)
    and t == s
    and bias is None
    and mask is None
    and q_len is None
    and kv_len is None
  ):
    cfg = cfg._replace(pairs=_visible_pairs(s, block, cfg.num_blocks, cfg.is_causal, window))
  dtype = jnp.promote_types(query.dtype, np.float32)
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  # Scaling the queries (not the logits) lets a traced scale be differentiated
  # by ordinary autodiff outside the custom rule.
  q = (query.astype(dtype) * jnp.asarray(scale, dtype)).reshape(b, t, k, n // k, h)
  args = (
    q,
    key.astype(dtype),
    value.astype(dtype),
    None if bias is None else _grouped(bias.astype(dtype), k),
    _grouped(mask, k),
    q_len,
    kv_len,
  )
  # Under jax.jvp / jacfwd (not of jax.grad) the custom_vjp cannot run; the
  # plain path computes the same values and differentiates in every mode.
  if differentiation == "flash" and not is_jvp_now():
    out = _flash(*args, cfg)
  else:
    out = _forward(*args, cfg, remat=True)[0]
  out = jnp.moveaxis(out, 3, 1).reshape(b, t, n, h)  # (B, K, G, T, H) -> (B, T, N, H)
  if q_len is not None:
    out = out * (jnp.arange(t)[None, :] < q_len[:, None])[:, :, None, None].astype(dtype)
  return out.reshape(output_shape).astype(query.dtype)
