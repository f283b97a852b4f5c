r"""The meta-training loop people write anyway, and the way back to an ordinary optimizer.

- :func:`sample_batches`: per-step minibatches (without replacement) from a
  dataset pytree, with their indices for per-example meta-parameters.
- :func:`meta_train`: the jitted meta-step in a loop, with evaluation,
  best-state tracking and a history of every metric, including the
  hyperparameters the inner optimizer applied.
- :func:`export_optimizer`: the inner optimizer with the learned
  hyperparameters fixed, an ordinary optax optimizer for a retrain (plain
  optax or ``nnx.Optimizer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixflow_optax._checks import check_bool, check_positive_int, describe
from mixflow_optax._meta import MetaOptimizer, MetaState
from mixflow_optax.transforms._base import ReparamTransformation

__all__ = ["MetaTrainResult", "export_optimizer", "meta_train", "sample_batches"]

#: Metrics with more elements than this per meta-step (e.g. per-element learning
#: rates of a large model) are left out of ``MetaTrainResult.history``.
MAX_HISTORY_ELEMENTS = 1024


def _num_examples(data: Any) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(data)
  if not leaves:
    raise ValueError("sample_batches: data has no arrays; give a pytree of arrays (N, ...).")
  sizes = {jax.tree_util.keystr(p) or "<root>": (jnp.shape(x) or (None,))[0] for p, x in leaves}
  if None in sizes.values() or len(set(sizes.values())) != 1:
    detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(
      "sample_batches: every leaf of data needs the same leading example axis N; got "
      f"leading axes {detail}."
    )
  return next(iter(sizes.values()))


def sample_batches(
  key: jax.Array,
  data: Any,
  batch_size: int,
  *,
  steps: int | None = None,
  with_indices: bool = False,
) -> Any:
  """Random minibatches of ``data``: one per inner step, each without replacement.

  Args:
    key: a ``jax.random`` key.
    data: a pytree of arrays with a common leading example axis :math:`N`.
    batch_size: examples per batch, at most :math:`N` (static under jit).
    steps: the number of batches, stacked on a leading axis (the T inner steps
      of :func:`mixflow_optax.meta_optimizer`); None: a single batch.
    with_indices: also return the int32 indices of the examples drawn, of shape
      ``(steps, batch_size)`` (or ``(batch_size,)``), e.g. to select per-example
      meta-parameters ``meta["logits"][indices]``.

  Returns:
    ``data`` with leaves of shape ``(steps, batch_size, ...)`` (or
    ``(batch_size, ...)``), and the indices with ``with_indices``.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> data = {"x": jnp.arange(20.0).reshape(10, 2), "y": jnp.arange(10)}
    >>> batches, idx = mfo.sample_batches(jax.random.key(0), data, 4, steps=3, with_indices=True)
    >>> batches["x"].shape, idx.shape
    ((3, 4, 2), (3, 4))
    >>> bool(jnp.all(batches["y"] == idx))
    True
  """
  owner = "mixflow_optax.sample_batches"
  batch_size = check_positive_int(owner, "batch_size", batch_size)
  if steps is not None:
    steps = check_positive_int(owner, "steps", steps)
  check_bool(owner, "with_indices", with_indices)
  n = _num_examples(data)
  if batch_size > n:
    raise ValueError(
      f"sample_batches: batch_size={batch_size} is larger than the {n} examples of data; "
      "batches are drawn without replacement. Use batch_size <= N."
    )

  def draw(k):
    return jax.random.choice(k, n, (batch_size,), replace=False).astype(jnp.int32)

  indices = draw(key) if steps is None else jax.vmap(draw)(jax.random.split(key, steps))
  batches = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), data)
  return (batches, indices) if with_indices else batches


class MetaTrainResult(NamedTuple):
  """What :func:`meta_train` returns.

  Attributes:
    state: the last :class:`~mixflow_optax.MetaState`.
    best_state: a host copy (numpy leaves) of the state with the best
      evaluation metric, None without ``eval_fn``.
    best_step: the number of meta-steps taken when it was evaluated (None
      without ``eval_fn``).
    best_value: its metric value (None without ``eval_fn``).
    history: numpy arrays stacked over meta-steps: every metric of ``step``
      (``"outer_loss"``, ``"inner_losses"``, ..., the applied hyperparameters
      flattened as ``"hyperparams/<name>[/<path>]"``), leaving out metrics of more
      than :data:`MAX_HISTORY_ELEMENTS` elements per step; and, with
      ``eval_fn``, ``"eval/<name>"`` stacked over evaluations and
      ``"eval_step"``, the meta-step count of each evaluation.
  """

  state: MetaState
  best_state: MetaState | None
  best_step: int | None
  best_value: float | None
  history: dict[str, np.ndarray]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
  """``{"hyperparams": {"learning_rate": {"Dense_0": x}}}`` -> ``{"hyperparams/learning_rate/Dense_0": x}``."""
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(metrics):
    if np.size(leaf) <= MAX_HISTORY_ELEMENTS:
      flat["/".join(_key_name(k) for k in path)] = leaf
  return flat


def _check_train_options(
  num_steps: Any, eval_fn: Any, eval_every: Any, best_metric: Any, best_mode: Any
) -> None:
  owner = "mixflow_optax.meta_train"
  check_positive_int(owner, "num_steps", num_steps)
  if eval_every is not None:
    check_positive_int(owner, "eval_every", eval_every)
  if best_mode not in ("min", "max"):
    raise ValueError(f"meta_train: best_mode must be 'min' or 'max', got {best_mode!r}.")
  if eval_fn is None and (eval_every is not None or best_metric is not None):
    raise ValueError(
      "meta_train: eval_every and best_metric need eval_fn=lambda state: {name: value}, "
      "the evaluation to run and to track the best state by."
    )
  if eval_fn is not None and not callable(eval_fn):
    raise TypeError(f"meta_train: eval_fn must be callable, got {describe(eval_fn)}.")


def _evaluate(eval_fn: Callable, state: MetaState, best_metric: str | None) -> tuple:
  """``(host values, the metric tracked)`` of ``eval_fn(state)``, checked."""
  values = eval_fn(state)
  if not isinstance(values, dict) or not values:
    raise ValueError(
      "meta_train: eval_fn(state) must return a non-empty dict of scalar metrics, e.g. "
      f"{{'val_loss': loss}}, got {describe(values)}."
    )
  values = {k: np.asarray(jax.device_get(v)) for k, v in values.items()}
  bad = [k for k, v in values.items() if v.size != 1]
  if bad:
    raise ValueError(f"meta_train: eval_fn's metrics must be scalars; {bad} are not.")
  if best_metric is None:
    if len(values) > 1:
      raise ValueError(
        f"meta_train: eval_fn returns several metrics {sorted(values)}: say which one "
        "tracks the best state with best_metric=..."
      )
    best_metric = next(iter(values))
  if best_metric not in values:
    raise ValueError(
      f"meta_train: best_metric={best_metric!r} is not a key of eval_fn's metrics {sorted(values)}."
    )
  return {k: v.reshape(()) for k, v in values.items()}, best_metric


def _progress_bar(num_steps: int, progress: bool) -> Any:
  if not progress:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=num_steps, desc="meta_train")


def _host_copy(tree: Any) -> Any:
  # np.array copies: on CPU, device_get may return views of buffers a donated step reuses.
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  rows = jax.device_get(rows)
  keys = list(rows[0]) if rows else []
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}


def meta_train(
  mo: MetaOptimizer,
  state: MetaState,
  batches_fn: Callable[[jax.Array], tuple[Any, Any]],
  num_steps: int,
  *,
  key: jax.Array,
  eval_fn: Callable[[MetaState], dict[str, Any]] | None = None,
  eval_every: int | None = None,
  best_metric: str | None = None,
  best_mode: Literal["min", "max"] = "min",
  progress: bool = True,
  jit: bool = True,
) -> MetaTrainResult:
  """Runs ``num_steps`` meta-steps of ``mo``, with evaluation and best-state tracking.

  Each meta-step splits ``key``, draws ``inner_batches, outer_batch =
  batches_fn(subkey)`` and calls ``mo.step`` (``jax.jit(mo.step,
  donate_argnums=0)`` with ``jit=True``: the state's buffers are reused; the
  ``state`` given here is copied first, so it stays valid). Every
  ``eval_every`` meta-steps and after the last, ``eval_fn(state)`` returns a
  dict of scalar metrics; the state with the best ``best_metric`` is kept as a
  host copy.

  Args:
    mo: the meta-optimizer.
    state: its starting state (``mo.init(...)``).
    batches_fn: ``key -> (inner_batches, outer_batch)``, e.g. built with
      :func:`sample_batches`; called as given (``jax.jit`` it yourself when
      drawing the batches is costly).
    num_steps: the number of meta-steps.
    key: a ``jax.random`` key.
    eval_fn: ``state -> {name: scalar}`` (e.g. held-out loss after a retrain
      or after the inner run); None: no evaluation.
    eval_every: evaluate every this many meta-steps (and after the last);
      None: only after the last.
    best_metric: the key of ``eval_fn``'s dict that ranks states (optional
      when it returns one metric).
    best_mode: ``"min"`` or ``"max"``: whether lower or higher is better.
    progress: show a tqdm progress bar (when tqdm is installed) with the
      outer loss and the best metric.
    jit: jit the step. Pass False for a meta-optimizer built with
      ``check_finite=True`` (its step compiles itself) or to debug.

  Returns:
    A :class:`MetaTrainResult`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mixflow_optax as mfo
    >>> loss = lambda w, meta, xy: jnp.mean((xy[0] @ w - xy[1]) ** 2)
    >>> mo = mfo.meta_optimizer(loss, loss, mfo.transforms.sgd(0.1), optax.adam(0.05),
    ...                         hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)})
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)); data = (x, x @ jnp.ones(3))
    >>> def batches_fn(key):
    ...   inner = mfo.sample_batches(key, data, 8, steps=4)
    ...   return inner, mfo.sample_batches(jax.random.fold_in(key, 1), data, 16)
    >>> result = mfo.meta_train(
    ...     mo, mo.init(jnp.log(0.1), jnp.zeros(3)), batches_fn, 20, key=jax.random.key(1),
    ...     eval_fn=lambda s: {"loss": loss(s.params, None, data)}, eval_every=5, progress=False)
    >>> result.history["hyperparams/learning_rate"].shape, result.history["eval_step"].tolist()
    ((20,), [5, 10, 15, 20])
  """
  _check_train_options(num_steps, eval_fn, eval_every, best_metric, best_mode)
  check_bool("mixflow_optax.meta_train", "jit", jit)

  step = jax.jit(mo.step, donate_argnums=0) if jit else mo.step
  state = jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, state)
  eval_every = eval_every or num_steps
  better = np.less if best_mode == "min" else np.greater
  rows, eval_rows, eval_steps = [], [], []
  best_state = best_step = best_value = None
  bar = _progress_bar(num_steps, progress)
  for i in range(1, num_steps + 1):
    key, sub = jax.random.split(key)
    inner_batches, outer_batch = batches_fn(sub)
    state, metrics = step(state, inner_batches, outer_batch)
    rows.append(_flat_metrics(metrics))
    if eval_fn is not None and (i % eval_every == 0 or i == num_steps):
      values, best_metric = _evaluate(eval_fn, state, best_metric)
      eval_rows.append(values)
      eval_steps.append(i)
      if best_value is None or better(values[best_metric], best_value):
        # A host copy: the next donated step deletes the device buffers.
        best_state, best_step, best_value = _host_copy(state), i, float(values[best_metric])
    if bar is not None:
      postfix = {"outer_loss": float(metrics["outer_loss"])}
      if best_value is not None:
        postfix[f"best {best_metric}"] = best_value
      bar.set_postfix(postfix)
      bar.update(1)
  if bar is not None:
    bar.close()
  history = _stack(rows)
  if eval_fn is not None:
    history.update({f"eval/{k}": v for k, v in _stack(eval_rows).items()})
    history["eval_step"] = np.asarray(eval_steps)
  return MetaTrainResult(state, best_state, best_step, best_value, history)


class ExportedScheduleState(NamedTuple):
  """State of :func:`export_optimizer` with ``per_step=True``."""

  count: jax.Array
  inner_state: optax.OptState


def _host(tree: Any) -> Any:
  # Fixed values: no gradient flows into them, and they do not hold device buffers a
  # later donation could delete.
  return jax.tree.map(np.asarray, jax.device_get(tree))


def export_optimizer(
  inner_opt: optax.GradientTransformation,
  hyperparams_fn: Callable[..., dict[str, Any]],
  meta_params: Any,
  *,
  per_step: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The inner optimizer with the learned hyperparameters fixed: an ordinary optax optimizer.

  .. math::

    h = \mathrm{hyperparams\_fn}(\eta) \quad\text{(or } h_k =
    \mathrm{hyperparams\_fn}(\eta, k) \text{ at update } k\text{)}, \qquad
    (u, s) = \mathrm{inner\_opt.update}(g, s, \theta;\ h)

  Use it to retrain with plain optax or ``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` after meta-learning: its trajectory is the inner
  optimizer's with those hyperparameters.

  Args:
    inner_opt: the :mod:`mixflow_optax.transforms` optimizer meta-learned.
    hyperparams_fn: the ``hyperparams_fn`` given to the meta-optimizer.
    meta_params: the learned meta-parameters (e.g. ``state.meta_params``);
      copied to the host: no gradient flows into the result.
    per_step: ``hyperparams_fn`` takes the step index (a schedule learned
      with ``hyperparams_per_step=True``): the optimizer keeps an int32 count
      in its state and evaluates ``hyperparams_fn(meta_params, count)`` at
      every update (beyond the learned horizon the schedule continues as
      ``hyperparams_fn`` extrapolates, e.g. ``jnp.interp`` holds the last knot).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax, mixflow_optax as mfo
    >>> tx = mfo.export_optimizer(mfo.transforms.sgd(0.1),
    ...                           lambda m: {"learning_rate": jnp.exp(m)}, jnp.log(0.5))
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> updates.tolist()
    [-0.5, -0.5]
  """
  if not isinstance(inner_opt, ReparamTransformation):
    raise TypeError(
      "export_optimizer needs the mixflow_optax optimizer whose hyperparameters were "
      f"learned (e.g. mfo.transforms.adam(1e-3)), got {describe(inner_opt)}."
    )
  if not callable(hyperparams_fn):
    raise TypeError(
      f"export_optimizer: hyperparams_fn must be callable, got {describe(hyperparams_fn)}."
    )
  check_bool("mixflow_optax.export_optimizer", "per_step", per_step)
  meta_params = _host(meta_params)
  if not per_step:
    hyperparams = _host(hyperparams_fn(meta_params))

    def update_fn(updates, state, params=None, **extra_args):
      extra_args.pop("hyperparams", None)
      return inner_opt.update(updates, state, params, hyperparams=hyperparams, **extra_args)

    return optax.GradientTransformationExtraArgs(inner_opt.init, update_fn)

  def init_fn(params):
    return ExportedScheduleState(jnp.zeros([], jnp.int32), inner_opt.init(params))

  def update_sched(updates, state, params=None, **extra_args):
    extra_args.pop("hyperparams", None)
    hyperparams = hyperparams_fn(meta_params, state.count)
    updates, inner_state = inner_opt.update(
      updates, state.inner_state, params, hyperparams=hyperparams, **extra_args
    )
    return updates, ExportedScheduleState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_sched)
