r"""The user-facing reparameterised optimizers, built by chaining (optax's alias.py style).

Each alias has the arguments of the optax alias of the same name, follows
its trajectory exactly with the default hyperparameters, and has the same
state structure, so it is a drop-in replacement. Its ``hyperparams`` are the
alias's differentiable arguments under their optax names.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from mixflow_optax.transforms._base import ReparamTransformation, chain, rename_hyperparams
from mixflow_optax.transforms._transforms import (
  add_decayed_weights,
  scale_by_adam,
  scale_by_learning_rate,
  scale_by_rms,
  scale_by_stddev,
  trace,
)

__all__ = ["sgd", "adam", "adamw", "rmsprop"]


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
    learning_rate: :math:`\alpha`, a scalar, per-parameter pytree or schedule.
    momentum: :math:`\mu`, or ``None`` for plain SGD.
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
) -> ReparamTransformation:
  r"""Adam, as :func:`optax.adam`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = -\alpha\,\frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root``. With the default
  ``eps_root=0`` meta-gradients are exact and finite even where gradient
  entries are exactly zero (see :func:`safe_sqrt`).

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> opt = mfo.transforms.adam(1e-3)
    >>> sorted(opt.hyperparams)
    ['b1', 'b2', 'eps', 'eps_root', 'learning_rate']

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  return chain(
    scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
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
) -> ReparamTransformation:
  r"""AdamW (decoupled weight decay), as :func:`optax.adamw`.

  .. math:: u_t = -\alpha\,\big(\mathrm{adam}_t(g) + \lambda\,\theta_t\big)

  Hyperparameters: ``learning_rate, b1, b2, eps, eps_root, weight_decay``.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return chain(
    scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
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
