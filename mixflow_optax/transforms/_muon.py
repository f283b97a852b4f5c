r"""Muon (optax.contrib), reparameterised: Newton-Schulz orthogonalised momentum.

Same arguments, state tree and arithmetic as :func:`optax.contrib.muon` and
:func:`optax.contrib.scale_by_muon`, with ``hyperparams={...}`` in ``update``.
The Frobenius pre-normalisation uses :func:`safe_sqrt`, so meta-gradients are
finite (and exact) when a momentum matrix is exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon as optax_muon

from mixflow_optax.transforms._alias import adamw
from mixflow_optax.transforms._base import (
  PerLeaf,
  ReparamTransformation,
  broadcast_prefix,
  chain,
  leaf_results,
  per_leaf,
  resolve_hyperparams,
)
from mixflow_optax.transforms._transforms import (
  _bias_correction,
  _owner,
  _unzip,
  add_decayed_weights,
  safe_sqrt,
  scale_by_learning_rate,
)

__all__ = ["scale_by_muon", "muon"]

MuonDimensionNumbers = optax_muon.MuonDimensionNumbers


def _is_dim_nums(x: Any) -> bool:
  return isinstance(x, MuonDimensionNumbers)


def _orthogonalize(x, ns_coeffs, ns_steps, preconditioning, eps, dim_nums):
  """optax's orthogonalize_via_newton_schulz, with a NaN-safe Frobenius norm."""
  if preconditioning != "frobenius":  # Stock numerics for the other rescalings.
    return optax_muon.orthogonalize_via_newton_schulz(
      x, ns_coeffs, ns_steps, preconditioning, eps, dim_nums
    )
  if x.ndim == 2:
    dim_nums = MuonDimensionNumbers(reduction_axis=0, output_axis=1)

  def one(x):
    transposed = x.shape[0] > x.shape[1]
    if transposed:
      x = x.T
    # jnp.linalg.norm has an infinite derivative at 0: use safe_sqrt.
    x = x / (safe_sqrt(jnp.sum((x * x.conj()).real)) + eps)
    coeffs = ns_coeffs.astype(x.dtype)
    step = optax_muon._base_newton_schulz_iteration
    if coeffs.ndim == 1:
      x = jax.lax.fori_loop(0, ns_steps, lambda i, x: step(x, coeffs), x, unroll=True)
    else:
      x, _ = jax.lax.scan(lambda x, c: (step(x, c), None), x, coeffs)
    return x.T if transposed else x

  reshape_fn, inverse_fn = optax_muon._compute_muon_reshape(x, dim_nums)
  return inverse_fn(jax.vmap(one)(reshape_fn(x)))


def scale_by_muon(
  ns_coeffs: Any = optax_muon._DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  beta: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = 1e-8,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
  weight_dimension_numbers: Any = None,
) -> ReparamTransformation:
  r"""Muon's rescaling (hyperparameters ``beta, eps``), as :func:`optax.contrib.scale_by_muon`.

  .. math::

    m_t = \beta m_{t-1} + (1-\beta) g_t, \qquad
    u_t = \mathrm{NS}_k\!\Big(\frac{\hat m_t}{\|\hat m_t\|_F + \epsilon}\Big)

  where :math:`\hat m_t` is the (Nesterov) bias-corrected momentum and
  :math:`\mathrm{NS}_k` is ``ns_steps`` quintic Newton-Schulz iterations
  :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, with the
  coefficients ``ns_coeffs`` (kept in the state, as optax). ``ns_steps`` is a
  loop length, not a hyperparameter. ``beta`` may be per parameter or per
  element; ``eps`` one scalar per matrix.

  Args:
    ns_coeffs: the coefficients :math:`(a, b, c)` of the Newton-Schulz iteration.
    ns_steps: the number of Newton-Schulz iterations :math:`k` (not a hyperparameter).
    beta: :math:`\beta`, the decay of the momentum. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the Frobenius norm. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    nesterov: whether to use Nesterov momentum.
    adaptive: whether to scale the updates by the dual norm of the original updates.
    preconditioning: the rescaling before Newton-Schulz: ``'frobenius'`` (default), ``'spectral'``,
      ``'aol'`` or ``'schatten'``, as in optax.
    weight_dimension_numbers: how to reshape each parameter into a matrix (optax's
      ``MuonDimensionNumbers``); ``None``: parameters are matrices.

  References:
    Jordan, `modded-nanogpt: Speedrunning the NanoGPT baseline
    <https://github.com/KellerJordan/modded-nanogpt>`_, 2024.

    Bernstein & Newhouse, `Old Optimizer, New Norm: An Anthology
    <https://arxiv.org/abs/2409.20325>`_, 2024.
  """
  owner = _owner("scale_by_muon")
  defaults = {"beta": beta, "eps": eps}
  stock = optax.contrib.scale_by_muon(
    ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov, preconditioning=preconditioning
  )
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    dims = weight_dimension_numbers
    dims = dims(updates) if callable(dims) else dims
    # One MuonDimensionNumbers (or None: a plain matrix) per leaf of updates.
    n = len(jax.tree.leaves(updates))
    dim_leaves = PerLeaf(
      [None] * n if dims is None else jax.tree.structure(updates).flatten_up_to(dims)
    )
    cols = [per_leaf(k, hp[k], updates, owner) for k in defaults]
    count_inc = optax.safe_increment(state.count)

    def leaf(g, m, dim_nums, beta, eps):
      if jnp.ndim(eps):
        raise ValueError(f"{owner}: eps must be a scalar per matrix, got shape {jnp.shape(eps)}.")
      new_m = (1 - beta) * g + beta * m
      if nesterov:
        m_hat = beta * _bias_correction(new_m, beta, optax.safe_increment(count_inc)) + (
          1 - beta
        ) * _bias_correction(g, beta, count_inc)
      else:
        m_hat = _bias_correction(new_m, beta, count_inc)
      u = _orthogonalize(m_hat, state.ns_coeffs, ns_steps, preconditioning, eps, dim_nums)
      if adaptive:
        u = jnp.sum(m_hat.conj() * u) * u
      return u, new_m.astype(m.dtype if mu_dtype is None else mu_dtype)

    outs = leaf_results(leaf, updates, state.mu, dim_leaves, *cols)
    u, mu = _unzip(updates, outs, 2)
    return u, optax.contrib.MuonState(count=count_inc, mu=mu, ns_coeffs=state.ns_coeffs)

  return ReparamTransformation(stock.init, update_fn, defaults)


def _mask_like(value: Any, updates: Any, name: str = "hyperparameter") -> Any:
  """A per-parameter value restricted to the unmasked leaves of (masked) ``updates``."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(value)):
    return value
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  u_leaves, u_def = jax.tree.flatten(updates, is_leaf=is_masked)
  if jax.tree.structure(value) == u_def:
    v_leaves = jax.tree.leaves(value)
  else:  # a prefix of the parameters' tree (one value per module), or an error naming the path
    v_leaves = broadcast_prefix(name, value, updates, "muon", is_leaf=is_masked)
  return u_def.unflatten(
    [optax.MaskedNode() if is_masked(u) else v for u, v in zip(u_leaves, v_leaves)]
  )


def _routed(t: ReparamTransformation, names: Mapping[str, str]) -> optax.GradientTransformation:
  """``t`` inside optax.partition, taking its hyperparameters from the outer dict."""

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    sub = {inner: _mask_like(hyperparams[outer], updates, outer) for inner, outer in names.items()}
    return t.update(updates, state, params, hyperparams=sub, **extra_args)

  return optax.GradientTransformationExtraArgs(t.init, update_fn)


def muon(
  learning_rate: optax.ScalarOrSchedule,
  ns_coeffs: Any = optax_muon._DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  beta: jax.typing.ArrayLike = 0.95,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
  adam_b1: jax.typing.ArrayLike = 0.9,
  adam_b2: jax.typing.ArrayLike = 0.999,
  adam_eps_root: jax.typing.ArrayLike = 0.0,
  adam_weight_decay: jax.typing.ArrayLike = 0.0,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  muon_weight_dimension_numbers: Any = None,
  consistent_rms: jax.typing.ArrayLike | None = None,
) -> ReparamTransformation:
  r"""Muon for matrices, AdamW for the other parameters, as :func:`optax.contrib.muon`.

  .. math::

    u_t = -\alpha\,\big(s\,\mathrm{NS}_k(\hat m_t / (\|\hat m_t\|_F + \epsilon))
          + \lambda\,\theta_t\big)

  for 2-D parameters (or those given by ``muon_weight_dimension_numbers``),
  with the width scale :math:`s` of ``optax.contrib.scale_by_shape``;
  :func:`adamw` for the rest. The state tree is optax's (an
  ``optax.transforms.PartitionState``).

  Hyperparameters: ``learning_rate, beta, eps, weight_decay, adam_b1,
  adam_b2, adam_eps_root, adam_weight_decay`` and ``adam_learning_rate`` if
  given (otherwise ``learning_rate`` drives both parts, as in optax; ``eps``
  is shared too).

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    ns_coeffs: the coefficients :math:`(a, b, c)` of the Newton-Schulz iteration (a tuple, or a
      tuple of tuples, one per iteration, as in optax; kept in the state).
    ns_steps: the number of Newton-Schulz iterations :math:`k` (a loop length, not a
      hyperparameter).
    beta: :math:`\beta`, the decay of the momentum of the matrices. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the norm before Newton-Schulz (and Adam's :math:`\epsilon` for
      the other parameters). Differentiable hyperparameter.
    weight_decay: :math:`\lambda`, the decoupled weight decay of the matrices (multiplied by the
      learning rate). Differentiable hyperparameter.
    weight_decay_mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``:
      only ``True`` leaves are decayed. ``None``: all.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    nesterov: whether to use Nesterov momentum.
    adaptive: whether to scale the updates by the dual norm of the original updates (Bernstein &
      Newhouse).
    preconditioning: the rescaling before Newton-Schulz, as in optax: ``'frobenius'`` (default),
      ``'spectral'``, ``'aol'`` or ``'schatten'``.
    adam_b1: :math:`\beta_1` of the Adam of the other parameters. Differentiable hyperparameter.
    adam_b2: :math:`\beta_2` of the Adam of the other parameters. Differentiable hyperparameter.
    adam_eps_root: :math:`\epsilon_{root}` of the Adam of the other parameters. Differentiable
      hyperparameter.
    adam_weight_decay: the weight decay of the other parameters. Differentiable hyperparameter.
    adam_learning_rate: the learning rate of the other parameters, or ``None`` for
      ``learning_rate``. Differentiable hyperparameter if given.
    muon_weight_dimension_numbers: which parameters are matrices and how to reshape them (optax's
      ``MuonDimensionNumbers`` tree, or a callable of the params); ``None``: every 2-D parameter.
    consistent_rms: if given, scale the updates to this RMS times :math:`\sqrt{\max(\text{fan\_in},
      \text{fan\_out})}` (0.2 matches AdamW) instead of the width scale; a constant, not a
      hyperparameter.

  Examples:
    >>> import mixflow_optax as mfo
    >>> sorted(mfo.transforms.muon(0.02).hyperparams)  # doctest: +NORMALIZE_WHITESPACE
    ['adam_b1', 'adam_b2', 'adam_eps_root', 'adam_weight_decay', 'beta', 'eps',
     'learning_rate', 'weight_decay']

  References:
    Jordan, `modded-nanogpt: Speedrunning the NanoGPT baseline
    <https://github.com/KellerJordan/modded-nanogpt>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training
    <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  owner = _owner("muon")
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in optax_muon._NS_COEFFS_PRESET_DICT:
      raise ValueError(f"{owner}: unknown ns_coeffs preset {ns_coeffs!r}.")
    ns_coeffs = optax_muon._NS_COEFFS_PRESET_DICT[ns_coeffs]
  param_labels, dim_nums_fn = _labels_and_dims(muon_weight_dimension_numbers)
  defaults = {
    "learning_rate": learning_rate,
    "beta": beta,
    "eps": eps,
    "weight_decay": weight_decay,
    "adam_b1": adam_b1,
    "adam_b2": adam_b2,
    "adam_eps_root": adam_eps_root,
    "adam_weight_decay": adam_weight_decay,
  }
  adam_lr_name = "learning_rate"
  if adam_learning_rate is not None:
    defaults["adam_learning_rate"] = adam_learning_rate
    adam_lr_name = "adam_learning_rate"
  muon_part = chain(
    scale_by_muon(
      ns_coeffs,
      ns_steps,
      beta,
      eps,
      mu_dtype,
      nesterov=nesterov,
      adaptive=adaptive,
      preconditioning=preconditioning,
      weight_dimension_numbers=dim_nums_fn,
    ),
    optax_muon.scale_by_shape(dim_nums_fn, consistent_rms),
    add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate),
  )
  adam_part = adamw(
    defaults[adam_lr_name],
    b1=adam_b1,
    b2=adam_b2,
    eps=eps,
    eps_root=adam_eps_root,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
  )
  tx = optax.partition(
    {
      "muon": _routed(
        muon_part,
        {
          "beta": "beta",
          "eps": "eps",
          "weight_decay": "weight_decay",
          "learning_rate": "learning_rate",
        },
      ),
      "adam": _routed(
        adam_part,
        {
          "learning_rate": adam_lr_name,
          "b1": "adam_b1",
          "b2": "adam_b2",
          "eps": "eps",
          "eps_root": "adam_eps_root",
          "weight_decay": "adam_weight_decay",
        },
      ),
    },
    param_labels=param_labels,
  )

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    return tx.update(updates, state, params, hyperparams=hp, **extra_args)

  return ReparamTransformation(tx.init, update_fn, defaults)


def _labels_and_dims(dim_nums):
  """optax.contrib.muon's parameter labels and per-leaf dimension numbers."""
  if dim_nums is None:
    labels = lambda params: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", params)
    dim_nums = MuonDimensionNumbers()
  else:

    def labels(params):
      dn = dim_nums(params) if callable(dim_nums) else dim_nums
      populate = lambda d, x: jax.tree.map(lambda _: "muon" if d is not None else "adam", x)
      return jax.tree.map(populate, dn, params, is_leaf=lambda x: x is None or _is_dim_nums(x))

  def dims_fn(params):
    dn = dim_nums(params) if callable(dim_nums) else dim_nums
    mask = jax.tree.map(lambda label: label == "muon", labels(params))
    is_leaf = lambda x: x is None or _is_dim_nums(x) or isinstance(x, optax.MaskedNode)
    populate = lambda d, sub: jax.tree.map(lambda m: d if m else optax.MaskedNode(), sub)
    return jax.tree.map(populate, dn, mask, is_leaf=is_leaf)

  return labels, dims_fn
