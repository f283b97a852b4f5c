r"""The differentiable unrolled inner loop.

.. math::

  g_t = \nabla_\theta L(\theta_t, \eta, x_t), \qquad
  (u_t, s_{t+1}) = \Upsilon(g_t, s_t, \theta_t; h(\eta)), \qquad
  \theta_{t+1} = \theta_t + u_t,

for :math:`t = 0, \dots, T-1`, as one ``lax.scan``. Differentiating any
function of :math:`(\theta_T, s_T)` with respect to :math:`\eta` and
:math:`\theta_0` gives the exact meta-gradient (truncated BPTT); with
``mode="mixflow"`` the second-order terms are computed forward-over-reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import checkify

from mixflow_optax._checks import (
  check_bool,
  check_finite_leaves,
  describe,
  first_non_array_leaf,
  first_non_float_leaf,
  is_float,
  non_array_leaf_message,
)
from mixflow_optax._compat import is_differentiated_eagerly, is_forward_mode_traced
from mixflow_optax._config import (
  INNER_GRAD_NAME,
  MemoryConfig,
  Mode,
  check_mode,
  memory_config,
)
from mixflow_optax._fwdrev import Fallback, _check_fallback, checked_loss, value_and_grad_fn
from mixflow_optax._placement import CARRY_NAME, carry_offload_policy, check_host_offload
from mixflow_optax.transforms._base import ReparamTransformation

__all__ = ["unroll", "INNER_GRAD_NAME"]

_OWNER = "mixflow_optax.unroll"


class UnrollResult(NamedTuple):
  """What one unrolled run returns (``model_state`` is None without model state)."""

  params: Any
  opt_state: Any
  model_state: Any
  losses: jax.Array

  def as_tuple(self, has_model_state: bool, return_losses: bool) -> tuple:
    """The public return value of ``run``."""
    out = (self.params, self.opt_state)
    if has_model_state:
      out += (self.model_state,)
    return (*out, self.losses) if return_losses else out


class UnrollSpec(NamedTuple):
  """Everything static about an unrolled loop, checked once by :func:`unroll_spec`."""

  inner_loss: Callable[..., Any]
  inner_opt: optax.GradientTransformation
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None
  mode: Mode
  memory: MemoryConfig
  fallback: Fallback
  has_model_state: bool
  check_finite: bool
  hyperparams_per_step: bool = False


def _check_inner_opt(inner_opt: Any, hyperparams_fn: Any) -> None:
  if callable(inner_opt) and not isinstance(inner_opt, optax.GradientTransformation):
    name = getattr(inner_opt, "__name__", repr(inner_opt))
    raise TypeError(
      f"inner_opt is {name!r}, a function that builds an optimizer: call it, e.g. "
      f"inner_opt={name}(1e-3), not inner_opt={name}."
    )
  if hyperparams_fn is not None and not isinstance(inner_opt, ReparamTransformation):
    raise TypeError(
      "hyperparams_fn was given, but inner_opt is a stock optax transform "
      "whose update takes no hyperparameters. Use the mixflow_optax version "
      "(e.g. mfo.transforms.adam instead of optax.adam), or wrap stock "
      "transforms with mfo.transforms.chain(...) together with one."
    )
  if not isinstance(inner_opt, optax.GradientTransformation):
    raise TypeError(
      f"inner_opt must be an optax GradientTransformation, got {describe(inner_opt)}."
    )


def unroll_spec(
  owner: str,
  inner_loss: Callable[..., Any],
  inner_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None,
  mode: Mode,
  memory: MemoryConfig,
  fallback: Fallback,
  has_model_state: bool,
  check_finite: bool,
  hyperparams_per_step: bool = False,
) -> UnrollSpec:
  """Checks the options of an unrolled loop and returns them as one object."""
  check_mode(mode)
  _check_fallback(fallback)
  check_bool(owner, "has_model_state", has_model_state)
  check_bool(owner, "check_finite", check_finite)
  _check_per_step(owner, hyperparams_per_step, hyperparams_fn)
  _check_inner_opt(inner_opt, hyperparams_fn)
  return UnrollSpec(
    inner_loss,
    inner_opt,
    hyperparams_fn,
    mode,
    memory,
    fallback,
    has_model_state,
    check_finite,
    bool(hyperparams_per_step),
  )


def _check_per_step(owner: str, hyperparams_per_step: Any, hyperparams_fn: Any) -> None:
  check_bool(owner, "hyperparams_per_step", hyperparams_per_step)
  if hyperparams_per_step and hyperparams_fn is None:
    raise ValueError(
      f"{owner}(hyperparams_per_step=True) calls hyperparams_fn(meta_params, step) at "
      "every inner step, but no hyperparams_fn was given."
    )


def _check_leading_axis(inner_batches: Any) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(inner_batches)
  if not leaves:
    raise ValueError(
      "inner_batches has no arrays: it must be a pytree whose leaves have a "
      "leading axis of length T (one slice per inner step)."
    )
  lengths = {}
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
        f"inner_batches leaf {jax.tree_util.keystr(path) or '<root>'} is a "
        "scalar; every leaf needs a leading axis of length T (the number of "
        "inner steps). Stack per-step batches with jnp.stack or "
        "jax.tree.map(lambda *xs: jnp.stack(xs), *batches)."
      )
    lengths[jax.tree_util.keystr(path) or "<root>"] = shape[0]
  if len(set(lengths.values())) != 1:
    detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
    raise ValueError(
      "inner_batches leaves disagree on the leading (inner-step) axis: "
      f"{detail}. Every leaf must have shape (T, ...), with the same T; "
      "broadcast per-run constants with jnp.broadcast_to(x, (T,) + x.shape) "
      "or pass them through meta_params instead."
    )
  num_steps = next(iter(lengths.values()))
  if num_steps == 0:
    raise ValueError(
      "inner_batches has an empty leading axis (T = 0 inner steps): the unrolled "
      "parameters would not depend on the meta-parameters. Give at least one step."
    )
  return num_steps


def check_params(params: Any) -> None:
  """Inner parameters: floating-point arrays only."""
  bad = first_non_array_leaf(params)
  if bad is not None:
    raise TypeError(non_array_leaf_message("params", *bad))
  bad = first_non_float_leaf(params)
  if bad is not None:
    path, dtype = bad
    raise TypeError(
      f"params leaf {path} has dtype {dtype}; inner parameters must be floating "
      "point. Move integer state (step counters, token ids, BatchNorm counts) out "
      "of params, e.g. into the batch or a separate argument."
    )


def _check_model_state_given(has_model_state: bool, model_state: Any) -> None:
  if has_model_state and model_state is None:
    raise TypeError(
      "unroll(..., has_model_state=True): call run(meta_params, params, "
      "opt_state, inner_batches, model_state) with the initial model state."
    )
  if not has_model_state and model_state is not None:
    raise TypeError(
      "run() was given a model_state, but unroll was built without "
      "has_model_state=True (inner_loss would not receive it)."
    )


def hyperparams_of(spec: UnrollSpec, meta_params: Any, *step: jax.Array) -> dict[str, Any] | None:
  """``hyperparams_fn(meta_params[, step])``, checked; None without ``hyperparams_fn``."""
  if spec.hyperparams_fn is None:
    return None
  hyperparams = spec.hyperparams_fn(meta_params, *step)
  if not isinstance(hyperparams, dict):
    raise TypeError(
      "hyperparams_fn must return a dict mapping hyperparameter names to "
      f"values, got {describe(hyperparams)}. Valid names: "
      f"{sorted(spec.inner_opt.hyperparams)}."
    )
  return hyperparams


_NOT_FUNCTIONALIZED = (
  "unroll(..., check_finite=True) is differentiated here without checkify.checkify "
  "around it: its backward-pass checks need one. Wrap the whole computation, e.g. "
  "err, out = checkify.checkify(jax.jit(f))(*args); err.throw(), or use "
  "mfo.meta_optimizer(..., check_finite=True), whose step does it for you."
)

# Backward-pass messages of `_watch`, by term.
_COTANGENT_MESSAGES = {
  "final": (
    "the cotangent of the final inner carry (params_T / opt_state_T) leaf {leaf} is "
    "non-finite: outer_loss's gradient at the unrolled parameters is NaN/inf."
  ),
  "grad": (
    "inner step {t}: the cotangent of the inner gradient g_t (leaf {leaf}) became "
    "non-finite in the backward pass: the inner optimizer's update is not "
    "differentiable w.r.t. its gradient input there (e.g. sqrt or division at an "
    "exactly zero gradient; mfo.transforms handle this, stock optax does not)."
  ),
  "carry": (
    "inner step {t}: the cotangent of the step's input carry (params / opt_state / "
    "model_state, leaf {leaf}) became non-finite in the backward pass: the "
    "second-order term of this step (Hessian-vector product of inner_loss, or the "
    "update's derivative w.r.t. params and optimizer state) produced NaN/inf."
  ),
  "meta": (
    "inner step {t}: this step's contribution to the meta-gradient w.r.t. "
    "meta_params leaf {leaf} is non-finite: the mixed second derivative of "
    "inner_loss w.r.t. params and meta_params produced NaN/inf."
  ),
  "hyperparams": (
    "inner step {t}: this step's contribution to the gradient w.r.t. hyperparameter "
    "{leaf} is non-finite: the inner optimizer's update is not differentiable w.r.t. "
    "that hyperparameter there (e.g. a non-positive value inside a log or sqrt)."
  ),
}


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _watch(x: Any, t: jax.Array, term: str) -> Any:
  """Identity whose backward pass checks that the cotangent of ``x`` is finite."""
  del t, term
  return x


def _watch_fwd(x, t, term):
  del term
  return x, t


def _watch_bwd(term, t, ct):
  check_finite_leaves(ct, _COTANGENT_MESSAGES[term], t=t)
  return ct, None


_watch.defvjp(_watch_fwd, _watch_bwd)


def _finite_flags(tree: Any) -> Any:
  return jax.tree.map(
    lambda x: jnp.all(jnp.isfinite(x)) if is_float(x) else jnp.asarray(True), tree
  )


_FORWARD_TERMS = (
  "the inner loss",
  "the inner gradient (leaf {leaf})",
  "the optimizer update (leaf {leaf})",
  "the new model state (leaf {leaf})",
)


def _check_forward_flags(flags: Any) -> None:
  """Reports the first inner step, and its first term, that went non-finite.

  The per-step flags are checked after the scan rather than inside it: under
  differentiation, checks inside a scan body are ordered after those that
  follow the scan, and the first non-finite value is the informative one.
  """
  columns, messages = [], []
  for term, tree in zip(_FORWARD_TERMS, flags):
    for path, ok in jax.tree_util.tree_leaves_with_path(tree):
      columns.append(ok)
      messages.append(term.replace("{leaf}", jax.tree_util.keystr(path) or "<root>"))
  bad = ~jnp.stack(columns, axis=1)  # (T, terms)
  step_bad = jnp.any(bad, axis=1)
  t = jnp.argmax(step_bad)  # the first step with a non-finite term
  first_term = jnp.argmax(bad[t])
  for k, message in enumerate(messages):
    checkify.check(
      ~(step_bad[t] & (first_term == k)),
      f"inner step {{t}}: {message} is non-finite (the first non-finite value of the unroll).",
      t=t,
    )


def _segmented_scan(
  step: Callable,
  carry: Any,
  xs: Any,
  num_steps: int,
  levels: tuple[int, ...],
  unroll: int,
  offload: bool = False,
) -> tuple[Any, Any]:
  """``lax.scan(step, carry, xs)`` with the carry stored only every ``levels[0]`` steps.

  Segments of ``K = levels[0]`` steps are scanned by an outer scan whose body
  is :func:`jax.checkpoint`-ed with nothing saved: the backward pass stores one
  carry per segment and recomputes the segment being differentiated,
  recursively with ``levels[1:]``. A last, shorter segment takes the
  remainder when ``K`` does not divide ``num_steps``. Two levels store
  :math:`T/K + K` carries instead of :math:`T`. With ``offload``, the stored
  segment carries are kept in host memory.
  """
  if not levels:
    return jax.lax.scan(step, carry, xs, unroll=unroll)
  k, rest = min(levels[0], num_steps), levels[1:]
  n, r = divmod(num_steps, k)
  # One name per level, so that each level's policy offloads its own carries only.
  name = f"{CARRY_NAME}_level{len(levels)}"
  policy = carry_offload_policy((), name) if offload else jax.checkpoint_policies.nothing_saveable

  def segment(length):
    def run_segment(carry, seg_xs):
      carry = checkpoint_name(carry, name) if offload else carry
      return _segmented_scan(step, carry, seg_xs, length, rest, unroll, offload)

    return jax.checkpoint(run_segment, policy=policy, prevent_cse=False)

  head = jax.tree.map(lambda x: x[: n * k].reshape((n, k) + x.shape[1:]), xs)
  carry, ys = jax.lax.scan(segment(k), carry, head)
  ys = jax.tree.map(lambda y: y.reshape((n * k,) + y.shape[2:]), ys)
  if r:
    carry, tail_ys = segment(r)(carry, jax.tree.map(lambda x: x[n * k :], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail_ys)
  return carry, ys


def _check_model_state(before: Any, after: Any) -> None:
  def spec(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)

  if jax.tree.structure(before) != jax.tree.structure(after) or spec(before) != spec(after):
    raise TypeError(
      "inner_loss must return (loss, new_model_state) with new_model_state of the "
      "same tree structure, shapes and dtypes as the model_state it was given "
      f"(it is carried from step to step). Got {spec(before)} in and "
      f"{spec(after)} out."
    )


def _inner_value_and_grad(spec: UnrollSpec, mode: Mode) -> Callable:
  """``(params, meta, batch[, model_state]) -> (loss | (loss, state), grads)`` for ``mode``."""
  has_aux = spec.has_model_state
  if mode == "mixflow":
    return value_and_grad_fn(
      spec.inner_loss, has_aux=has_aux, fallback=spec.fallback, aux_flag="has_model_state"
    )
  loss = checked_loss(spec.inner_loss, has_aux, aux_flag="has_model_state")

  def fresh_inputs_loss(params, *args):
    # Rebuild the other inputs' pytrees inside the trace (as fwdrev_grad's
    # custom_vjp does), so that a loss that mutates them in place, e.g. Flax
    # NNX BatchNorm statistics after nnx.merge, works in every mode.
    return loss(params, *jax.tree.map(lambda x: x, args))

  return jax.value_and_grad(fresh_inputs_loss, has_aux=has_aux)


def _make_step(
  spec: UnrollSpec,
  value_and_grad: Callable,
  meta_params: Any,
  hyperparams: Any,
  step_offset: jax.Array,
) -> Callable:
  """One inner step ``(carry, (t, batch)) -> (carry, loss | (loss, finite flags))``.

  With ``hyperparams_per_step``, ``hyperparams`` is None and each step computes
  its own, ``hyperparams_fn(meta_params, step_offset + t)``.
  """
  check = spec.check_finite

  def step(carry, xs):
    t, batch = xs
    if spec.hyperparams_per_step:
      hyperparams_t = hyperparams_of(spec, meta_params, step_offset + t)
    else:
      hyperparams_t = hyperparams
    if spec.memory.offload_carries:
      # The copy of the step's input that the backward pass keeps is this named one.
      carry = checkpoint_name(carry, CARRY_NAME)
    carry = _watch(carry, t, "carry") if check else carry
    params, opt_state, model_state = carry
    meta, hps = meta_params, hyperparams_t
    if check:
      meta = _watch(meta, t, "meta")
      hps = None if hps is None else _watch(hps, t, "hyperparams")
    if spec.has_model_state:
      (loss, new_model_state), grads = value_and_grad(params, meta, batch, model_state)
      _check_model_state(model_state, new_model_state)
      model_state = new_model_state
    else:
      loss, grads = value_and_grad(params, meta, batch)
    if spec.mode == "first_order":
      grads = jax.lax.stop_gradient(grads)
    if check:
      grads_ok = _finite_flags(grads)
      grads = _watch(grads, t, "grad")
    grads = checkpoint_name(grads, INNER_GRAD_NAME)
    extra = {} if hps is None else {"hyperparams": hps}
    updates, opt_state = spec.inner_opt.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    if check:
      flags = (_finite_flags(loss), grads_ok, _finite_flags(updates), _finite_flags(model_state))
      return (params, opt_state, model_state), (loss, flags)
    return (params, opt_state, model_state), loss

  policy = spec.memory.step_policy()
  if policy is None:
    return step
  return jax.checkpoint(step, policy=policy, prevent_cse=False)


def _scan_steps(
  spec: UnrollSpec, step: Callable, carry: Any, inner_batches: Any, num_steps: int
) -> UnrollResult:
  """Runs ``step`` over the T inner steps, storing carries as ``spec.memory`` says."""
  steps = jnp.arange(num_steps, dtype=jnp.int32)
  memory = spec.memory
  if memory.offload_carries:
    check_host_offload()
  carry, losses = _segmented_scan(
    step,
    carry,
    (steps, inner_batches),
    num_steps,
    memory.checkpoint_every,
    memory.unroll_steps,
    memory.offload_carries,
  )
  if spec.check_finite:
    losses, flags = losses
    _check_forward_flags(flags)
    carry = _watch(carry, jnp.asarray(num_steps, jnp.int32), "final")
  return UnrollResult(*carry, losses)


def _step_offset(step_offset: Any) -> jax.Array:
  if jnp.shape(step_offset) != () or not jnp.issubdtype(jnp.result_type(step_offset), jnp.integer):
    raise TypeError(
      f"run(..., step_offset=...) must be an integer scalar (the index of the first inner "
      f"step, e.g. 0 or state.count * T), got {describe(step_offset)}."
    )
  return jnp.asarray(step_offset, jnp.int32)


def make_run(spec: UnrollSpec) -> Callable[..., UnrollResult]:
  """``run(meta_params, params, opt_state, inner_batches, model_state=None, step_offset=0)``.

  ``run`` returns an :class:`UnrollResult`.
  """
  value_and_grads = {mode: _inner_value_and_grad(spec, mode) for mode in {spec.mode, "standard"}}

  def run(
    meta_params, params, opt_state, inner_batches, model_state=None, step_offset=0
  ) -> UnrollResult:
    check_params(params)
    num_steps = _check_leading_axis(inner_batches)
    _check_model_state_given(spec.has_model_state, model_state)
    inputs = (meta_params, params, opt_state, inner_batches, model_state)
    if spec.check_finite and is_differentiated_eagerly(inputs):
      raise ValueError(_NOT_FUNCTIONALIZED)
    mode = spec.mode
    if mode == "mixflow" and is_forward_mode_traced(inputs):
      # A custom_vjp cannot run under jax.jvp; there the plain inner gradient
      # is already differentiated forward-over-reverse.
      mode = "standard"
    offset = _step_offset(step_offset)
    hyperparams = None if spec.hyperparams_per_step else hyperparams_of(spec, meta_params)
    step = _make_step(spec, value_and_grads[mode], meta_params, hyperparams, offset)
    return _scan_steps(spec, step, (params, opt_state, model_state), inner_batches, num_steps)

  return run


def unroll(
  inner_loss: Callable[..., Any],
  inner_opt: optax.GradientTransformation,
  *,
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None = None,
  mode: Mode = "mixflow",
  remat: bool = True,
  save_inner_grads: bool = True,
  return_losses: bool = False,
  fallback: Fallback = "raise",
  unroll_steps: int = 1,
  checkpoint_every: int | Sequence[int] | None = None,
  has_model_state: bool = False,
  check_finite: bool = False,
  offload_carries: bool = False,
  hyperparams_per_step: bool = False,
) -> Callable:
  r"""Builds ``run(meta_params, params, opt_state, inner_batches)``: T inner steps.

  .. math::

    g_t = \nabla_\theta L(\theta_t, \eta, x_t), \quad
    u_t, s_{t+1} = \mathrm{opt.update}(g_t, s_t, \theta_t;
    \text{hyperparams} = h(\eta)), \quad \theta_{t+1} = \theta_t + u_t

  ``run`` returns :math:`(\theta_T, s_T)`. :func:`jax.grad` / :func:`jax.vjp` of any
  function of them with respect to ``meta_params`` :math:`\eta` *and*
  ``params`` :math:`\theta_0` (MAML) is the exact meta-gradient. ``run`` is a
  pure function: jit it, vmap it (e.g. over MAML tasks), differentiate it.

  Args:
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``. It may
      depend on ``meta_params`` (loss or data weighting); integer leaves in
      ``batch`` (token ids, labels) are fine.
    inner_opt: the inner optimizer: a :mod:`mixflow_optax.transforms`
      optimizer, or any optax transform if ``hyperparams_fn`` is None.
    hyperparams_fn: ``hyperparams_fn(meta_params) -> dict`` passed as
      ``hyperparams=`` to ``inner_opt.update`` at every step (e.g.
      ``lambda m: {"learning_rate": jnp.exp(m["log_lr"])}``). It is evaluated
      once per ``run``, outside the loop (with ``hyperparams_per_step``, once
      per inner step).
    mode: ``"mixflow"`` (default): inner gradients by
      :func:`fwdrev_value_and_grad`, differentiated forward-over-reverse.
      ``"standard"``: plain :func:`jax.value_and_grad` inside (reverse-over-reverse
      when differentiated; the baseline, and the reference when an inner loss
      has custom derivative rules: see :func:`mixflow_optax.check_meta_gradient`).
      ``"first_order"``: the inner gradient is treated as a constant
      (``stop_gradient``), dropping all second-order terms. This is the
      first-order MAML approximation, **not** the exact meta-gradient.
    remat: wrap each inner step in :func:`jax.checkpoint` (block
      rematerialisation), so that only the step inputs are stored across
      steps. Default ``True`` (measured best with ``save_inner_grads``; see
      the README's benchmark table).
    save_inner_grads: with ``remat``, keep each step's inner gradient (named
      :data:`INNER_GRAD_NAME`) instead of recomputing it in the backward
      pass: :math:`T\,|\theta|` more stored memory, one inner gradient less
      per step of compute. Default ``True``.
    return_losses: also return the inner losses :math:`L(\theta_t, \eta,
      x_t)`, shape ``(T,)`` (computed anyway; no extra cost).
    fallback: for ``mode="mixflow"``, what to do when the inner loss cannot
      be differentiated in forward mode (see :func:`fwdrev_value_and_grad`).
    unroll_steps: ``unroll`` argument of the ``lax.scan``: a positive int,
      or a bool as ``lax.scan`` takes it (``True`` unrolls fully).
    checkpoint_every: long horizons: store the inner carry ``(params,
      opt_state)`` only every K steps and recompute each K-step segment in
      the backward pass (a nested ``lax.scan`` with :func:`jax.checkpoint`), so
      the stored carries grow as :math:`T/K + K` instead of :math:`T`;
      :math:`K \approx \sqrt{T}` gives :math:`O(\sqrt{T})`. T need not be a
      multiple of K. A tuple ``(K1, K2, ...)`` nests further levels
      (segments of K1 steps split into segments of K2 steps, ...), storing
      :math:`T/K_1 + K_1/K_2 + \dots` carries at one more forward
      recomputation per level. The meta-gradient is unchanged. Default None:
      one stored carry per step.
    has_model_state: the model has non-parameter state that its forward pass
      updates (BatchNorm statistics, Flax ``nnx.BatchStat``, Linen
      ``"batch_stats"``). Then ``inner_loss(params, meta_params, batch,
      model_state) -> (loss, new_model_state)``; the state is carried from
      step to step next to ``(params, opt_state)``, is not touched by the
      optimizer, and is differentiated exactly (it depends on the
      parameters, so the meta-gradient flows through it).
    check_finite: debugging aid for NaN meta-gradients. Adds
      :mod:`jax.experimental.checkify` checks that name the inner step and the
      term that first went non-finite: forward (inner loss, inner gradient,
      update, model state) and backward (the cotangents of the inner
      gradient, of the step's carry, and of each step's contribution to the
      meta-gradient). ``run`` must then be functionalised with
      ``checkify.checkify`` (:func:`mixflow_optax.meta_optimizer` with
      ``check_finite=True`` does it for you). Off by default: the checks cost
      time.
    offload_carries: keep the inner carries that the backward pass stores,
      :math:`T\,(|\theta| + |s|)` (with ``checkpoint_every``, those of every
      level), in host memory (``pinned_host``) instead of on the device; the
      backward pass brings them back one step at a time. The static memory
      that mixed-mode differentiation does not shrink then leaves the
      accelerator, at one host-device copy per step each way. Needs
      ``remat=True`` and a backend with a ``pinned_host`` memory kind (GPU,
      TPU); raises ``ValueError`` elsewhere. On the CPU backend, whose device
      memory is host memory, it runs but moves nothing. Saved inner gradients
      stay on the device. The meta-gradient is unchanged. Default ``False``.
    hyperparams_per_step: per-step schedules: call ``hyperparams_fn(meta_params,
      step)`` inside every inner step, with ``step`` the int32 index
      ``step_offset + t`` (``t`` in :math:`[0, T)`; ``run``'s keyword
      ``step_offset``, default 0, continues a schedule across runs). E.g. a
      learned piecewise-linear log learning rate, ``lambda m, step:
      {"learning_rate": jnp.exp(jnp.interp(step, knots, m["log_lr_knots"]))}``.
      Differentiated exactly like constant hyperparameters.

  Under :func:`jax.jvp` / :func:`jax.jacfwd` (applied outside any ``jit``),
  ``mode="mixflow"`` computes the inner gradients with plain
  :func:`jax.value_and_grad`: forward mode differentiates them forward-over-reverse
  already.

  Returns:
    ``run(meta_params, params, opt_state, inner_batches) -> (params_T,
    opt_state_T)``, or ``(params_T, opt_state_T, losses)`` with
    ``return_losses``. ``inner_batches`` is a pytree whose leaves have a
    leading axis of length T, the number of inner steps. With
    ``has_model_state``: ``run(meta_params, params, opt_state, inner_batches,
    model_state) -> (params_T, opt_state_T, model_state_T[, losses])``.

  Examples:
    Learn a log learning rate of SGD through 3 inner steps:

    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> inner_loss = lambda w, meta, x: jnp.mean((x * w - 1.0) ** 2)
    >>> run = mfo.unroll(inner_loss, mfo.transforms.sgd(0.1),
    ...                  hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)})
    >>> def meta_loss(log_lr, w0, xs):
    ...   w, _ = run(log_lr, w0, mfo.transforms.sgd(0.1).init(w0), xs)
    ...   return jnp.mean((xs[-1] * w - 1.0) ** 2)
    >>> xs = jnp.ones((3, 4))
    >>> g = jax.grad(meta_loss)(jnp.log(0.1), jnp.array(0.0), xs)
    >>> bool(g < 0)  # a larger learning rate would help
    True

  References:
    Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
    <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Algorithm 1, with block
    rematerialisation and saved inner gradients as in Section 4).
  """
  spec = unroll_spec(
    _OWNER,
    inner_loss,
    inner_opt,
    hyperparams_fn=hyperparams_fn,
    mode=mode,
    memory=memory_config(
      _OWNER,
      remat=remat,
      save_inner_grads=save_inner_grads,
      checkpoint_every=checkpoint_every,
      unroll_steps=unroll_steps,
      offload_carries=offload_carries,
    ),
    fallback=fallback,
    has_model_state=has_model_state,
    check_finite=check_finite,
    hyperparams_per_step=hyperparams_per_step,
  )
  check_bool(_OWNER, "return_losses", return_losses)
  run_result = make_run(spec)

  def run(meta_params, params, opt_state, inner_batches, model_state=None, *, step_offset=0):
    result = run_result(meta_params, params, opt_state, inner_batches, model_state, step_offset)
    return result.as_tuple(has_model_state, return_losses)

  return run
