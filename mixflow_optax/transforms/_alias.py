r"""The user-facing reparameterised optimizers, built by chaining (optax's alias.py style).

Each alias has the arguments of the optax alias of the same name, follows
its trajectory exactly with the default hyperparameters, and has the same
state structure, so it is a drop-in replacement. Its ``hyperparams`` are the
alias's differentiable arguments under their optax names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mixflow_optax.transforms._adaptive import (
  ema,
  scale_by_amsgrad,
  scale_by_belief,
  scale_by_lion,
  scale_by_rss,
  scale_by_trust_ratio,
)
from mixflow_optax.transforms._base import ReparamTransformation, chain, rename_hyperparams
from mixflow_optax.transforms._factorized import clip_by_block_rms, scale_by_factored_rms
from mixflow_optax.transforms._transforms import (
  add_decayed_weights,
  scale_by_adam,
  scale_by_learning_rate,
  scale_by_rms,
  scale_by_stddev,
  trace,
)

__all__ = [
  "sgd",
  "adam",
  "adamw",
  "rmsprop",
  "lion",
  "nadam",
  "nadamw",
  "adabelief",
  "amsgrad",
  "adagrad",
  "adafactor",
  "lamb",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None


def _momentum(momentum, nesterov, accumulator_dtype=None):
  if momentum is None:
    return optax.identity()
  return rename_hyperparams(
    trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype),
    {"decay": "momentum"},
  )


def sgd(
  learning_rate: optax.ScalarOrSchedule,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  accumulator_dtype: Any | None = None,
) -> ReparamTransformation:
  r"""SGD with optional (Nesterov) momentum, as :func:`optax.sgd`.

  .. math::

    m_t = g_t + \mu\, m_{t-1}, \qquad
    u_t = -\alpha \begin{cases} m_t \\ g_t + \mu\, m_t & \text{(Nesterov)} \end{cases}

  Hyperparameters: ``learning_rate`` and, if ``momentum`` is not ``None``,
  ``momentum``. Each is a scalar or a pytree matching params.

  Args:
    learning_rate: :math:`\alpha`, a scalar, per-parameter pytree or schedule. Differentiable
      hyperparameter.
    momentum: :math:`\mu`, or ``None`` for plain SGD. Differentiable hyperparameter if given.
    nesterov: whether to use Nesterov momentum.
    accumulator_dtype: optional dtype of the momentum buffer.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> opt = mfo.transforms.sgd(0.1, momentum=0.9)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = opt.init(params)
    >>> u, state = opt.update(params, state, params,
    ...                       hyperparams={"learning_rate": 0.5})
    >>> u
    Array([-0.5, -1. ], dtype=float32)
  """
  return chain(
    _momentum(momentum, nesterov, accumulator_dtype),
    scale_by_learning_rate(learning_rate),
  )


def adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""Adam, as :func:`optax.adam`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = -\alpha\,\frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root``. With the default
  ``eps_root=0`` meta-gradients are exact and finite even where gradient
  entries are exactly zero (see :func:`safe_sqrt`).
  ``stop_gradient_denominator=True`` treats the denominator
  :math:`\sqrt{\hat v_t + \epsilon_{root}}` as a constant in derivatives: the
  same trajectory, an approximate (not exact) meta-gradient that some
  meta-learning setups prefer for stability (DiscoRL's meta-learned Adam).

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    nesterov: whether to use Nesterov momentum (as :func:`nadam`).
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> opt = mfo.transforms.adam(1e-3)
    >>> sorted(opt.hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate']

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  return chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      stop_gradient_denominator=stop_gradient_denominator,
    ),
    scale_by_learning_rate(learning_rate),
  )


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 1e-4,
  mask: Any | None = None,
  *,
  nesterov: bool = False,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""AdamW (decoupled weight decay), as :func:`optax.adamw`.

  .. math:: u_t = -\alpha\,\big(\mathrm{adam}_t(g) + \lambda\,\theta_t\big)

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root, weight_decay``.
  ``stop_gradient_denominator``: as in :func:`adam`.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    weight_decay: :math:`\lambda`, the decoupled weight decay (multiplied by the learning rate, as
      in optax). Differentiable hyperparameter.
    mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``: only ``True``
      leaves are decayed. ``None``: all.
    nesterov: whether to use Nesterov momentum (as :func:`nadam`).
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      stop_gradient_denominator=stop_gradient_denominator,
    ),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
  )


def rmsprop(
  learning_rate: optax.ScalarOrSchedule,
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  centered: bool = False,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  bias_correction: bool = False,
) -> ReparamTransformation:
  r"""RMSProp (optionally centred, with momentum), as :func:`optax.rmsprop`.

  .. math::

    v_t = \rho\, v_{t-1} + (1-\rho) g_t^2, \qquad
    u_t = -\alpha\, \frac{g_t}{\sqrt{v_t + \epsilon}}

  followed by momentum :math:`\mu` if given. Hyperparameters:
  ``learning_rate, decay, eps`` and ``momentum`` if not ``None``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    decay: :math:`\rho`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, the stabilising constant (inside the square root by default).
      Differentiable hyperparameter.
    initial_scale: initial value of :math:`v` (used by ``init`` only, so not a hyperparameter of
      ``update``).
    eps_in_sqrt: whether ``eps`` goes inside the square root (optax's default) or outside.
    centered: whether to subtract the squared mean of the gradients (centred RMSProp,
      :func:`scale_by_stddev`).
    momentum: :math:`\mu`, the decay of a momentum applied after the rescaling, or ``None`` for
      none. Differentiable hyperparameter.
    nesterov: whether that momentum is Nesterov's.
    bias_correction: whether to debias :math:`v` as in Adam.

  References:
    Hinton, `Overview of mini-batch gradient descent
    <www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.
  """
  scaler = scale_by_stddev if centered else scale_by_rms
  return chain(
    scaler(
      decay=decay,
      eps=eps,
      initial_scale=initial_scale,
      eps_in_sqrt=eps_in_sqrt,
      bias_correction=bias_correction,
    ),
    scale_by_learning_rate(learning_rate),
    _momentum(momentum, nesterov),
  )


def lion(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.99,
  mu_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 1e-3,
  mask: MaskOrFn = None,
) -> ReparamTransformation:
  r"""Lion, as :func:`optax.lion`.

  .. math::

    u_t = -\alpha\,\big(\mathrm{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t) + \lambda\,\theta_t\big),
    \qquad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

  Hyperparameters: ``learning_rate, b1, b2, weight_decay``, each a scalar or
  a pytree matching params. The sign has derivative 0, so the exact
  meta-gradient reaches the trajectory through ``learning_rate`` and
  ``weight_decay`` (and the initial parameters), not through ``b1, b2``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the interpolation between momentum and gradient inside the sign.
      Differentiable hyperparameter, but the sign has derivative 0 (see above).
    b2: :math:`\beta_2`, the decay of the momentum :math:`m_t`. Differentiable hyperparameter,
      reaching the update only through the sign (derivative 0).
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    weight_decay: :math:`\lambda`, the decoupled weight decay, added after the sign (multiplied by
      the learning rate, as in optax). Differentiable hyperparameter.
    mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``: only ``True``
      leaves are decayed. ``None``: all.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> opt = mfo.transforms.lion(1e-2, weight_decay=0.0)
    >>> sorted(opt.hyperparams)
    ['b1', 'b2', 'learning_rate', 'weight_decay']
    >>> params = jnp.array([1.0, -2.0])
    >>> u, _ = opt.update(params, opt.init(params), params,
    ...                   hyperparams={"learning_rate": 0.5})
    >>> u
    Array([-0.5,  0.5], dtype=float32)

  References:
    Chen et al., `Symbolic Discovery of Optimization Algorithms
    <https://arxiv.org/abs/2302.06675>`_, 2023.
  """
  return chain(
    scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype),
    add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate),
  )


def nadam(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""NAdam (Adam with Nesterov momentum), as :func:`optax.nadam`.

  .. math::

    \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}, \qquad
    u_t = -\alpha\,\frac{\hat m_t}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  with :math:`m_t, v_t` as in :func:`adam`. Hyperparameters:
  ``learning_rate, b1, b2, eps, eps_root``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  Examples:
    >>> import mixflow_optax as mfo
    >>> opt = mfo.transforms.nadam(1e-3, stop_gradient_denominator=True)
    >>> sorted(opt.hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate']

  References:
    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
  """
  return adam(
    learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    eps_root=eps_root,
    mu_dtype=mu_dtype,
    nesterov=True,
    stop_gradient_denominator=stop_gradient_denominator,
  )


def nadamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: jax.typing.ArrayLike = 1e-4,
  mask: MaskOrFn = None,
  *,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""NAdamW (NAdam with decoupled weight decay), as :func:`optax.nadamw`.

  .. math:: u_t = -\alpha\,\big(\mathrm{nadam}_t(g) + \lambda\,\theta_t\big)

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root, weight_decay``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    weight_decay: :math:`\lambda`, the decoupled weight decay (multiplied by the learning rate, as
      in optax). Differentiable hyperparameter.
    mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``: only ``True``
      leaves are decayed. ``None``: all.
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  References:
    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.

    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return adamw(
    learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    eps_root=eps_root,
    mu_dtype=mu_dtype,
    weight_decay=weight_decay,
    mask=mask,
    nesterov=True,
    stop_gradient_denominator=stop_gradient_denominator,
  )


def adabelief(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-16,
  eps_root: jax.typing.ArrayLike = 1e-16,
  *,
  nesterov: bool = False,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""AdaBelief, as :func:`optax.adabelief`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \bar\epsilon, \quad
    u_t = -\alpha\,\frac{m_t/(1-\beta_1^t)}{\sqrt{s_t/(1-\beta_2^t)} + \epsilon}

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the belief :math:`s_t` (the variance of the gradient around
      its mean). Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\bar\epsilon`, added to :math:`s_t` at every step (AdaBelief's own term, not
      only a safeguard). Differentiable hyperparameter.
    nesterov: whether to use Nesterov momentum.
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> opt = mfo.transforms.adabelief(0.1)
    >>> params = {"w": jnp.ones(2), "b": jnp.zeros(())}
    >>> rates = {"w": 0.1, "b": 0.01}  # Per-parameter learning rates.
    >>> u, _ = opt.update(params, opt.init(params), params,
    ...                   hyperparams={"learning_rate": rates})
    >>> u["w"]
    Array([-0.11111038, -0.11111038], dtype=float32)

  References:
    Zhuang et al., `AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients <https://arxiv.org/abs/2010.07468>`_, 2020.
  """
  return chain(
    scale_by_belief(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      nesterov=nesterov,
      stop_gradient_denominator=stop_gradient_denominator,
    ),
    scale_by_learning_rate(learning_rate),
  )


def amsgrad(
  learning_rate: optax.ScalarOrSchedule,
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
  r"""AMSGrad, as :func:`optax.amsgrad`.

  .. math::

    \bar v_t = \max(\bar v_{t-1}, \hat v_t), \qquad
    u_t = -\alpha\,\frac{\hat m_t}{\sqrt{\bar v_t + \epsilon_{root}} + \epsilon}

  with :math:`\hat m_t, \hat v_t` Adam's (bias-corrected) moments.
  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root``.

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    mu_dtype: optional dtype of the first moment (``None``: that of the params).
    bias_correction_mu: whether to debias the first moment.
    bias_correction_nu: whether to debias the second moment before the maximum.
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  Examples:
    >>> import mixflow_optax as mfo
    >>> sorted(mfo.transforms.amsgrad(1e-3).hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate']

  References:
    Reddi et al., `On the Convergence of Adam and Beyond
    <https://arxiv.org/abs/1904.09237>`_, 2018.
  """
  return chain(
    scale_by_amsgrad(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      mu_dtype=mu_dtype,
      bias_correction_mu=bias_correction_mu,
      bias_correction_nu=bias_correction_nu,
      stop_gradient_denominator=stop_gradient_denominator,
    ),
    scale_by_learning_rate(learning_rate),
  )


def adagrad(
  learning_rate: optax.ScalarOrSchedule,
  initial_accumulator_value: jax.typing.ArrayLike = 0.1,
  eps: jax.typing.ArrayLike = 1e-7,
) -> ReparamTransformation:
  r"""Adagrad, as :func:`optax.adagrad`.

  .. math::

    G_t = G_{t-1} + g_t^2, \qquad u_t = -\alpha\, \frac{g_t}{\sqrt{G_t + \epsilon}}

  Hyperparameters: ``learning_rate, eps`` (``initial_accumulator_value``
  only sets :math:`G_0` in ``init``).

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    initial_accumulator_value: :math:`G_0`, the initial sum of squared gradients (used by ``init``
      only, so not a hyperparameter of ``update``).
    eps: :math:`\epsilon`, added inside the square root. Differentiable hyperparameter.

  Examples:
    >>> import mixflow_optax as mfo
    >>> sorted(mfo.transforms.adagrad(0.1).hyperparams)
    ['eps', 'learning_rate']

  References:
    Duchi et al., `Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization <https://jmlr.org/papers/v12/duchi11a.html>`_, 2011.
  """
  return chain(
    scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps),
    scale_by_learning_rate(learning_rate),
  )


def adafactor(
  learning_rate: optax.ScalarOrSchedule | None = None,
  min_dim_size_to_factor: int = 128,
  decay_rate: jax.typing.ArrayLike = 0.8,
  decay_offset: int = 0,
  multiply_by_parameter_scale: bool = True,
  clipping_threshold: jax.typing.ArrayLike | None = 1.0,
  momentum: jax.typing.ArrayLike | None = None,
  dtype_momentum: Any = jnp.float32,
  weight_decay_rate: jax.typing.ArrayLike | None = None,
  eps: jax.typing.ArrayLike = 1e-30,
  factored: bool = True,
  weight_decay_mask: MaskOrFn = None,
) -> ReparamTransformation:
  r"""Adafactor (factored second moments), as :func:`optax.adafactor`.

  .. math::

    u_t = -\,\mathrm{clip}_{c}\!\big(\mathrm{factored\_rms}_t(g)\big)\,
          \alpha\;\max(\mathrm{rms}(\theta_t), 10^{-3})

  followed by optional momentum and weight decay (see
  :func:`scale_by_factored_rms` for the factored second moments).
  Hyperparameters: ``decay_rate, eps`` and, where given (not ``None``),
  ``clipping_threshold, learning_rate, momentum, weight_decay_rate``. The
  integers ``min_dim_size_to_factor`` and ``decay_offset`` decide shapes and
  the step schedule and are not hyperparameters.

  Args:
    learning_rate: :math:`\alpha`, a scalar, pytree or schedule, or ``None`` for no learning rate
      (the update is then the rescaled gradient). Differentiable hyperparameter if given. Its
      natural scale differs from Adam's (about 1e-2).
    min_dim_size_to_factor: factor the second moments of a matrix only if its two largest axes are
      at least this large (an integer, not a hyperparameter).
    decay_rate: :math:`d`, the exponent of the second-moment decay schedule :math:`1 - (t+1)^{-d}`.
      Differentiable hyperparameter.
    decay_offset: subtracted from the step count in that schedule, e.g. the first step of a
      fine-tuning phase (an integer, not a hyperparameter).
    multiply_by_parameter_scale: whether to scale the learning rate by the RMS of the parameters (at
      least 1e-3); if ``False`` the learning rate is an absolute step size.
    clipping_threshold: the update-clipping threshold :math:`c` of :func:`clip_by_block_rms`, or
      ``None`` for no clipping. Differentiable hyperparameter if given.
    momentum: the decay of a momentum of the updates, or ``None`` for none (it costs a buffer the
      size of the params). Differentiable hyperparameter if given.
    dtype_momentum: dtype of the momentum buffer.
    weight_decay_rate: the decoupled weight decay, or ``None`` for none. Differentiable
      hyperparameter if given.
    eps: added to the squared gradients (regularises the second moments). Differentiable
      hyperparameter.
    factored: whether to factor the second moments of matrices (else full second moments).
    weight_decay_mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``:
      only ``True`` leaves are decayed. ``None``: all.

  Examples:
    >>> import mixflow_optax as mfo
    >>> sorted(mfo.transforms.adafactor(1e-2).hyperparams)
    ['clipping_threshold', 'decay_rate', 'eps', 'learning_rate']

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  tx = [
    rename_hyperparams(
      scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps),
      {"epsilon": "eps"},
    )
  ]
  if clipping_threshold is not None:
    tx.append(
      rename_hyperparams(clip_by_block_rms(clipping_threshold), {"threshold": "clipping_threshold"})
    )
  if learning_rate is not None:
    tx.append(scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    # Parameters only, NaN-safe in optax already (optax.safe_root_mean_squares).
    tx.append(optax.scale_by_param_block_rms())
  if momentum is not None:
    tx.append(
      rename_hyperparams(
        ema(momentum, debias=False, accumulator_dtype=dtype_momentum), {"decay": "momentum"}
      )
    )
  if weight_decay_rate is not None:
    tx.append(
      rename_hyperparams(
        add_decayed_weights(weight_decay_rate, mask=weight_decay_mask),
        {"weight_decay": "weight_decay_rate"},
      )
    )
  tx.append(optax.scale(-1))
  return chain(*tx)


def _without_hyperparams(t: ReparamTransformation) -> ReparamTransformation:
  """``t`` with its hyperparameters fixed at their defaults (not exposed)."""

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    if hyperparams:
      raise ValueError(f"this member has no hyperparameters, got {sorted(hyperparams)}.")
    return t.update(updates, state, params, **extra_args)

  return ReparamTransformation(t.init, update_fn, {})


def lamb(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-6,
  eps_root: jax.typing.ArrayLike = 0.0,
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: MaskOrFn = None,
  *,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""LAMB (layer-wise trust ratio over AdamW), as :func:`optax.lamb`.

  .. math::

    r_t = \mathrm{adam}_t(g) + \lambda\,\theta_t, \qquad
    u_t = -\alpha\, \frac{\|\theta_t\|}{\|r_t\|}\, r_t \quad\text{(per tensor)}

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root, weight_decay``.
  Per-tensor norms are differentiated exactly and finitely, also for tensors
  whose update or parameters are exactly zero (see :func:`scale_by_trust_ratio`).

  Args:
    learning_rate: :math:`\alpha`: a scalar, a pytree matching params (per-parameter rates) or an
      :class:`optax.Schedule` ``count -> rate``. Differentiable hyperparameter.
    b1: :math:`\beta_1`, the decay of the first moment (the momentum). Differentiable
      hyperparameter.
    b2: :math:`\beta_2`, the decay of the second moment. Differentiable hyperparameter.
    eps: :math:`\epsilon`, added to the denominator outside the square root. Differentiable
      hyperparameter.
    eps_root: :math:`\epsilon_{root}`, added inside the square root. Differentiable hyperparameter.
    weight_decay: :math:`\lambda`, added to the Adam update before the trust ratio. Differentiable
      hyperparameter.
    mask: a pytree (or prefix) of booleans, or a callable ``params -> such pytree``: only ``True``
      leaves are decayed. ``None``: all.
    stop_gradient_denominator: treat the denominator as a constant in derivatives: the same
      trajectory, an approximate (not exact) meta-gradient.

  Examples:
    >>> import mixflow_optax as mfo
    >>> sorted(mfo.transforms.lamb(1e-3, weight_decay=0.01).hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate', 'weight_decay']

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, 2020.
  """
  return chain(
    scale_by_adam(
      b1=b1,
      b2=b2,
      eps=eps,
      eps_root=eps_root,
      stop_gradient_denominator=stop_gradient_denominator,
    ),
    add_decayed_weights(weight_decay=weight_decay, mask=mask),
    _without_hyperparams(scale_by_trust_ratio()),
    scale_by_learning_rate(learning_rate),
  )
