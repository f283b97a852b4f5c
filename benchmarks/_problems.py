r"""Benchmark problems: three meta-learning tasks on an inner loop of T optimizer steps.

Every problem is a bilevel problem

.. math::

  \theta_{t+1} = \theta_t + \mathrm{Adam}\big(\nabla_\theta L(\theta_t, \eta, x_t);
    \text{lr}(\eta)\big), \qquad
  \text{meta-loss} = V(\theta_T, x_{val}),

whose meta-gradient :math:`dV/d\eta` the benchmark measures. The tasks are
those of the paper's benchmarks:

- ``"learning_rate"`` (hyperparameter learning): :math:`\eta = \log` of
  Adam's learning rate, :math:`\text{lr}(\eta) = e^\eta`; the inner loss does
  not depend on :math:`\eta`.
- ``"loss_weighting"``: :math:`\eta \in \mathbb{R}^{T \times B}`, one logit per
  inner training example (MLP) or sequence (LM), inside the inner loss:
  :math:`L = \frac1B \sum_i \sigma(\eta_{t,i})\,\ell_i(\theta_t, x_t)`. Step
  ``t`` picks its row through an integer ``"step"`` leaf of its batch.
- ``"maml"``: :math:`\eta = \theta_0`, the initial parameters.

The outer loss :math:`V` is the unweighted mean loss on a held-out batch.

The inner optimizer is Adam unless a problem names another
(``optimizer="lion"``, ``"adafactor"``, ...: any of :data:`OPTIMIZERS`, stock
``optax.<name>`` in the standard baselines and ``mixflow_optax.transforms.<name>``
in the MixFlow methods, at the same learning rate and default hyperparameters).

Two model families:

- ``"mlp"``: the paper's toy, a deep tanh MLP regressing random targets,
  whose per-step work size ``M`` scales the batch (``batch = 128 M``) at a
  fixed parameter count, so the per-step activations grow with ``M`` and the
  static memory (parameters, optimizer state) does not. Named ``"mlp-M<M>"``.
- ``"lm"``: pre-RMSNorm causal transformer language models with rotary
  position embeddings (RoPE) and next-token cross-entropy on synthetic token
  ids, in a small Chinchilla-style ladder (:data:`LM_LADDER`:
  ``"lm-xs"`` ... ``"lm-3xl"``, 0.13M to 0.57B parameters). Written as LLM
  code is written: each transformer block rematerialised (``jax.checkpoint``
  inside the layer scan) and a memory-efficient attention
  (:func:`mixflow_optax.nn.dot_product_attention`, which keeps its saving
  under forward-over-reverse). ``attention="xla"`` and ``block_remat=False``
  give the naive model (``jax.nn.dot_product_attention``'s XLA path, which
  materialises the ``B N S^2`` scores, and no per-block remat); its names end
  in ``-naive``. ``loss_chunk > 0`` computes the LM head and cross-entropy
  over chunks of tokens (:func:`mixflow_optax.nn.chunked_cross_entropy`), so
  that the ``B S V`` logits of a large vocabulary are never materialised.

Everything is pure functional JAX (parameters are dicts of arrays), so it
jits, scans and differentiates in every mode. Shapes broadcast explicitly (the
test suite runs with ``jax_numpy_rank_promotion="raise"``). A problem can be
built ``abstract``: its arrays are then ``jax.ShapeDtypeStruct`` s, enough to
compile and read the memory analysis of configurations too large to allocate.

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 5: learning-rate
  learning, MAML and loss weighting of Chinchilla-style transformer LMs with
  RoPE; the toy problem with per-step size M).
  Hoffmann et al., `Training Compute-Optimal Large Language Models
  <https://arxiv.org/abs/2203.15556>`_, 2022 (the Chinchilla family).
  Su et al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
  <https://arxiv.org/abs/2104.09864>`_, 2021.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import mixflow_optax as mfo

__all__ = [
  "TASKS",
  "MLPConfig",
  "LMConfig",
  "LM_LADDER",
  "ATTENTIONS",
  "NAIVE",
  "OPTIMIZERS",
  "MLP_BASE_BATCH",
  "Problem",
  "MODELS",
  "model_config",
  "make_problem",
  "mlp_problem",
  "lm_problem",
]

#: The meta-learning tasks.
TASKS: tuple[str, ...] = ("learning_rate", "loss_weighting", "maml")

#: Attention implementations of the LM (see :class:`LMConfig`).
ATTENTIONS: tuple[str, ...] = ("mfo", "xla", "mfo_checkpoint")

#: Size overrides that make the naive LM (XLA attention, no per-block remat).
NAIVE: dict[str, Any] = {"attention": "xla", "block_remat": 0}

#: Inner learning rate (the initial one, for ``"learning_rate"``), whatever the optimizer.
LEARNING_RATE = 1e-3

#: Inner optimizers a problem can use: the names of both an optax alias and
#: its reparameterised :mod:`mixflow_optax.transforms` version, whose first
#: argument is the learning rate.
OPTIMIZERS: tuple[str, ...] = tuple(
  name
  for name in ("adam", "adamw", "nadam", "lion", "adafactor", "rmsprop", "sgd", "adabelief")
  if hasattr(mfo.transforms, name)
)


def check_optimizer(name: str) -> str:
  """``name`` if it is one of :data:`OPTIMIZERS`; raises a clear error otherwise."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown inner optimizer {name!r}; choose from {list(OPTIMIZERS)}.")
  return name


#: Examples per inner step of the MLP toy at work size ``M = 1``.
MLP_BASE_BATCH = 128


class Problem(NamedTuple):
  r"""A meta-learning problem: everything a meta-gradient method needs.

  Attributes:
    task: one of :data:`TASKS`.
    model: the model's name (``"lm-s"``, ``"mlp-M16"``, ...).
    family: ``"mlp"`` or ``"lm"``.
    T: number of inner steps.
    meta_params: the meta-parameters :math:`\eta` (the initial parameters
      for ``"maml"``); the meta-gradient is taken with respect to them.
    params: the initial inner parameters :math:`\theta_0` (a dict of arrays),
      or ``None`` for ``"maml"``, where they are ``meta_params``.
    inner_batches: pytree of arrays with leading axis ``T``.
    outer_batch: the held-out batch of the outer loss.
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``.
    outer_loss: ``outer_loss(params, batch) -> scalar``.
    hyperparams_fn: ``hyperparams_fn(meta_params) -> {"learning_rate": ...}``
      for ``"learning_rate"``, else ``None``.
    learning_rate: the inner learning rate when it is not learned.
    config: the model's sizes and parameter count (recorded in the results).
    optimizer: the inner optimizer, one of :data:`OPTIMIZERS` (``"adam"``).
  """

  task: str
  model: str
  family: str
  T: int
  meta_params: Any
  params: Any
  inner_batches: Any
  outer_batch: Any
  inner_loss: Callable[[Any, Any, Any], jax.Array]
  outer_loss: Callable[[Any, Any], jax.Array]
  hyperparams_fn: Callable[[Any], dict[str, Any]] | None
  learning_rate: float
  config: dict[str, Any]
  optimizer: str = "adam"

  @property
  def args(self) -> tuple[Any, ...]:
    """The meta-gradient's arguments: ``(meta_params, params, inner_batches, outer_batch)``."""
    return (self.meta_params, self.params, self.inner_batches, self.outer_batch)


# ------------------------------------------------------------ array descriptions
# Problems are described as trees of array specifications, then either
# materialised with NumPy (seeded ``np.random.default_rng``: unlike eager
# ``jax.random`` calls this compiles nothing, which keeps tests fast) or turned
# into ``jax.ShapeDtypeStruct`` s for compile-only measurements of
# configurations too large to allocate.


@dataclasses.dataclass(frozen=True)
class _Normal:
  shape: tuple[int, ...]
  std: float = 1.0


@dataclasses.dataclass(frozen=True)
class _Full:
  shape: tuple[int, ...]
  value: float


@dataclasses.dataclass(frozen=True)
class _Ints:
  """Uniform integers in ``[0, high)``, or ``arange(shape[0])`` if ``high`` is None."""

  shape: tuple[int, ...]
  high: int | None


_Spec = _Normal | _Full | _Ints


def _is_spec(x: Any) -> bool:
  return isinstance(x, _Normal | _Full | _Ints)


def _build(tree: Any, rng: np.random.Generator, dtype: Any, abstract: bool) -> Any:
  """Materialises a tree of specifications (in leaf order, so seeds are reproducible)."""

  def leaf(spec: _Spec):
    is_int = isinstance(spec, _Ints)
    if abstract:
      return jax.ShapeDtypeStruct(spec.shape, jnp.int32 if is_int else dtype)
    if isinstance(spec, _Normal):
      x = rng.standard_normal(spec.shape) * spec.std
    elif isinstance(spec, _Full):
      x = np.full(spec.shape, spec.value)
    elif spec.high is None:
      x = np.arange(spec.shape[0], dtype=np.int32)
    else:
      x = rng.integers(0, spec.high, spec.shape, dtype=np.int32)
    return jnp.asarray(x, jnp.int32 if is_int else dtype)

  return jax.tree.map(leaf, tree, is_leaf=_is_spec)


def _count(tree: Any) -> int:
  return int(sum(math.prod(s.shape) for s in jax.tree.leaves(tree, is_leaf=_is_spec)))


def _step_weights(meta_params: jax.Array, step: jax.Array) -> jax.Array:
  """The loss weights :math:`\\sigma(\\eta_t)` of inner step ``step``, shape ``(B,)``."""
  return jax.nn.sigmoid(jax.lax.dynamic_index_in_dim(meta_params, step, axis=0, keepdims=False))


def _make_task(
  task: str,
  *,
  model: str,
  family: str,
  T: int,
  batch: int,
  param_specs: Any,
  inner_data: Any,
  outer_data: Any,
  per_example_loss: Callable[[Any, Any], jax.Array],
  config: dict[str, Any],
  seed: int,
  dtype: Any,
  abstract: bool,
  optimizer: str = "adam",
) -> Problem:
  """Wraps a model (parameters, data, per-example loss) into a task's :class:`Problem`."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}.")
  check_optimizer(optimizer)
  rng = np.random.default_rng(seed)
  params = _build(param_specs, rng, dtype, abstract)
  inner_batches = _build(inner_data, rng, dtype, abstract)
  outer_batch = _build(outer_data, rng, dtype, abstract)
  hyperparams_fn = None

  def outer_loss(params, batch):
    return jnp.mean(per_example_loss(params, batch))

  if task == "loss_weighting":
    # Zeros: every example starts with weight sigmoid(0) = 1/2.
    meta_params = _build(_Full((T, batch), 0.0), rng, dtype, abstract)
    inner_batches = {**inner_batches, "step": _build(_Ints((T,), None), rng, dtype, abstract)}

    def inner_loss(params, meta_params, batch):
      w = _step_weights(meta_params, batch["step"])
      return jnp.mean(w * per_example_loss(params, batch))

  else:

    def inner_loss(params, meta_params, batch):
      del meta_params  # Learned through the optimizer (lr) or the start (MAML).
      return outer_loss(params, batch)

    if task == "learning_rate":
      meta_params = {"log_lr": _build(_Full((), math.log(LEARNING_RATE)), rng, dtype, abstract)}

      def hyperparams_fn(meta_params):
        return {"learning_rate": jnp.exp(meta_params["log_lr"])}

    else:  # maml: the meta-parameters are the initial parameters.
      meta_params, params = params, None

  config = {**config, "n_params": _count(param_specs)}
  return Problem(
    task=task,
    model=model,
    family=family,
    T=T,
    meta_params=meta_params,
    params=params,
    inner_batches=inner_batches,
    outer_batch=outer_batch,
    inner_loss=inner_loss,
    outer_loss=outer_loss,
    hyperparams_fn=hyperparams_fn,
    learning_rate=LEARNING_RATE,
    config=config,
    optimizer=optimizer,
  )


# --------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Sizes of the MLP toy.

  Attributes:
    width: input and hidden width.
    depth: number of tanh layers (``width x width``), followed by a linear
      readout to ``out_dim``.
    batch: examples per inner step (and in the held-out batch); the work size
      ``M`` of the paper's toy is ``batch / 128``.
    out_dim: regression target dimension.
  """

  width: int = 64
  depth: int = 8
  batch: int = 16 * MLP_BASE_BATCH
  out_dim: int = 1

  @classmethod
  def small(cls) -> MLPConfig:
    return cls(width=8, depth=3, batch=16, out_dim=1)


def _dense(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
  return x @ layer["w"] + layer["b"][None, :]


def mlp_apply(params: dict[str, Any], x: jax.Array) -> jax.Array:
  """The MLP: ``depth`` tanh layers and a linear readout; ``x``: ``(B, width)``."""

  def layer(h, p):
    return jnp.tanh(_dense(h, p)), None

  # The hidden layers are stacked on a leading axis and scanned over, as deep
  # models usually are in JAX: compile time does not grow with depth.
  h, _ = jax.lax.scan(layer, x, params["hidden"])
  return _dense(h, params["readout"])


def _mlp_specs(cfg: MLPConfig) -> dict[str, Any]:
  def layer(n_in, n_out, lead=()):
    # LeCun-normal, so that the signal neither explodes nor dies through tanh.
    return {"w": _Normal((*lead, n_in, n_out), 1 / math.sqrt(n_in)), "b": _Full((*lead, n_out), 0)}

  return {
    "hidden": layer(cfg.width, cfg.width, lead=(cfg.depth,)),
    "readout": layer(cfg.width, cfg.out_dim),
  }


def mlp_problem(
  T: int = 4,
  cfg: MLPConfig | None = None,
  *,
  task: str = "loss_weighting",
  seed: int = 0,
  dtype: Any = jnp.float32,
  abstract: bool = False,
  name: str | None = None,
  optimizer: str = "adam",
) -> Problem:
  """The MLP toy: regression to random targets, per-example squared error.

  Args:
    T: number of inner steps.
    cfg: sizes; :class:`MLPConfig` defaults if ``None``.
    task: one of :data:`TASKS`.
    seed: PRNG seed of the parameters and the data.
    dtype: floating dtype of parameters, data and meta-parameters.
    abstract: ``jax.ShapeDtypeStruct`` s instead of arrays (compile-only).
    name: the model's name in the results (default ``"mlp-M<batch/128>"``).
    optimizer: the inner optimizer, one of :data:`OPTIMIZERS`.

  Returns:
    A :class:`Problem`.
  """
  cfg = cfg or MLPConfig()

  def per_example_loss(params, batch):
    return jnp.sum((mlp_apply(params, batch["x"]) - batch["y"]) ** 2, axis=-1)

  def data(*lead):
    return {"x": _Normal((*lead, cfg.batch, cfg.width)), "y": _Normal((*lead, cfg.batch, 1))}

  config = {**dataclasses.asdict(cfg), "seq_len": None, "M": cfg.batch / MLP_BASE_BATCH}
  return _make_task(
    task,
    model=name or _mlp_name(cfg.batch),
    family="mlp",
    T=T,
    batch=cfg.batch,
    param_specs=_mlp_specs(cfg),
    inner_data=data(T),
    outer_data=data(),
    per_example_loss=per_example_loss,
    config=config,
    seed=seed,
    dtype=dtype,
    abstract=abstract,
    optimizer=optimizer,
  )


def _mlp_name(batch: int, base: int = MLP_BASE_BATCH) -> str:
  return f"mlp-M{batch // base}" if batch % base == 0 else f"mlp-B{batch}"


# ---------------------------------------------------------------------------- LM


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes of the transformer language model.

  Attributes:
    vocab: vocabulary size.
    d_model: residual stream width.
    n_layers: number of transformer blocks.
    d_ff: hidden width of the feed-forward blocks.
    n_heads: attention heads (``d_model`` must be divisible by it, and the
      head dimension must be even for RoPE).
    batch: sequences per inner step (and in the held-out batch).
    seq_len: tokens per sequence (inputs; targets are shifted by one).
    attention: ``"mfo"`` (:func:`mixflow_optax.nn.dot_product_attention`,
      blockwise, memory-efficient in every order of differentiation),
      ``"xla"`` (``jax.nn.dot_product_attention(implementation="xla")``) or
      ``"mfo_checkpoint"`` (the same blockwise attention with
      ``differentiation="checkpoint"``: plain JAX, so that a bare ``jax.jvp``
      of the model, i.e. forward-mode meta-gradients, works too).
    block_remat: ``jax.checkpoint`` around each transformer block (1) or not
      (0), as real LLM code does; 2: the same, keeping the ``"mfo"``
      attention's forward results (``mfo.nn.ATTENTION_RESIDUALS``) instead of
      recomputing them.
    attn_block: keys per block of the ``"mfo"`` attention; 0: the
      attention's default for the backend (128 on a CPU, 256 elsewhere).
    loss_chunk: tokens per chunk of the chunked LM head + cross-entropy;
      0: the whole ``(B, S, vocab)`` logits at once.
  """

  vocab: int = 512
  d_model: int = 128
  n_layers: int = 4
  d_ff: int = 512
  n_heads: int = 4
  batch: int = 8
  seq_len: int = 256
  attention: str = "mfo"
  block_remat: int = 1
  attn_block: int = 256
  loss_chunk: int = 0

  @classmethod
  def small(cls) -> LMConfig:
    # Key blocks of 4: the tiny model's attention runs over two of them.
    return cls(
      vocab=16, d_model=8, n_layers=1, d_ff=16, n_heads=2, batch=2, seq_len=8, attn_block=4
    )

  def __post_init__(self):
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ValueError(
        f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
        "into an even head dimension (RoPE rotates pairs of features)."
      )
    if self.attention not in ATTENTIONS:
      raise ValueError(f"unknown attention {self.attention!r}; choose from {list(ATTENTIONS)}.")


def _lm(d: int, layers: int, heads: int) -> LMConfig:
  return LMConfig(d_model=d, n_layers=layers, d_ff=4 * d, n_heads=heads)


#: The transformer ladder: Chinchilla-style shapes (``d_ff = 4 d_model``,
#: depth and width grown together), scaled down to run on a CPU at the small
#: end. All share ``vocab=512, batch=8, seq_len=256``; parameter counts (tied
#: embeddings): xs 0.13M, s 0.85M, m 4.9M, l 25M, xl 85M, 2xl 0.20B, 3xl 0.57B.
LM_LADDER: dict[str, LMConfig] = {
  "lm-xs": _lm(64, 2, 2),
  "lm-s": _lm(128, 4, 4),
  "lm-m": _lm(256, 6, 4),
  "lm-l": _lm(512, 8, 8),
  "lm-xl": _lm(768, 12, 12),
  "lm-2xl": _lm(1024, 16, 16),
  "lm-3xl": _lm(1536, 20, 16),
}


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  return x * inv * scale[None, :]


def _rope(x: jax.Array) -> jax.Array:
  """Rotary position embedding of ``x``: ``(B, S, H, Dh)``, rotating feature pairs (i, i + Dh/2)."""
  _, s, _, dh = x.shape
  half = dh // 2
  freqs = 1.0 / (10000.0 ** (jnp.arange(half, dtype=x.dtype) / half))
  angles = jnp.arange(s, dtype=x.dtype)[:, None] * freqs[None, :]  # (S, Dh/2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention(
  x: jax.Array, layer: dict[str, jax.Array], cfg: LMConfig, b: int, s: int
) -> jax.Array:
  """Causal self-attention of the flat residual stream ``x``: ``(b * s, d)``."""
  d = x.shape[-1]
  dh = d // cfg.n_heads

  def heads(w):
    return (x @ w).reshape(b, s, cfg.n_heads, dh)

  q, k, v = _rope(heads(layer["wq"])), _rope(heads(layer["wk"])), heads(layer["wv"])
  if cfg.attention == "xla":
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  else:
    differentiation = "checkpoint" if cfg.attention == "mfo_checkpoint" else "flash"
    out = _mfo_nn().dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      block_size=cfg.attn_block or None,
      differentiation=differentiation,
    )
  return out.reshape(b * s, d) @ layer["wo"]


def _mfo_nn() -> Any:
  nn = getattr(mfo, "nn", None)
  if nn is None:
    raise ImportError(
      "the LM's default attention needs mixflow_optax.nn; use attention='xla' with this "
      "mixflow_optax version."
    )
  return nn


def _trunk(params: dict[str, Any], tokens: jax.Array, cfg: LMConfig) -> jax.Array:
  """The final hidden states ``(B * S, d_model)`` of integer ``tokens`` ``(B, S)``, flat."""
  b, s = tokens.shape

  # The residual stream is kept flat, (B * S, d_model), so that every dense
  # layer is a plain 2-D matrix product. With (B, S, d) activations the
  # weight gradients contract over two axes, and XLA's CPU backend then
  # writes the elementwise derivative fusions in a transposed layout: the
  # feed-forward block's gradient and Hessian-vector product take about
  # twice as long (measured in docs/benchmarks.md).
  def block(x, layer):
    x = x + _attention(_rms_norm(x, layer["norm_attn"]), layer, cfg, b, s)
    h = _rms_norm(x, layer["norm_ff"])
    return x + jax.nn.gelu(h @ layer["w_in"]) @ layer["w_out"], None

  if cfg.block_remat:
    # Per-block rematerialisation, as in every LLM code base: only the block's
    # input is kept across the layer scan; the rest is recomputed on the way back.
    # block_remat=2: the attention's forward results (output and softmax
    # statistics, named mfo.nn.ATTENTION_RESIDUALS) are kept, so recomputing
    # the block does not run the attention's block loop again.
    policy = None
    if cfg.block_remat == 2 and cfg.attention == "mfo":
      policy = jax.checkpoint_policies.save_only_these_names(_mfo_nn().ATTENTION_RESIDUALS)
    block = jax.checkpoint(block, prevent_cse=False, policy=policy)
  # Layers stacked on a leading axis and scanned over (compile time does not
  # grow with depth), as in most JAX LM code bases.
  x, _ = jax.lax.scan(block, params["embed"][tokens.reshape(-1)], params["layers"])
  return _rms_norm(x, params["norm_final"])


def lm_apply(params: dict[str, Any], tokens: jax.Array, cfg: LMConfig) -> jax.Array:
  """Next-token logits ``(B, S, vocab)`` of integer ``tokens`` ``(B, S)``."""
  # Tied input/output embeddings. Besides saving parameters, this keeps every
  # embedding row's gradient nonzero (the softmax touches every row): an
  # untied input embedding has exactly-zero gradient rows for tokens absent
  # from a batch, where stock optax.adam's sqrt(v) has an infinite derivative
  # and the "standard" baseline's meta-gradient would be NaN.
  b, s = tokens.shape
  return (_trunk(params, tokens, cfg) @ params["embed"].T).reshape(b, s, -1)


def _lm_specs(cfg: LMConfig) -> dict[str, Any]:
  d, f, n = cfg.d_model, cfg.d_ff, cfg.n_layers
  layers = {  # Stacked over layers: leading axis n_layers.
    "norm_attn": _Full((n, d), 1.0),
    "wq": _Normal((n, d, d), 1 / math.sqrt(d)),
    "wk": _Normal((n, d, d), 1 / math.sqrt(d)),
    "wv": _Normal((n, d, d), 1 / math.sqrt(d)),
    "wo": _Normal((n, d, d), 1 / math.sqrt(d * n)),
    "norm_ff": _Full((n, d), 1.0),
    "w_in": _Normal((n, d, f), 1 / math.sqrt(d)),
    "w_out": _Normal((n, f, d), 1 / math.sqrt(f * n)),
  }
  return {
    "embed": _Normal((cfg.vocab, d), 1 / math.sqrt(d)),
    "layers": layers,
    "norm_final": _Full((d,), 1.0),
  }


def _token_ce(params: dict[str, Any], tokens: jax.Array, cfg: LMConfig) -> jax.Array:
  """Per-sequence mean next-token cross-entropy, shape ``(B,)``; ``tokens``: ``(B, S + 1)``."""
  b = tokens.shape[0]
  targets = tokens[:, 1:].reshape(-1)  # Flat, like the hidden states.
  x = _trunk(params, tokens[:, :-1], cfg)
  if cfg.loss_chunk:
    nll = _mfo_nn().chunked_cross_entropy(x, params["embed"].T, targets, chunk_size=cfg.loss_chunk)
  else:
    logp = jax.nn.log_softmax(x @ params["embed"].T, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
  return jnp.mean(nll.reshape(b, -1), axis=-1)


def lm_problem(
  T: int = 4,
  cfg: LMConfig | None = None,
  *,
  task: str = "loss_weighting",
  seed: int = 0,
  dtype: Any = jnp.float32,
  abstract: bool = False,
  name: str = "lm",
  optimizer: str = "adam",
) -> Problem:
  """The transformer LM: next-token prediction on uniformly random token ids.

  Per-example losses are the token-mean cross-entropies of the sequences.

  Args:
    T: number of inner steps.
    cfg: sizes; :class:`LMConfig` defaults if ``None``.
    task: one of :data:`TASKS`.
    seed: PRNG seed of the parameters and the tokens.
    dtype: floating dtype of parameters and meta-parameters.
    abstract: ``jax.ShapeDtypeStruct`` s instead of arrays (compile-only).
    name: the model's name in the results.
    optimizer: the inner optimizer, one of :data:`OPTIMIZERS`.

  Returns:
    A :class:`Problem`.
  """
  cfg = cfg or LMConfig()

  def per_example_loss(params, batch):
    return _token_ce(params, batch["tokens"], cfg)

  def data(*lead):
    return {"tokens": _Ints((*lead, cfg.batch, cfg.seq_len + 1), cfg.vocab)}

  return _make_task(
    task,
    model=name,
    family="lm",
    T=T,
    batch=cfg.batch,
    param_specs=_lm_specs(cfg),
    inner_data=data(T),
    outer_data=data(),
    per_example_loss=per_example_loss,
    config={**dataclasses.asdict(cfg), "M": None},
    seed=seed,
    dtype=dtype,
    abstract=abstract,
    optimizer=optimizer,
  )


#: Problem constructors and size classes by model family.
MODELS: dict[str, tuple[Callable[..., Problem], type]] = {
  "mlp": (mlp_problem, MLPConfig),
  "lm": (lm_problem, LMConfig),
}


def model_config(model: str, *, small: bool = False) -> tuple[str, Any]:
  """The family and sizes of a model name.

  Args:
    model: ``"lm"`` (= ``"lm-s"``), a :data:`LM_LADDER` name (``-naive``
      appended: :data:`NAIVE` sizes), ``"mlp"`` (= ``"mlp-M16"``) or
      ``"mlp-M<M>"`` (batch ``128 M``).
    small: the tiny sizes of smoke runs and tests instead (``Config.small()``;
      the MLP batch is still ``M`` times a base, 4 examples, and the ladder
      doubles the width from ``lm-xs`` = ``LMConfig.small()`` on).

  Returns:
    ``(family, config)``.
  """
  base, naive = (model[: -len("-naive")], True) if model.endswith("-naive") else (model, False)
  if base in ("lm", *LM_LADDER):
    name = "lm-s" if base == "lm" else base
    if small:
      # A tiny ladder of the same length: widths 8, 16, 32, ... (lm-xs is LMConfig.small()).
      d = LMConfig.small().d_model * 2 ** list(LM_LADDER).index(name)
      cfg = dataclasses.replace(LMConfig.small(), d_model=d, d_ff=2 * d)
    else:
      cfg = LM_LADDER[name]
    return "lm", dataclasses.replace(cfg, **NAIVE) if naive else cfg
  match = re.fullmatch(r"mlp(?:-M(\d+))?", model)
  if match:
    m = int(match.group(1) or 16)
    if small:
      return "mlp", dataclasses.replace(MLPConfig.small(), batch=4 * m)
    return "mlp", MLPConfig(batch=MLP_BASE_BATCH * m)
  raise ValueError(
    f"unknown model {model!r}; choose from 'mlp', 'mlp-M<M>' (e.g. mlp-M16), 'lm' "
    f"or {', '.join(LM_LADDER)} (with '-naive' for XLA attention without per-block remat)."
  )


def _lm_name(model: str, cfg: LMConfig, base: LMConfig) -> str:
  """``lm-s``, ``lm-s-naive``, ``lm-s-xla``, ``lm-s-noremat``, ``lm-s-v32k-chunked``, ..."""
  name = "lm-s" if model in ("lm", "lm-naive") else model.removesuffix("-naive")
  if cfg.attention == "xla":
    name += "-naive" if not cfg.block_remat else "-xla"
  elif not cfg.block_remat:
    name += "-noremat"
  if cfg.vocab != base.vocab:
    name += f"-v{cfg.vocab // 1024}k" if cfg.vocab % 1024 == 0 else f"-v{cfg.vocab}"
  return name + ("-chunked" if cfg.loss_chunk else "")


def make_problem(
  model: str,
  T: int,
  *,
  task: str = "loss_weighting",
  small: bool = False,
  seed: int = 0,
  dtype: Any = jnp.float32,
  abstract: bool = False,
  optimizer: str = "adam",
  **sizes: int,
) -> Problem:
  """Builds ``task`` on ``model`` with ``T`` inner steps.

  Args:
    model: a model name (see :func:`model_config`): ``"mlp"``,
      ``"mlp-M<M>"``, ``"lm"`` or a :data:`LM_LADDER` name.
    T: number of inner steps.
    task: one of :data:`TASKS`.
    small: start from the tiny sizes used for smoke runs and tests.
    seed: PRNG seed.
    dtype: floating dtype.
    abstract: ``jax.ShapeDtypeStruct`` s instead of arrays (compile-only).
    optimizer: the inner optimizer, one of :data:`OPTIMIZERS`.
    **sizes: overrides of :class:`MLPConfig` / :class:`LMConfig` fields,
      e.g. ``batch=128``.

  Returns:
    A :class:`Problem`.

  Examples:
    >>> p = make_problem("mlp", T=2, small=True, batch=4)
    >>> p.meta_params.shape, p.inner_batches["x"].shape
    ((2, 4), (2, 4, 8))
    >>> p = make_problem("lm-xl", T=8, task="maml", abstract=True)
    >>> p.config["n_params"], p.params is None
    (85347072, True)
    >>> make_problem("mlp", T=2, small=True, optimizer="lion").optimizer
    'lion'
  """
  if T < 1:
    raise ValueError(f"T must be a positive number of inner steps, got {T}.")
  family, cfg = model_config(model, small=small)
  fields = [f.name for f in dataclasses.fields(cfg)]
  unknown = sorted(set(sizes) - set(fields))
  if unknown:
    raise ValueError(f"unknown {family} sizes {unknown}; choose from {fields}.")
  cfg = dataclasses.replace(cfg, **sizes)
  ctor = MODELS[family][0]
  name = model
  if family == "mlp":
    name = _mlp_name(cfg.batch, base=4 if small else MLP_BASE_BATCH)
  else:
    name = _lm_name(model, cfg, base=model_config(model, small=small)[1])
  return ctor(
    T, cfg, task=task, seed=seed, dtype=dtype, abstract=abstract, name=name, optimizer=optimizer
  )
