r"""More reparameterised optax rescalings: Lion, AdaBelief, AMSGrad, Adagrad, trust ratio, EMA.

Each factory mirrors the optax transform of the same name (same arguments,
same state class, same arithmetic, so trajectories and states match stock
optax), and takes ``hyperparams={...}`` in ``update``. Square roots of second
moments use :func:`~mixflow_optax.transforms.safe_sqrt`, so meta-gradients
are exact and finite where gradient entries are exactly zero.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from mixflow_optax.transforms._base import (
  ReparamTransformation,
  leaf_results,
  map_leaves,
  per_leaf,
  resolve_hyperparams,
)
from mixflow_optax.transforms._transforms import (
  _bias_correction,
  _denominator_root,
  _owner,
  _unzip,
  safe_sqrt,
)

__all__ = [
  "scale_by_lion",
  "scale_by_belief",
  "scale_by_amsgrad",
  "scale_by_rss",
  "scale_by_trust_ratio",
  "ema",
]


def _cols(names, hp, updates, owner):
  return [per_leaf(k, hp[k], updates, owner) for k in names]


def scale_by_lion(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.99,
  mu_dtype: Any | None = None,
  *,
  mode: Literal["hard", "smooth", "refined"] = "hard",
  smooth_beta: jax.typing.ArrayLike = 1.0,
) -> ReparamTransformation:
  r"""Lion's rescaling (hyperparameters ``b1, b2``), as :func:`optax.scale_by_lion`.

  .. math::

    c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    u_t = \mathrm{sign}(c_t), \quad
    m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t.

  ``mode="smooth"`` uses :math:`\tanh(\beta_s c_t)` (``smooth_beta`` is then
  a hyperparameter too) and ``mode="refined"`` keeps :math:`|c_t| < 1` linear.

  The exact derivative of :math:`\mathrm{sign}` is 0 wherever it is
  differentiable, so with ``mode="hard"`` meta-gradients reach the inner
  trajectory only through the learning rate and weight decay; ``b1`` and
  ``b2`` get exactly zero meta-gradient (use ``mode="smooth"`` for a
  surrogate with informative derivatives).

  Args:
    b1: interpolation between the momentum and the current gradient.
    b2: decay of the momentum.
    mu_dtype: optional dtype of the momentum.
    mode: ``"hard"`` (sign), ``"smooth"`` (tanh) or ``"refined"``.
    smooth_beta: the tanh slope for ``mode="smooth"``.

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  owner = _owner("scale_by_lion")
  if mode not in ("hard", "smooth", "refined"):
    raise ValueError(f"{owner}: mode must be 'hard', 'smooth' or 'refined', got {mode!r}.")
  defaults = {"b1": b1, "b2": b2}
  if mode == "smooth":
    defaults["smooth_beta"] = smooth_beta
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    return optax.ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = _cols(defaults, hp, updates, owner)

    def leaf(g, m, b1, b2, beta=None):
      c = (1.0 - b1) * g + b1 * m
      if mode == "hard":
        u = jnp.sign(c)
      elif mode == "smooth":
        u = jnp.tanh(beta * c)
      else:
        u = jnp.where(jnp.abs(c) < 1.0, c, jnp.sign(c))
      new_m = (1 - b2) * g + b2 * m
      return u.astype(g.dtype), new_m.astype(m.dtype if mu_dtype is None else mu_dtype)

    u, mu = _unzip(updates, leaf_results(leaf, updates, state.mu, *cols), 2)
    count_inc = optax.safe_increment(state.count)
    return u, optax.ScaleByLionState(count=count_inc, mu=mu)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_belief(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-16,
  eps_root: jax.typing.ArrayLike = 1e-16,
  *,
  nesterov: bool = False,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""AdaBelief's rescaling (hyperparameters ``b1, b2, eps, eps_root``), as :func:`optax.scale_by_belief`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    s_t = \beta_2 s_{t-1} + (1-\beta_2) (g_t - m_t)^2 + \bar\epsilon, \quad
    u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{s_t / (1-\beta_2^t)} + \epsilon}.

  Args:
    b1: decay of the first moment.
    b2: decay of the second central moment ("belief").
    eps: added to the denominator outside the square root.
    eps_root: added to :math:`s_t` at every step (kept in the state, as optax).
    nesterov: whether to use Nesterov momentum.
    stop_gradient_denominator: treat :math:`\sqrt{\hat s_t}` as a constant in
      derivatives (an approximation; see :func:`scale_by_adam`).

  References:
    Zhuang et al., `AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients <https://arxiv.org/abs/2010.07468>`_, 2020.
  """
  owner = _owner("scale_by_belief")
  defaults = {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}

  def init_fn(params):
    mu = optax.tree.zeros_like(params)
    nu = optax.tree.zeros_like(params)
    return optax.ScaleByBeliefState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = _cols(defaults, hp, updates, owner)
    count_inc = optax.safe_increment(state.count)

    def leaf(g, m, v, b1, b2, eps, eps_root):
      m_dtype, v_dtype = m.dtype, v.dtype
      m = (1 - b1) * g + b1 * m
      v = (1 - b2) * (g - m) ** 2 + b2 * v
      v = v + eps_root
      if nesterov:
        m_hat = b1 * _bias_correction(m, b1, optax.safe_increment(count_inc)) + (
          1 - b1
        ) * _bias_correction(g, b1, count_inc)
      else:
        m_hat = _bias_correction(m, b1, count_inc)
      v_hat = _bias_correction(v, b2, count_inc)
      u = m_hat / (_denominator_root(v_hat, stop_gradient_denominator) + eps)
      return u.astype(g.dtype), m.astype(m_dtype), v.astype(v_dtype)

    outs = leaf_results(leaf, updates, state.mu, state.nu, *cols)
    u, mu, nu = _unzip(updates, outs, 3)
    return u, optax.ScaleByBeliefState(count=count_inc, mu=mu, nu=nu)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_amsgrad(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  bias_correction_mu: bool = True,
  bias_correction_nu: bool = True,
  *,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""AMSGrad's rescaling (hyperparameters ``b1, b2, eps, eps_root``), as :func:`optax.scale_by_amsgrad`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    \bar v_t = \max(\bar v_{t-1}, \hat v_t), \quad
    u_t = \frac{\hat m_t}{\sqrt{\bar v_t + \epsilon_{root}} + \epsilon}

  with :math:`\hat m_t, \hat v_t` bias-corrected (each optional). The
  derivative of :math:`\max` follows :func:`jax.numpy.maximum` (at an exact
  tie, as at an untouched zero entry, the cotangent is split evenly).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    mu_dtype: optional dtype of the first moment.
    bias_correction_mu: whether to debias the first moment.
    bias_correction_nu: whether to debias the second moment before the max.
    stop_gradient_denominator: treat :math:`\sqrt{\bar v_t + \epsilon_{root}}`
      as a constant in derivatives (an approximation; see :func:`scale_by_adam`).

  References:
    Reddi et al., `On the Convergence of Adam and Beyond
    <https://arxiv.org/abs/1904.09237>`_, 2018.
  """
  owner = _owner("scale_by_amsgrad")
  defaults = {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    nu_max = optax.tree.zeros_like(params)
    return optax.ScaleByAmsgradState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, nu_max=nu_max)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = _cols(defaults, hp, updates, owner)
    count_inc = optax.safe_increment(state.count)

    def leaf(g, m, v, v_max, b1, b2, eps, eps_root):
      m_dtype, v_dtype = m.dtype, v.dtype
      m = (1 - b1) * g + b1 * m
      v = (1 - b2) * g**2 + b2 * v
      m_hat = _bias_correction(m, b1, count_inc) if bias_correction_mu else m
      v_eff = _bias_correction(v, b2, count_inc) if bias_correction_nu else v
      v_max = jnp.maximum(v_max, v_eff)
      u = m_hat / (_denominator_root(v_max + eps_root, stop_gradient_denominator) + eps)
      return u.astype(g.dtype), m.astype(m_dtype), v.astype(v_dtype), v_max.astype(v_dtype)

    outs = leaf_results(leaf, updates, state.mu, state.nu, state.nu_max, *cols)
    u, mu, nu, nu_max = _unzip(updates, outs, 4)
    return u, optax.ScaleByAmsgradState(count=count_inc, mu=mu, nu=nu, nu_max=nu_max)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_rss(
  initial_accumulator_value: jax.typing.ArrayLike = 0.1,
  eps: jax.typing.ArrayLike = 1e-7,
) -> ReparamTransformation:
  r"""Adagrad's rescaling (hyperparameter ``eps``), as :func:`optax.scale_by_rss`.

  .. math::

    G_t = G_{t-1} + g_t^2, \qquad
    u_t = \begin{cases} g_t / \sqrt{G_t + \epsilon} & G_t > 0 \\ 0 & G_t = 0 \end{cases}

  Args:
    initial_accumulator_value: :math:`G_0` (used by ``init`` only, so it is
      not a hyperparameter).
    eps: added inside the square root.

  References:
    Duchi et al., `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
  """
  owner = _owner("scale_by_rss")
  defaults = {"eps": eps}

  def init_fn(params):
    return optax.ScaleByRssState(
      sum_of_squares=optax.tree.full_like(params, initial_accumulator_value)
    )

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    (epss,) = _cols(defaults, hp, updates, owner)

    def leaf(g, acc, eps):
      acc = g**2 + acc
      pos = acc > 0
      # Double `where`: the untaken branch (rsqrt(eps) with eps = 0) must not
      # produce inf, or its derivative leaks NaN.
      inv = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, acc + eps, 1.0)), 0.0)
      return (inv * g).astype(g.dtype), acc

    u, acc = _unzip(updates, leaf_results(leaf, updates, state.sum_of_squares, epss), 2)
    return u, optax.ScaleByRssState(sum_of_squares=acc)

  return ReparamTransformation(init_fn, update_fn, defaults)


def _safe_norm(x: jax.Array, min_norm: Any) -> jax.Array:
  # optax.safe_norm (the norm clipped below at min_norm), with a derivative
  # that is finite at x = 0.
  norm = safe_sqrt(jnp.sum(x * x))
  return jnp.where(norm <= min_norm, min_norm, norm)


def scale_by_trust_ratio(
  min_norm: jax.typing.ArrayLike = 0.0,
  trust_coefficient: jax.typing.ArrayLike = 1.0,
  eps: jax.typing.ArrayLike = 0.0,
) -> ReparamTransformation:
  r"""Layer-wise trust ratio (hyperparameters ``min_norm, trust_coefficient, eps``), as :func:`optax.scale_by_trust_ratio`.

  .. math::

    u_t = \begin{cases} c\,\dfrac{\|\theta\|}{\|g_t\| + \epsilon}\, g_t
            & \|\theta\| > 0,\ \|g_t\| > 0 \\ g_t & \text{otherwise} \end{cases}

  per leaf, with norms clipped below at ``min_norm``. Unlike plain autodiff
  of :func:`optax.scale_by_trust_ratio`, derivatives are finite (and exact)
  when a leaf's update or parameters are exactly zero.

  Args:
    min_norm: lower bound of both norms.
    trust_coefficient: the multiplier :math:`c`.
    eps: added to the update norm.

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  owner = _owner("scale_by_trust_ratio")
  defaults = {"min_norm": min_norm, "trust_coefficient": trust_coefficient, "eps": eps}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{owner} needs the parameters: call update(grads, state, params).")
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = _cols(defaults, hp, updates, owner)
    for name, col in zip(defaults, cols):
      if any(jnp.ndim(v) != 0 for v in col):
        raise ValueError(
          f"{owner}: {name} must be a scalar, or a pytree of one scalar per "
          "parameter tensor (the trust ratio is per tensor), not per element."
        )

    def leaf(u, p, min_norm, coef, eps):
      p_norm, u_norm = _safe_norm(p, min_norm), _safe_norm(u, min_norm)
      zero = jnp.logical_or(p_norm == 0.0, u_norm == 0.0)
      # Double `where`: the untaken ratio p/0 must not produce inf.
      ratio = coef * p_norm / jnp.where(zero, 1.0, u_norm + eps)
      ratio = jnp.where(zero, jnp.array(1.0, dtype=p.dtype), ratio)
      return (u * ratio).astype(u.dtype)

    return map_leaves(leaf, updates, params, *cols), state

  return ReparamTransformation(init_fn, update_fn, defaults)


def ema(
  decay: jax.typing.ArrayLike,
  debias: bool = True,
  accumulator_dtype: Any | None = None,
) -> ReparamTransformation:
  r"""Exponential moving average of updates (hyperparameter ``decay``), as :func:`optax.ema`.

  .. math::

    m_t = \mu\, m_{t-1} + (1-\mu)\, g_t, \qquad
    u_t = m_t \;\text{ or }\; m_t / (1-\mu^t)\ (\texttt{debias}).

  Args:
    decay: the decay :math:`\mu`.
    debias: whether to debias the average.
    accumulator_dtype: optional dtype of the average.
  """
  owner = _owner("ema")
  defaults = {"decay": decay}
  acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    return optax.EmaState(
      count=jnp.zeros([], jnp.int32), ema=optax.tree.zeros_like(params, dtype=acc_dtype)
    )

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    (decays,) = _cols(defaults, hp, updates, owner)
    count_inc = optax.safe_increment(state.count)

    def leaf(g, m, mu):
      new_m = (1 - mu) * g + mu * m
      u = _bias_correction(new_m, mu, count_inc) if debias else new_m
      return u.astype(jnp.promote_types(g.dtype, m.dtype)), new_m.astype(
        m.dtype if acc_dtype is None else acc_dtype
      )

    u, new_ema = _unzip(updates, leaf_results(leaf, updates, state.ema, decays), 2)
    return u, optax.EmaState(count=count_inc, ema=new_ema)

  return ReparamTransformation(init_fn, update_fn, defaults)
