r"""LM head and cross entropy in chunks of tokens: the logits never exist at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["chunked_cross_entropy"]


def _check_labels_in_range(labels: jax.Array, vocab: int) -> None:
  """Concrete labels outside ``[0, V)`` raise now (traced ones give NaN losses)."""
  try:
    values = np.asarray(labels)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  bad = (values < 0) | (values >= vocab)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f"labels must be in [0, V) = [0, {vocab}); labels{list(first)} = {values[first]}. A "
      "padding or ignored token needs a valid label (e.g. 0) and weight 0 in the mean: "
      "negative labels are not skipped (no ignore_index)."
    )


def chunked_cross_entropy(
  hidden: jax.typing.ArrayLike,
  w_out: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  bias: jax.typing.ArrayLike | None = None,
  chunk_size: int = 1024,
) -> jax.Array:
  r"""Per-token cross entropy of a linear LM head, computed ``chunk_size`` tokens at a time.

  .. math::

    \ell_i = \log \sum_{v} \exp(z_{iv}) - z_{i y_i}, \qquad z_i = h_i W + b,

  for every token :math:`i`, without the :math:`N \times V` logits: a
  ``lax.scan`` over chunks of tokens, with :func:`jax.checkpoint` around each
  chunk so that the gradient recomputes a chunk's logits instead of storing
  them. Plain JAX, so :func:`jax.grad`, :func:`jax.jvp` and :func:`jax.jvp` of
  :func:`jax.grad` (forward-over-reverse, ``mfo.unroll(mode="mixflow")``) all
  work, each in :math:`O(\text{chunk} \cdot V)` memory. The logits and their
  softmax run in ``promote_types(dtype, float32)``.

  Args:
    hidden: final hidden states, ``(..., d)``.
    w_out: the LM head, ``(d, V)`` (e.g. the transposed embedding table).
    labels: integer targets, ``hidden.shape[:-1]``, in ``[0, V)``. Concrete
      labels outside raise; traced ones give a NaN loss for that token (never
      another class's loss: -1 does not wrap around, and there is no
      ``ignore_index``; weight padding tokens by 0 instead).
    bias: optional head bias, ``(V,)``.
    chunk_size: tokens per chunk, a positive int (any token count works: the last chunk is
      padded). Memory grows with it; very small chunks are slower.

  Returns:
    The per-token losses, shaped like ``labels`` (take a mean or a weighted
    sum; padding tokens can be weighted by 0).

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> h = jax.random.normal(jax.random.key(0), (2, 100, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 1000))
    >>> y = jax.random.randint(jax.random.key(2), (2, 100), 0, 1000)
    >>> loss = mfo.nn.chunked_cross_entropy(h, w, y, chunk_size=64)
    >>> naive = jax.nn.logsumexp(h @ w, -1) - jnp.take_along_axis(h @ w, y[..., None], -1)[..., 0]
    >>> bool(jnp.allclose(loss, naive, rtol=1e-5))
    True
  """
  hidden, w_out, labels = jnp.asarray(hidden), jnp.asarray(w_out), jnp.asarray(labels)
  if w_out.ndim != 2 or hidden.shape[-1:] != w_out.shape[:1]:
    raise ValueError(
      f"w_out must be (d, V) with d = hidden.shape[-1] = {hidden.shape[-1]}; got {w_out.shape}."
    )
  if labels.shape != hidden.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"labels must be integers of shape hidden.shape[:-1] = {hidden.shape[:-1]}; got "
      f"{labels.shape} {labels.dtype}."
    )
  _check_labels_in_range(labels, w_out.shape[1])
  if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
    raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if bias is not None and jnp.shape(bias) != w_out.shape[1:]:
    raise ValueError(f"bias must have shape ({w_out.shape[1]},); got {jnp.shape(bias)}.")
  dtype = jnp.promote_types(jnp.result_type(hidden, w_out), np.float32)
  d = hidden.shape[-1]
  n = int(np.prod(labels.shape))
  chunk = max(1, min(int(chunk_size), n))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, chunk, d)
  y = jnp.pad(labels.reshape(n), (0, pad)).reshape(num_chunks, chunk)
  w = w_out.astype(dtype)
  b = None if bias is None else jnp.asarray(bias).astype(dtype)

  # Recomputing a chunk's logits in the backward pass is what keeps the
  # gradient (and its forward-mode derivative) at one chunk of logits.
  @jax.checkpoint
  def chunk_loss(h_c, y_c):
    logits = h_c.astype(dtype) @ w
    if b is not None:
      logits = logits + b[None, :]
    # No wrap-around for negative labels (-1, -100 as "ignore"): out of [0, V)
    # gives NaN, never another class's loss.
    valid = (y_c >= 0) & (y_c < w.shape[1])
    label_logit = jnp.take_along_axis(logits, jnp.where(valid, y_c, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - label_logit, jnp.nan)

  _, losses = jax.lax.scan(lambda c, xs: (c, chunk_loss(*xs)), None, (h, y))
  return losses.reshape(-1)[:n].reshape(labels.shape)
