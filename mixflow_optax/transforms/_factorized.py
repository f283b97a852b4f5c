r"""Adafactor's pieces, reparameterised: factored second moments and block-RMS clipping.

Same arguments, state classes and arithmetic as :func:`optax.scale_by_factored_rms`
and :func:`optax.clip_by_block_rms`, with ``hyperparams={...}`` in ``update``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax.transforms._base import (
  ReparamTransformation,
  leaf_results,
  map_leaves,
  per_leaf,
  resolve_hyperparams,
)
from mixflow_optax.transforms._transforms import _owner, safe_sqrt

try:  # The same state class as optax, so states are interchangeable.
  from optax._src.factorized import FactoredState
except ImportError:  # pragma: no cover - other optax layouts
  FactoredState = optax.FactoredState

__all__ = ["scale_by_factored_rms", "clip_by_block_rms"]


def _decay_rate_pow(i: jax.typing.ArrayLike, exponent: float | jax.Array = 0.8) -> jax.Array:
  # Same arithmetic as optax's default schedule (the step in float32).
  t = jnp.array(i + 1, jnp.float32)
  return 1.0 - t ** (-exponent)


def _factored_dims(shape, factored: bool, min_dim_size_to_factor: int):
  """The two largest axes (if both are at least ``min_dim_size_to_factor``), as optax."""
  if not factored or len(shape) < 2:
    return None
  sorted_dims = np.argsort(shape)
  if shape[sorted_dims[-2]] < min_dim_size_to_factor:
    return None
  return int(sorted_dims[-2]), int(sorted_dims[-1])


def scale_by_factored_rms(
  factored: bool = True,
  decay_rate: jax.typing.ArrayLike = 0.8,
  step_offset: int = 0,
  min_dim_size_to_factor: int = 128,
  epsilon: jax.typing.ArrayLike = 1e-30,
  decay_rate_fn: Callable[[jax.Array, jax.Array], jax.Array] = _decay_rate_pow,
) -> ReparamTransformation:
  r"""Adafactor's factored RMS scaling (hyperparameters ``decay_rate, epsilon``), as :func:`optax.scale_by_factored_rms`.

  For a matrix gradient :math:`G_t` (factored: its two largest axes are at
  least ``min_dim_size_to_factor``), with :math:`\hat\beta_t = 1 - (t+1)^{-d}`:

  .. math::

    R_t = \hat\beta_t R_{t-1} + (1-\hat\beta_t)\, \mathrm{mean}_{\text{cols}}(G_t^2 + \epsilon), \quad
    C_t = \hat\beta_t C_{t-1} + (1-\hat\beta_t)\, \mathrm{mean}_{\text{rows}}(G_t^2 + \epsilon),

  .. math::

    U_t = G_t \odot \Big(\frac{R_t}{\mathrm{mean}(R_t)}\Big)^{-1/2} \Big(C_t\Big)^{-1/2}
    \quad\text{(outer product of the row and column factors)};

  other leaves keep an unfactored :math:`v_t` and use :math:`g_t / \sqrt{v_t}`.
  Every quantity under a root is at least :math:`\epsilon > 0`, so the exact
  derivative is finite at zero gradients.

  Args:
    factored: whether to factor the second moments of matrices.
    decay_rate: the exponent :math:`d` of the decay schedule.
    step_offset: subtracted from the step count (an integer, not a
      hyperparameter).
    min_dim_size_to_factor: factor only if the two largest axes are at least
      this large.
    epsilon: added to the squared gradients.
    decay_rate_fn: ``(step, decay_rate) -> decay`` schedule (optax's default).

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  owner = _owner("scale_by_factored_rms")
  defaults = {"decay_rate": decay_rate, "epsilon": epsilon}

  def dims(x):
    return _factored_dims(x.shape, factored, min_dim_size_to_factor)

  def init_fn(params):
    def one(p):
      placeholder = jnp.zeros((1,), dtype=p.dtype)
      fd = dims(p)
      if fd is None:
        return placeholder, placeholder, jnp.zeros_like(p)
      d1, d0 = fd
      return (
        jnp.zeros(np.delete(p.shape, d0), p.dtype),
        jnp.zeros(np.delete(p.shape, d1), p.dtype),
        placeholder,
      )

    treedef = jax.tree.structure(params)
    outs = [one(p) for p in jax.tree.leaves(params)]
    v_row, v_col, v = (jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(3))
    return FactoredState(count=jnp.zeros([], jnp.int32), v_row=v_row, v_col=v_col, v=v)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{owner} needs the parameters: call update(grads, state, params).")
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = [per_leaf(k, hp[k], updates, owner) for k in defaults]
    step = state.count

    def leaf(g, v_row, v_col, v, p, decay_rate, eps):
      dtype = p.dtype
      decay_t = decay_rate_fn(step - step_offset, decay_rate)
      placeholder = jnp.zeros((1,), dtype=dtype)
      grad_sqr = (g.conj() * g).real + eps
      fd = dims(p)
      if fd is None:
        new_v = (decay_t * v + (1.0 - decay_t) * grad_sqr).astype(dtype)
        return g * new_v**-0.5, placeholder, placeholder, new_v
      if jnp.ndim(decay_rate) or jnp.ndim(eps):
        raise ValueError(
          f"{owner}: decay_rate and epsilon must be scalars for factored "
          f"parameters (shape {p.shape}); per-element values only apply to "
          "unfactored ones."
        )
      d1, d0 = fd
      new_v_row = (decay_t * v_row + (1.0 - decay_t) * jnp.mean(grad_sqr, axis=d0)).astype(dtype)
      new_v_col = (decay_t * v_col + (1.0 - decay_t) * jnp.mean(grad_sqr, axis=d1)).astype(dtype)
      reduced_d1 = d1 - 1 if d1 > d0 else d1
      row_col_mean = jnp.mean(new_v_row, axis=reduced_d1, keepdims=True)
      row_factor = (new_v_row / row_col_mean) ** -0.5
      col_factor = new_v_col**-0.5
      u = g * jnp.expand_dims(row_factor, axis=d0) * jnp.expand_dims(col_factor, axis=d1)
      return u, new_v_row, new_v_col, placeholder

    outs = leaf_results(leaf, updates, state.v_row, state.v_col, state.v, params, *cols)
    treedef = jax.tree.structure(updates)
    u, v_row, v_col, v = (jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(4))
    count_inc = optax.safe_increment(state.count)
    return u, FactoredState(count=count_inc, v_row=v_row, v_col=v_col, v=v)

  return ReparamTransformation(init_fn, update_fn, defaults)


def clip_by_block_rms(threshold: jax.typing.ArrayLike) -> ReparamTransformation:
  r"""Per-tensor RMS clipping (hyperparameter ``threshold``), as :func:`optax.clip_by_block_rms`.

  .. math:: u = g / \max\big(1, \mathrm{rms}(g) / c\big)

  Differentiated exactly, including the dependence of :math:`\mathrm{rms}(g)`
  on :math:`g` when clipping is active; unlike plain autodiff of the optax
  transform, finite when a whole tensor is exactly zero.

  Args:
    threshold: the maximum RMS :math:`c` of each tensor.
  """
  owner = _owner("clip_by_block_rms")
  defaults = {"threshold": threshold}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    thresholds = per_leaf("threshold", hp["threshold"], updates, owner)

    def leaf(u, c):
      if jnp.ndim(c):
        raise ValueError(f"{owner}: threshold must be a scalar per tensor, got shape {c.shape}.")
      denom = jnp.maximum(1.0, safe_sqrt(jnp.mean((u.conj() * u).real)) / c)
      return (u / denom).astype(u.dtype)

    return map_leaves(leaf, updates, thresholds), state

  return ReparamTransformation(init_fn, update_fn, defaults)
