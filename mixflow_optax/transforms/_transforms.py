r"""Reparameterised building blocks: optax's transforms with explicit hyperparameters.

Each factory mirrors the optax transform of the same name (same arguments,
same state class, same arithmetic), and additionally accepts
``hyperparams={...}`` in ``update`` so the update is an explicit,
differentiable function of the gradient *and* of its hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:  # Same state classes as optax, so states are interchangeable.
  from optax._src.transform import (
    ScaleByRmsWithCountState,
    ScaleByRStdDevWithCountState,
  )
except ImportError:  # pragma: no cover - older/newer optax layouts

  class ScaleByRmsWithCountState(NamedTuple):  # type: ignore[no-redef]  # fallback of the import
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    nu: optax.Updates

  class ScaleByRStdDevWithCountState(NamedTuple):  # type: ignore[no-redef]  # fallback of the import
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
    mu: optax.Updates
    nu: optax.Updates


from mixflow_optax.transforms._base import (
  PerLeaf,
  ReparamTransformation,
  leaf_results,
  map_leaves,
  per_leaf,
  resolve_hyperparams,
)

__all__ = [
  "safe_sqrt",
  "scale",
  "scale_by_learning_rate",
  "trace",
  "scale_by_adam",
  "scale_by_rms",
  "scale_by_stddev",
  "add_decayed_weights",
  "clip_by_global_norm",
]


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  r"""``jnp.sqrt`` whose derivative at exactly 0 contributes 0 instead of inf.

  In Adam-family updates :math:`\hat m / (\sqrt{\hat v} + \epsilon)`, an entry
  whose gradients were all exactly zero has :math:`\hat v = 0` and
  :math:`\hat m = 0`. Plain autodiff then multiplies
  :math:`\partial\sqrt{v}/\partial v = \infty` by 0 and returns NaN. The true
  derivative is finite: the only path through :math:`\sqrt{\hat v}` is scaled
  by :math:`\hat m = 0`, and :math:`\hat v` itself has zero tangent there
  (it is a sum of squares). Treating the tangent of :math:`\sqrt{x}` at
  :math:`x = 0` as 0 gives that exact limit; forward values are unchanged.

  Args:
    x: a non-negative array.
  """
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = jnp.sqrt(x)
  pos = x > 0
  # Double `where`: the untaken branch must not produce inf/NaN either, or its
  # derivative leaks NaN into higher-order differentiation.
  denom = jnp.where(pos, 2 * y, jnp.ones_like(y))
  return y, jnp.where(pos, t / denom, jnp.zeros_like(t))


def _denominator_root(x: jax.Array, stop_gradient: bool) -> jax.Array:
  """``sqrt(x)`` of an Adam-family denominator: exact (:func:`safe_sqrt`) or gradient-stopped."""
  return jnp.sqrt(jax.lax.stop_gradient(x)) if stop_gradient else safe_sqrt(x)


def _owner(name: str) -> str:
  return f"mixflow_optax.transforms.{name}"


def _unzip(treedef_like: Any, outs: list[tuple], n: int) -> tuple:
  treedef = jax.tree.structure(treedef_like)
  return tuple(jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(n))


def _bias_correction(moment: jax.Array, decay: Any, count: jax.Array) -> jax.Array:
  # Same arithmetic as optax.tree.bias_correction, per leaf.
  bc = 1 - decay**count
  return moment / jnp.asarray(bc).astype(moment.dtype)


def scale(step_size: jax.typing.ArrayLike) -> ReparamTransformation:
  r"""Scales updates by ``step_size`` (hyperparameter ``step_size``).

  .. math:: u_t = s\, g_t

  Args:
    step_size: the default scale; a scalar or a pytree matching params.
  """
  owner = _owner("scale")
  defaults = {"step_size": step_size}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    s = per_leaf("step_size", hp["step_size"], updates, owner)
    return map_leaves(lambda g, s: (s * g).astype(g.dtype), updates, s), state

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_learning_rate(
  learning_rate: optax.ScalarOrSchedule, *, flip_sign: bool = True
) -> ReparamTransformation:
  r"""Scales updates by the (negated) learning rate (hyperparameter ``learning_rate``).

  .. math:: u_t = -\alpha_t\, g_t

  Args:
    learning_rate: a scalar, a pytree matching params (per-parameter or
      per-element rates, as in Meta-SGD), or an :class:`optax.Schedule`
      ``count -> rate``. A value passed as ``hyperparams={"learning_rate": ...}``
      replaces it for that step.
    flip_sign: whether to negate (descent), as in optax.

  Returns:
    A :class:`ReparamTransformation`. Its state is :class:`optax.EmptyState` for a
    fixed rate and :class:`optax.ScaleByScheduleState` for a schedule, as in optax.
  """
  owner = _owner("scale_by_learning_rate")
  defaults = {"learning_rate": learning_rate}
  m = -1 if flip_sign else 1
  is_schedule = callable(learning_rate)

  def init_fn(params):
    del params
    if is_schedule:
      return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    lr = hp["learning_rate"]
    if callable(lr):
      if not is_schedule:
        raise TypeError(
          f"{owner}: a schedule was passed as a hyperparameter, but this "
          "optimizer was built with a fixed learning rate and keeps no step "
          "count. Build it with the schedule as learning_rate instead."
        )
      step = m * lr(state.count)
      updates = jax.tree.map(lambda g: jnp.array(step, dtype=g.dtype) * g, updates)
    else:
      rates = per_leaf("learning_rate", lr, updates, owner)
      updates = map_leaves(lambda g, r: ((m * r) * g).astype(g.dtype), updates, rates)
    if is_schedule:
      state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    return updates, state

  return ReparamTransformation(init_fn, update_fn, defaults)


def trace(
  decay: jax.typing.ArrayLike,
  nesterov: bool = False,
  accumulator_dtype: Any | None = None,
) -> ReparamTransformation:
  r"""Momentum (hyperparameter ``decay``), as :func:`optax.trace`.

  .. math::

    m_t = g_t + \mu\, m_{t-1}, \qquad
    u_t = \begin{cases} m_t & \text{heavy ball} \\
                        g_t + \mu\, m_t & \text{Nesterov} \end{cases}

  Args:
    decay: the momentum :math:`\mu`.
    nesterov: whether to use Nesterov momentum.
    accumulator_dtype: optional dtype of the trace.
  """
  owner = _owner("trace")
  defaults = {"decay": decay}
  acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    return optax.TraceState(trace=optax.tree.zeros_like(params, dtype=acc_dtype))

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    mus = per_leaf("decay", hp["decay"], updates, owner)

    def leaf(g, t, mu):
      new_t = g + mu * t
      u = g + mu * new_t if nesterov else new_t
      return u.astype(g.dtype), new_t.astype(t.dtype if acc_dtype is None else acc_dtype)

    outs = leaf_results(leaf, updates, state.trace, mus)
    new_updates, new_trace = _unzip(updates, outs, 2)
    return new_updates, optax.TraceState(trace=new_trace)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_adam(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
  stop_gradient_denominator: bool = False,
) -> ReparamTransformation:
  r"""Adam's rescaling (hyperparameters ``b1, b2, eps, eps_root``), as :func:`optax.scale_by_adam`.

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = \frac{m_t / (1-\beta_1^t)}
               {\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}.

  With ``eps_root=0`` (the default) the square root is :func:`safe_sqrt`:
  forward values are optax's, and meta-gradients stay finite and exact when
  some gradient entries are exactly zero (plain autodiff returns NaN there).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added inside the square root.
    mu_dtype: optional dtype of the first moment.
    nesterov: whether to use Nesterov momentum (NAdam).
    stop_gradient_denominator: if True, no derivative flows through
      :math:`\sqrt{\hat v_t + \epsilon_{root}}` (it is treated as a
      constant, :func:`jax.lax.stop_gradient`). Forward values are unchanged;
      meta-gradients become an approximation that drops the second-moment
      path, trading exactness for stability (as in DiscoRL's meta-learned
      Adam). Default False: exact.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  owner = _owner("scale_by_adam")
  defaults = {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    cols = [per_leaf(k, hp[k], updates, owner) for k in ("b1", "b2", "eps", "eps_root")]
    count_inc = optax.safe_increment(state.count)

    def leaf(g, m, v, b1, b2, eps, eps_root):
      m_dtype, v_dtype = m.dtype, v.dtype
      m = (1 - b1) * g + b1 * m
      sq = (g * jnp.conj(g)).real if jnp.iscomplexobj(g) else g**2
      v = (1 - b2) * sq + b2 * v
      if nesterov:
        m_hat = b1 * _bias_correction(m, b1, optax.safe_increment(count_inc)) + (
          1 - b1
        ) * _bias_correction(g, b1, count_inc)
      else:
        m_hat = _bias_correction(m, b1, count_inc)
      v_hat = _bias_correction(v, b2, count_inc)
      u = m_hat / (_denominator_root(v_hat + eps_root, stop_gradient_denominator) + eps)
      return u.astype(g.dtype), m.astype(m_dtype), v.astype(v_dtype)

    outs = leaf_results(leaf, updates, state.mu, state.nu, *cols)
    u, mu, nu = _unzip(updates, outs, 3)
    nu = optax.tree.cast_like(nu, state.nu)
    return u, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_rms(
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
) -> ReparamTransformation:
  r"""RMSProp's rescaling (hyperparameters ``decay, eps``), as :func:`optax.scale_by_rms`.

  .. math::

    v_t = \rho\, v_{t-1} + (1-\rho) g_t^2, \qquad
    u_t = \frac{g_t}{\sqrt{v_t + \epsilon}} \;\text{ or }\;
          \frac{g_t}{\sqrt{v_t} + \epsilon}\ (\texttt{eps\_in\_sqrt=False}).

  Args:
    decay: decay :math:`\rho` of the second moment.
    eps: the stabilising constant.
    initial_scale: initial value of :math:`v` (used by ``init`` only).
    eps_in_sqrt: whether ``eps`` goes inside the square root (optax default).
    bias_correction: whether to debias :math:`v` as in Adam.
  """
  owner = _owner("scale_by_rms")
  defaults = {"decay": decay, "eps": eps}

  def init_fn(params):
    nu = optax.tree.full_like(params, initial_scale)
    if bias_correction:
      return ScaleByRmsWithCountState(count=jnp.zeros([], jnp.int32), nu=nu)
    return optax.ScaleByRmsState(nu=nu)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    decays = per_leaf("decay", hp["decay"], updates, owner)
    epss = per_leaf("eps", hp["eps"], updates, owner)
    count_inc = optax.safe_increment(state.count) if bias_correction else None

    def leaf(g, v, rho, eps):
      v_dtype = v.dtype
      v = (1 - rho) * (g**2) + rho * v
      v_hat = v if count_inc is None else _bias_correction(v, rho, count_inc)
      if eps_in_sqrt:
        s = jax.lax.rsqrt(v_hat + eps)
      else:
        s = 1 / (safe_sqrt(v_hat) + eps)
      return (s * g).astype(g.dtype), v.astype(v_dtype)

    u, nu = _unzip(updates, leaf_results(leaf, updates, state.nu, decays, epss), 2)
    if bias_correction:
      return u, ScaleByRmsWithCountState(count=count_inc, nu=nu)
    return u, optax.ScaleByRmsState(nu=nu)

  return ReparamTransformation(init_fn, update_fn, defaults)


def scale_by_stddev(
  decay: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  bias_correction: bool = False,
) -> ReparamTransformation:
  r"""Centred RMSProp's rescaling (hyperparameters ``decay, eps``), as :func:`optax.scale_by_stddev`.

  .. math::

    m_t = \rho m_{t-1} + (1-\rho) g_t, \quad
    v_t = \rho v_{t-1} + (1-\rho) g_t^2, \quad
    u_t = \frac{g_t}{\sqrt{v_t - m_t^2 + \epsilon}}.

  Args:
    decay: :math:`\rho`, the decay of both moments. Differentiable hyperparameter.
    eps: :math:`\epsilon`, the stabilising constant. Differentiable hyperparameter.
    initial_scale: initial value of :math:`v` (used by ``init`` only).
    eps_in_sqrt: whether ``eps`` goes inside the square root (optax default).
    bias_correction: whether to debias the moments as in Adam.
  """
  owner = _owner("scale_by_stddev")
  defaults = {"decay": decay, "eps": eps}

  def init_fn(params):
    mu = optax.tree.zeros_like(params)
    nu = optax.tree.full_like(params, initial_scale)
    if bias_correction:
      return ScaleByRStdDevWithCountState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)
    return optax.ScaleByRStdDevState(mu=mu, nu=nu)

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    decays = per_leaf("decay", hp["decay"], updates, owner)
    epss = per_leaf("eps", hp["eps"], updates, owner)
    count_inc = optax.safe_increment(state.count) if bias_correction else None

    def leaf(g, m, v, rho, eps):
      m_dtype, v_dtype = m.dtype, v.dtype
      m = (1 - rho) * g + rho * m
      v = (1 - rho) * (g**2) + rho * v
      if count_inc is not None:  # bias_correction
        m_hat, v_hat = _bias_correction(m, rho, count_inc), _bias_correction(v, rho, count_inc)
      else:
        m_hat, v_hat = m, v
      if eps_in_sqrt:
        s = jax.lax.rsqrt(v_hat - m_hat**2 + eps)
      else:
        s = 1 / (safe_sqrt(v_hat - m_hat**2) + eps)
      return (s * g).astype(g.dtype), m.astype(m_dtype), v.astype(v_dtype)

    outs = leaf_results(leaf, updates, state.mu, state.nu, decays, epss)
    u, mu, nu = _unzip(updates, outs, 3)
    if bias_correction:
      return u, ScaleByRStdDevWithCountState(count=count_inc, mu=mu, nu=nu)
    return u, optax.ScaleByRStdDevState(mu=mu, nu=nu)

  return ReparamTransformation(init_fn, update_fn, defaults)


def add_decayed_weights(
  weight_decay: jax.typing.ArrayLike = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> ReparamTransformation:
  r"""Adds ``weight_decay * params`` (hyperparameter ``weight_decay``), as :func:`optax.add_decayed_weights`.

  .. math:: u_t = g_t + \lambda\, \theta_t

  Args:
    weight_decay: the decay :math:`\lambda` (scalar or pytree matching params).
    mask: a pytree (or prefix) of Python booleans, or a callable
      ``params -> such pytree``: only ``True`` leaves are decayed.
  """
  owner = _owner("add_decayed_weights")
  if callable(weight_decay):
    raise TypeError(
      f"{owner}: weight-decay schedules are not supported; pass a value (and "
      "meta-learn or vary it with hyperparams={'weight_decay': ...})."
    )
  defaults = {"weight_decay": weight_decay}

  def init_fn(params):
    del params
    # Same state structure as optax (which wraps masked decay in optax.masked).
    if mask is not None:
      return optax.MaskedState(inner_state=optax.EmptyState())
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"{owner} needs the parameters: call update(grads, state, params).")
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    wds = per_leaf("weight_decay", hp["weight_decay"], updates, owner)
    if mask is None:
      masks = PerLeaf([True] * len(wds))
    else:
      m = mask(params) if callable(mask) else mask
      # A mask may be a prefix of the params tree: broadcast it to every leaf.
      full = jax.tree.map(lambda mk, sub: jax.tree.map(lambda _: mk, sub), m, updates)
      masks = PerLeaf(jax.tree.leaves(full))
    return map_leaves(
      lambda g, p, wd, mk: (g + wd * p).astype(g.dtype) if mk else g, updates, params, wds, masks
    ), state

  return ReparamTransformation(init_fn, update_fn, defaults)


def clip_by_global_norm(max_norm: jax.typing.ArrayLike) -> ReparamTransformation:
  r"""Global-norm clipping (hyperparameter ``max_norm``), as :func:`optax.clip_by_global_norm`.

  .. math::

    u_t = \begin{cases} g_t & \|g_t\| < c \\
                        c\, g_t / \|g_t\| & \text{otherwise} \end{cases}

  Differentiated exactly: when clipping is active, the derivative includes
  the dependence of :math:`\|g_t\|` on :math:`g_t` (the clip coefficient is
  not treated as a constant). Unlike plain autodiff of
  :func:`optax.clip_by_global_norm`, its derivative is finite when every gradient
  entry is exactly zero.

  Args:
    max_norm: the threshold :math:`c`.
  """
  owner = _owner("clip_by_global_norm")
  defaults = {"max_norm": max_norm}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del params, extra_args
    hp = resolve_hyperparams(hyperparams, defaults, owner)
    c = hp["max_norm"]
    if jnp.ndim(c) != 0:
      raise ValueError(f"{owner}: max_norm must be a scalar, got shape {jnp.shape(c)}.")
    leaves = jax.tree.leaves(updates)
    g_norm = safe_sqrt(sum(jnp.sum(x**2) for x in leaves))
    trigger = g_norm < c
    denom = jnp.where(trigger, jnp.ones_like(g_norm), g_norm)

    def clip(t):
      # An array max_norm must not promote the update (e.g. bf16 grads, f32 c).
      ct = c.astype(t.dtype) if isinstance(c, (jax.Array, np.ndarray)) else c
      return jnp.where(trigger, t, (t / denom.astype(t.dtype)) * ct)

    return jax.tree.map(clip, updates), state

  return ReparamTransformation(init_fn, update_fn, defaults)
