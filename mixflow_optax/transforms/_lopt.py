r"""Learned optimizers as reparameterised transforms: the optimizer's weights are its hyperparameters.

A learned optimizer is an update rule :math:`u = f_\phi(g, \theta, s)` whose
parameters :math:`\phi` are meta-learned. Written as a
:class:`~mixflow_optax.transforms.ReparamTransformation`, :math:`\phi` is
simply the ``hyperparams=`` of ``update``: :func:`mixflow_optax.unroll` and
:func:`mixflow_optax.meta_optimizer` then give exact meta-gradients with
respect to it (``hyperparams_fn=lambda w: w``), forward-over-reverse in the
inner gradient like any other hyperparameter.

This module also holds the parameterisation of a learned-hyperparameter Adam
(:func:`init_learned_adam_meta`, :func:`learned_adam_hyperparams`), which
needs no transform of its own: it is :func:`mixflow_optax.transforms.adam`
with meta-learned hyperparameters.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax._checks import describe
from mixflow_optax.transforms._base import ReparamTransformation, leaf_results

__all__ = [
  "MLPLOptState",
  "mlp_lopt",
  "init_learned_adam_meta",
  "learned_adam_hyperparams",
]

_OWNER = "mixflow_optax.transforms.mlp_lopt"

# Per-tensor second-moment normalisation of the features, x / sqrt(eps + mean(x^2)).
# The value is learned_optimization's; a smaller one makes d(feature)/dx as large
# as eps**-0.5 for tensors whose feature is all zeros (zero-initialised biases),
# which inflates meta-gradients through the parameter feature.
_NORM_EPS = 1e-5


class MLPLOptState(NamedTuple):
  """State of :func:`mlp_lopt`.

  Attributes:
    count: number of updates taken (int32).
    momenta: a pytree like the parameters; each leaf has the parameter's
      shape plus a trailing axis with one exponential moving average of the
      gradient per decay in ``momentum_decays``.
    rms: a pytree like the parameters: the moving average of the squared
      gradient (decay ``rms_decay``).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax's states
  momenta: optax.Updates
  rms: optax.Updates


def _layer_names(hidden_sizes: Sequence[int]) -> list[str]:
  return [f"hidden_{i}" for i in range(len(hidden_sizes))] + ["out"]


def _num_features(num_decays: int, num_time_features: int) -> int:
  # Normalised g, p, momenta, 1/rms; g/rms, momenta/rms; the time embedding.
  return 4 + 2 * num_decays + num_time_features


def _init_weights(
  key: jax.Array,
  num_inputs: int,
  hidden_sizes: Sequence[int],
  skip_index: int,
  output_init_scale: float,
  dtype: Any,
) -> dict[str, jax.Array]:
  sizes = [num_inputs, *hidden_sizes, 2]
  names = _layer_names(hidden_sizes)
  keys = jax.random.split(key, len(names))
  weights = {}
  for i, (name, k) in enumerate(zip(names, keys)):
    fan_in, fan_out = sizes[i], sizes[i + 1]
    # He initialisation for the ReLU layers; the output layer starts small so
    # that the update is dominated by the skip connection below at first.
    scale = output_init_scale if name == "out" else np.sqrt(2.0)
    w = jax.random.normal(k, (fan_in, fan_out), dtype) * (scale / np.sqrt(fan_in))
    weights[f"{name}/w"] = w
    weights[f"{name}/b"] = jnp.zeros((fan_out,), dtype)
  # A linear skip from the features to (direction, magnitude), initialised to
  # pass the normalised momentum / rms feature (Adam's direction) to the
  # direction output: the untrained optimizer is a small, sensible descent step.
  weights["skip/w"] = jnp.zeros((num_inputs, 2), dtype).at[skip_index, 0].set(1.0)
  return weights


def _check_weights(
  hyperparams: Any, defaults: Mapping[str, jax.Array], config: str
) -> dict[str, Any]:
  """Merges ``hyperparams`` over the default weights; wrong names/shapes raise."""
  if hyperparams is None:
    return dict(defaults)
  fix = (
    "Pass the weights dict of an mlp_lopt built with the same configuration "
    f"({config}), e.g. `meta_params = lopt.hyperparams` and "
    "`hyperparams_fn=lambda w: w`, or a pytree derived from it with jax.tree.map."
  )
  if not isinstance(hyperparams, Mapping):
    raise TypeError(
      f"{_OWNER}: hyperparams must be the learned weights, a dict with the keys "
      f"{sorted(defaults)}, got {describe(hyperparams)}. {fix}"
    )
  unknown = sorted(set(hyperparams) - set(defaults))
  if unknown:
    raise ValueError(
      f"{_OWNER}: unknown weight name(s) {unknown}; this optimizer's weights are "
      f"{sorted(defaults)} (see `lopt.hyperparams`; pass that dict itself, not "
      f"nested under another key). {fix}"
    )
  merged = dict(defaults)
  for name, value in hyperparams.items():
    if not hasattr(value, "shape") and not isinstance(value, (int, float, np.number)):
      raise TypeError(
        f"{_OWNER}: weight {name!r} must be an array of shape "
        f"{tuple(defaults[name].shape)}, got {describe(value)}. {fix}"
      )
    shape = tuple(np.shape(value))
    if shape != tuple(defaults[name].shape):
      raise ValueError(
        f"{_OWNER}: weight {name!r} has shape {shape}, but this optimizer expects "
        f"{tuple(defaults[name].shape)}. {fix}"
      )
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
      raise TypeError(
        f"{_OWNER}: weight {name!r} has dtype {jnp.result_type(value)}; the weights "
        "are meta-learned by gradient descent and must be floating point."
      )
    merged[name] = value
  return merged


def _second_moment_normalize(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  # rsqrt(eps + .) rather than 1/sqrt(.): finite derivatives of every order,
  # also where a tensor's feature is exactly zero (no sqrt at 0).
  return x * jax.lax.rsqrt(_NORM_EPS + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


class _LOptConfig(NamedTuple):
  """The fixed (not learned) settings of :func:`mlp_lopt`."""

  hidden_sizes: tuple[int, ...]
  decays: tuple[float, ...]
  rms_decay: float
  eps: float
  time_scales: tuple[float, ...]
  step_mult: float
  magnitude_scale: float

  @property
  def num_inputs(self) -> int:
    return _num_features(len(self.decays), len(self.time_scales))

  @property
  def skip_index(self) -> int:
    # m_hat^(k) r_hat for the decay closest to 0.9.
    closest = int(np.argmin([abs(d - 0.9) for d in self.decays]))
    return 4 + len(self.decays) + closest

  def describe(self) -> str:
    return (
      f"hidden_sizes={self.hidden_sizes}, {len(self.decays)} momentum_decays, "
      f"{len(self.time_scales)} time_scales: {self.num_inputs} input features"
    )


def _lopt_config(
  hidden_sizes: Sequence[int],
  momentum_decays: Sequence[float],
  rms_decay: float,
  eps: float,
  time_scales: Sequence[float],
  step_mult: float,
  magnitude_scale: float,
) -> _LOptConfig:
  """Checks :func:`mlp_lopt`'s settings and returns them as one object."""
  hidden_sizes = tuple(int(h) for h in hidden_sizes)
  decays = tuple(float(d) for d in momentum_decays)
  if any(h <= 0 for h in hidden_sizes):
    raise ValueError(f"{_OWNER}: hidden_sizes must be positive, got {hidden_sizes}.")
  if not decays:
    raise ValueError(f"{_OWNER}: momentum_decays must have at least one decay.")
  if not all(0.0 <= d < 1.0 for d in (*decays, rms_decay)):
    raise ValueError(
      f"{_OWNER}: decays must lie in [0, 1), got momentum_decays={decays}, rms_decay={rms_decay}."
    )
  return _LOptConfig(
    hidden_sizes,
    decays,
    rms_decay,
    eps,
    tuple(float(t) for t in time_scales),
    step_mult,
    magnitude_scale,
  )


def _check_update_args(updates: Any, params: Any, state: Any) -> None:
  if params is None:
    raise ValueError(
      f"{_OWNER} needs the parameters (they are one of its input features): "
      "call update(grads, state, params)."
    )
  if not isinstance(state, MLPLOptState):
    raise TypeError(
      f"{_OWNER}: state must be the MLPLOptState made by this optimizer's init, "
      f"got {describe(state)}."
    )
  want = jax.tree.structure(updates)
  for name, tree in (("params", params), ("state", state.rms)):
    if jax.tree.structure(tree) != want:
      raise ValueError(
        f"{_OWNER}: the gradient and {name} have different tree structures (was the state "
        f"made by init for other parameters?).\n  gradient: {want}\n  {name}: "
        f"{jax.tree.structure(tree)}"
      )


def _apply_mlp(w: Mapping[str, jax.Array], x: jax.Array, num_hidden: int) -> jax.Array:
  h = x
  for name in _layer_names(range(num_hidden))[:-1]:
    h = jax.nn.relu(h @ w[f"{name}/w"] + w[f"{name}/b"][None, :])
  return h @ w["out/w"] + w["out/b"][None, :] + x @ w["skip/w"]


def _features(
  cfg: _LOptConfig, g: jax.Array, p: jax.Array, m: jax.Array, v: jax.Array, t: jax.Array, dt: Any
) -> jax.Array:
  """The MLP's inputs for one tensor, shape ``(size, num_inputs)``."""
  shape, axes = jnp.shape(g), tuple(range(jnp.ndim(g)))
  gf, pf, mf, vf = (x.astype(dt) for x in (g, p, m, v))
  # Bias-corrected moments, as in Adam (t counts this update).
  t_new = (t + 1).astype(dt)
  decays = jnp.asarray(cfg.decays, dt).reshape((1,) * len(shape) + (len(cfg.decays),))
  m_hat = mf / (1 - decays**t_new)
  r_hat = jax.lax.rsqrt(vf / (1 - jnp.asarray(cfg.rms_decay, dt) ** t_new) + cfg.eps)
  normalized = _second_moment_normalize(
    jnp.concatenate([gf[..., None], pf[..., None], mf, r_hat[..., None]], axis=-1), axes
  )
  # Adam-like ratios are already scale-free; left unnormalised they keep
  # the information that gradients shrink relative to their history
  # (which lets the update anneal), lost by per-tensor normalisation.
  ratios = jnp.concatenate([(gf * r_hat)[..., None], m_hat * r_hat[..., None]], axis=-1)
  per_element = jnp.concatenate([normalized, ratios], axis=-1)
  time = jnp.tanh(t.astype(dt) / jnp.asarray(cfg.time_scales, dt) - 1)
  time = jnp.broadcast_to(time, (*shape, len(cfg.time_scales)))
  return jnp.concatenate([per_element, time], axis=-1).reshape(-1, cfg.num_inputs)


def _leaf_update(
  cfg: _LOptConfig,
  w: Mapping[str, jax.Array],
  t: jax.Array,
  g: jax.Array,
  p: jax.Array,
  m: jax.Array,
  v: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(update, momenta, rms)`` of one parameter tensor."""
  dt = jnp.promote_types(jnp.result_type(g), jnp.result_type(*w.values()))
  d = jnp.asarray(cfg.decays, m.dtype).reshape((1,) * jnp.ndim(g) + (len(cfg.decays),))
  m_new = d * m + (1 - d) * g.astype(m.dtype)[..., None]
  v_new = cfg.rms_decay * v + (1 - cfg.rms_decay) * jnp.square(g).astype(v.dtype)
  out = _apply_mlp(w, _features(cfg, g, p, m_new, v_new, t, dt), len(cfg.hidden_sizes))
  direction, magnitude = out[:, 0], out[:, 1]
  step = direction * jnp.exp(magnitude * cfg.magnitude_scale) * cfg.step_mult
  u = -step.reshape(jnp.shape(g))
  return u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)


def mlp_lopt(
  key: jax.Array,
  *,
  hidden_sizes: Sequence[int] = (32, 32),
  momentum_decays: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
  rms_decay: float = 0.999,
  eps: float = 1e-8,
  time_scales: Sequence[float] = (1.0, 10.0, 100.0, 1000.0, 10000.0),
  step_mult: float = 1e-3,
  magnitude_scale: float = 0.1,
  output_init_scale: float = 1e-2,
  dtype: Any | None = None,
) -> ReparamTransformation:
  r"""A per-parameter MLP learned optimizer whose weights are its hyperparameters.

  Every parameter element is updated by the same small MLP, applied to
  features of its gradient history, in the style of learned_optimization's
  ``MLPLOpt`` (Metz et al., 2022). With momenta :math:`m^{(k)}` for each decay
  :math:`\beta_k`, the second moment :math:`v`, their bias-corrected values
  :math:`\hat m^{(k)}, \hat v` (as in Adam) and
  :math:`\hat r = 1/\sqrt{\hat v + \epsilon}`:

  .. math::

    m^{(k)}_t = \beta_k m^{(k)}_{t-1} + (1-\beta_k) g_t, \qquad
    v_t = \rho\, v_{t-1} + (1-\rho) g_t^2,

    x = \big[\,\mathcal N(g_t),\ \mathcal N(\theta_t),\ \mathcal N(m^{(k)}_t),\
        \mathcal N(\hat r_t),\ g_t \hat r_t,\ \hat m^{(k)}_t \hat r_t,\
        \tanh(t/\tau_j - 1)\,\big],

    (d, a) = \mathrm{MLP}_\phi(x) + W_\text{skip}\, x, \qquad
    u_t = -\,d\, \exp(a \cdot \text{magnitude\_scale}) \cdot \text{step\_mult},

  where :math:`\mathcal N(z) = z / \sqrt{10^{-5} + \operatorname{mean}(z^2)}`
  normalises a feature over the elements of its tensor (as in the published
  MLP LOpt), and the last features embed the step count :math:`t` at time
  scales :math:`\tau_j`. The Adam-like ratios :math:`\hat m \hat r` are
  scale-free already and are *not* normalised: they tell the MLP when
  gradients shrink relative to their history, which per-tensor normalisation
  would hide. The MLP has ReLU hidden layers and two outputs: a direction
  :math:`d` and a log-magnitude :math:`a`.

  **At initialisation** the output layer is small (``output_init_scale``)
  and the linear skip :math:`W_\text{skip}` passes the ratio
  :math:`\hat m^{(k)} \hat r` with the decay closest to 0.9 to the direction.
  The untrained optimizer is therefore Adam with learning rate ``step_mult``
  (:math:`\epsilon` inside the root) plus a small learned perturbation: a
  small descent step, not a random one. Meta-training moves away from it.

  ``hyperparams`` is the dict of weights :math:`\phi` (``lopt.hyperparams``:
  ``"hidden_0/w"``, ``"hidden_0/b"``, ..., ``"out/w"``, ``"out/b"``,
  ``"skip/w"``). ``update(..., hyperparams=weights)`` uses ``weights``
  instead of the ones the optimizer was built with; a subset replaces only
  those arrays. To meta-learn them, pass ``meta_params = lopt.hyperparams``
  and ``hyperparams_fn=lambda w: w`` to :func:`mixflow_optax.unroll` or
  :func:`mixflow_optax.meta_optimizer`.

  Every nonlinearity is smooth or has finite derivatives of every order where
  gradients are exactly zero (``rsqrt(x + eps)``, never ``sqrt`` at 0), so
  meta-gradients stay finite with dead units. The update needs ``params``
  (the parameter feature).

  Args:
    key: a PRNG key for the initial weights.
    hidden_sizes: widths of the MLP's ReLU hidden layers.
    momentum_decays: decays of the gradient momenta used as features
      (fixed, not learned).
    rms_decay: decay :math:`\rho` of the second-moment accumulator.
    eps: added to :math:`\hat v` inside the reciprocal square root.
    time_scales: the :math:`\tau_j` of the step-count embedding.
    step_mult: the overall step size (fixed): the untrained optimizer is
      Adam with this learning rate.
    magnitude_scale: multiplies the magnitude output inside the exponential.
      learned_optimization uses 0.001; a larger value lets short
      meta-training change the step size by a useful factor.
    output_init_scale: standard deviation of the output layer's weights,
      times :math:`1/\sqrt{\text{fan-in}}`.
    dtype: dtype of the weights; JAX's default float dtype if None.

  Returns:
    A :class:`~mixflow_optax.transforms.ReparamTransformation` whose state is
    :class:`MLPLOptState` and whose ``hyperparams`` are the weights.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> lopt = mfo.transforms.mlp_lopt(jax.random.PRNGKey(0), hidden_sizes=(8,))
    >>> sorted(lopt.hyperparams)
    ['hidden_0/b', 'hidden_0/w', 'out/b', 'out/w', 'skip/w']
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> grads = params  # the gradient of 0.5 * |w|^2
    >>> state = lopt.init(params)
    >>> updates, state = lopt.update(grads, state, params)
    >>> bool(jnp.all(jnp.sign(updates["w"]) == -jnp.sign(grads["w"])))
    True
    >>> weights = jax.tree.map(lambda w: 0.5 * w, lopt.hyperparams)
    >>> updates, state = lopt.update(grads, state, params, hyperparams=weights)

  References:
    Metz, Freeman, Harrison, Maheswaranathan, Sohl-Dickstein, `Practical
    tradeoffs between memory, compute, and performance in learned optimizers
    <https://arxiv.org/abs/2203.11860>`_, CoLLAs 2022 (the MLP LOpt features,
    per-tensor normalisation and direction/magnitude output).
    Harrison, Metz, Sohl-Dickstein, `A Closer Look at Learned Optimization:
    Stability, Robustness, and Inductive Biases
    <https://arxiv.org/abs/2209.11208>`_, NeurIPS 2022 (a nominal descent
    direction inside the learned update; here Adam's, as the initial skip
    weights, and learnable).
  """
  cfg = _lopt_config(
    hidden_sizes, momentum_decays, rms_decay, eps, time_scales, step_mult, magnitude_scale
  )
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype
  defaults = _init_weights(
    key, cfg.num_inputs, cfg.hidden_sizes, cfg.skip_index, output_init_scale, dtype
  )

  def init_fn(params):
    momenta = jax.tree.map(
      lambda p: jnp.zeros((*jnp.shape(p), len(cfg.decays)), jnp.result_type(p)), params
    )
    return MLPLOptState(
      count=jnp.zeros([], jnp.int32), momenta=momenta, rms=optax.tree.zeros_like(params)
    )

  def update_fn(updates, state, params=None, *, hyperparams=None, **extra_args):
    del extra_args
    _check_update_args(updates, params, state)
    w = _check_weights(hyperparams, defaults, cfg.describe())
    # The time embedding uses the count before this update (0 on the first).
    leaf = functools.partial(_leaf_update, cfg, w, state.count)
    outs = leaf_results(leaf, updates, params, state.momenta, state.rms)
    treedef = jax.tree.structure(updates)
    u, momenta, rms = (jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(3))
    new_state = MLPLOptState(count=optax.safe_increment(state.count), momenta=momenta, rms=rms)
    return u, new_state

  return ReparamTransformation(init_fn, update_fn, defaults)


# ---------------------------------------------------------------------------
# Learned-hyperparameter Adam: a parameterisation, not a transform.
# ---------------------------------------------------------------------------

_ADAM_META = {
  "log_learning_rate": "learning_rate",
  "logit_b1": "b1",
  "logit_b2": "b2",
  "log_eps": "eps",
}


def init_learned_adam_meta(
  learning_rate: jax.typing.ArrayLike = 1e-3,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
) -> dict[str, jax.Array]:
  r"""Unconstrained meta-parameters of Adam's hyperparameters, the inverse of :func:`learned_adam_hyperparams`.

  .. math::

    \big(\log \alpha,\ \operatorname{logit} \beta_1,\
    \operatorname{logit} \beta_2,\ \log \epsilon\big)

  Gradient descent on these keeps :math:`\alpha, \epsilon > 0` and
  :math:`\beta_1, \beta_2 \in (0, 1)`. Each value may be a scalar or a pytree
  of per-parameter values (as accepted by :func:`mixflow_optax.transforms.adam`).

  Args:
    learning_rate: initial :math:`\alpha`.
    b1: initial :math:`\beta_1`.
    b2: initial :math:`\beta_2`.
    eps: initial :math:`\epsilon`.

  Returns:
    ``{"log_learning_rate", "logit_b1", "logit_b2", "log_eps"}``; drop keys
    to keep those hyperparameters at the optimizer's defaults.

  Examples:
    >>> import jax.numpy as jnp, mixflow_optax as mfo
    >>> meta = mfo.transforms.init_learned_adam_meta(learning_rate=1e-2)
    >>> hp = mfo.transforms.learned_adam_hyperparams(meta)
    >>> print(f"{float(hp['learning_rate']):.3f} {float(hp['b2']):.3f}")
    0.010 0.999
  """
  as_float = lambda x: jnp.asarray(x, jnp.zeros(()).dtype)
  log = lambda x: jnp.log(as_float(x))
  logit = lambda x: jnp.log(as_float(x)) - jnp.log1p(-as_float(x))
  return {
    "log_learning_rate": jax.tree.map(log, learning_rate),
    "logit_b1": jax.tree.map(logit, b1),
    "logit_b2": jax.tree.map(logit, b2),
    "log_eps": jax.tree.map(log, eps),
  }


def learned_adam_hyperparams(meta: Mapping[str, Any]) -> dict[str, Any]:
  r"""Adam's hyperparameters from unconstrained meta-parameters: the ``hyperparams_fn`` of a learned Adam.

  .. math::

    \alpha = e^{\log \alpha}, \quad \beta_i = \sigma(\operatorname{logit}\beta_i),
    \quad \epsilon = e^{\log \epsilon}

  Use it with :func:`mixflow_optax.transforms.adam` (or ``adamw``): the
  learned Adam is the ordinary reparameterised Adam, with exact
  meta-gradients for all four hyperparameters.

  Args:
    meta: a dict with any of ``"log_learning_rate"``, ``"logit_b1"``,
      ``"logit_b2"``, ``"log_eps"`` (see :func:`init_learned_adam_meta`);
      values are scalars or per-parameter pytrees.

  Returns:
    The ``hyperparams`` dict for ``adam.update`` (only the keys given).

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> loss = lambda w, meta, x: jnp.sum((w - x) ** 2)
    >>> opt = mfo.transforms.adam(1e-3)
    >>> run = mfo.unroll(loss, opt,
    ...                  hyperparams_fn=mfo.transforms.learned_adam_hyperparams)
    >>> def meta_loss(meta, w0, xs):
    ...   w, _ = run(meta, w0, opt.init(w0), xs)
    ...   return loss(w, meta, xs[-1])
    >>> meta = mfo.transforms.init_learned_adam_meta(learning_rate=0.1)
    >>> g = jax.grad(meta_loss)(meta, jnp.zeros(2), jnp.ones((3, 2)))
    >>> sorted(g)
    ['log_eps', 'log_learning_rate', 'logit_b1', 'logit_b2']
  """
  if not isinstance(meta, Mapping):
    raise TypeError(
      "learned_adam_hyperparams: meta must be a dict with keys among "
      f"{sorted(_ADAM_META)} (see init_learned_adam_meta), got {describe(meta)}."
    )
  unknown = sorted(set(meta) - set(_ADAM_META))
  if unknown:
    raise ValueError(
      f"learned_adam_hyperparams: unknown key(s) {unknown}; valid keys are "
      f"{sorted(_ADAM_META)} (see init_learned_adam_meta)."
    )
  transform = {
    "log_learning_rate": jnp.exp,
    "logit_b1": jax.nn.sigmoid,
    "logit_b2": jax.nn.sigmoid,
    "log_eps": jnp.exp,
  }
  return {_ADAM_META[k]: jax.tree.map(transform[k], v) for k, v in meta.items()}
