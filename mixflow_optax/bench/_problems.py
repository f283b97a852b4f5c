r"""Benchmark problems: learned loss weights through T inner Adam steps.

Each problem is a bilevel loss-weighting task (one of the paper's benchmark
tasks). The meta-parameters :math:`\eta \in \mathbb{R}^{T \times B}` are one
logit per inner training example (MLP) or per inner training sequence (LM):

.. math::

  L(\theta_t, \eta, x_t) = \frac{1}{B} \sum_{i=1}^{B}
    \sigma(\eta_{t,i})\, \ell_i(\theta_t, x_t), \qquad
  V(\theta_T, x_{val}) = \frac{1}{B} \sum_{i=1}^{B} \ell_i(\theta_T, x_{val}),

with the inner parameters trained by Adam for T steps. Step ``t`` picks its
row of :math:`\eta` through an integer ``"step"`` leaf of its batch, so that
the whole :math:`\eta` is a single meta-parameter array shared by all steps.

Two models:

- ``"mlp"``: a deep tanh MLP (16 layers of width 64, batch 4096) regressing
  random targets: the toy of the paper, whose per-step activations dwarf its
  parameters.
- ``"lm"``: a small pre-RMSNorm causal transformer language model with rotary
  position embeddings (RoPE), next-token cross-entropy on synthetic token ids.

Both are pure functional JAX (parameters are dicts of arrays), so they jit,
scan and differentiate in every mode without wrappers. All shapes broadcast
explicitly (the test suite runs with ``jax_numpy_rank_promotion="raise"``).

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 5: loss weighting
  of transformer LMs with RoPE, and the MLP toy).
  Su et al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
  <https://arxiv.org/abs/2104.09864>`_, 2021.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "MLPConfig",
  "LMConfig",
  "Problem",
  "MODELS",
  "make_problem",
  "mlp_problem",
  "lm_problem",
]

#: The task every problem here solves (recorded in the benchmark results).
TASK = "loss_weighting"


class Problem(NamedTuple):
  """A meta-learning problem: everything a meta-gradient method needs.

  Attributes:
    name: model name (``"mlp"`` or ``"lm"``).
    task: the meta-learning task (``"loss_weighting"``).
    T: number of inner steps.
    params: initial inner parameters :math:`\\theta_0` (a dict of arrays).
    meta_params: meta-parameters :math:`\\eta`, shape ``(T, B)`` (zeros:
      every example starts with weight :math:`\\sigma(0) = 1/2`).
    inner_batches: pytree of arrays with leading axis ``T``; it includes an
      int32 ``"step"`` leaf ``arange(T)``.
    outer_batch: the held-out batch of the outer loss.
    inner_loss: ``inner_loss(params, meta_params, batch) -> scalar``.
    outer_loss: ``outer_loss(params, batch) -> scalar``.
    learning_rate: the inner Adam learning rate.
    config: the model's sizes (a dict, recorded in the results).
  """

  name: str
  task: str
  T: int
  params: Any
  meta_params: jax.Array
  inner_batches: Any
  outer_batch: Any
  inner_loss: Callable[[Any, jax.Array, Any], jax.Array]
  outer_loss: Callable[[Any, Any], jax.Array]
  learning_rate: float
  config: dict[str, Any]


def _step_weights(meta_params: jax.Array, step: jax.Array) -> jax.Array:
  """The loss weights :math:`\\sigma(\\eta_t)` of inner step ``step``, shape ``(B,)``."""
  return jax.nn.sigmoid(jax.lax.dynamic_index_in_dim(meta_params, step, axis=0, keepdims=False))


def _count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _to_jax(tree: Any, dtype: Any) -> Any:
  """NumPy tree -> JAX arrays; floating leaves cast to ``dtype``.

  Problems are generated with NumPy (seeded ``np.random.default_rng``):
  unlike eager ``jax.random`` calls, this compiles nothing, which keeps
  building a problem instant in tests.
  """

  def leaf(x):
    return jnp.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)

  return jax.tree.map(leaf, tree)


# --------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Sizes of the MLP toy.

  Attributes:
    width: input and hidden width.
    depth: number of tanh layers (``width x width``), followed by a linear
      readout to ``out_dim``.
    batch: examples per inner step (and in the held-out batch).
    out_dim: regression target dimension.
  """

  width: int = 64
  depth: int = 16
  batch: int = 4096
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

  # The hidden layers are stacked on a leading axis and scanned over, as
  # deep models usually are in JAX: compile time does not grow with depth.
  h, _ = jax.lax.scan(layer, x, params["hidden"])
  return _dense(h, params["readout"])


def _mlp_init(rng: np.random.Generator, cfg: MLPConfig) -> dict[str, Any]:
  def layer(n_in, n_out, lead=()):
    # LeCun-normal, so that the signal neither explodes nor dies through tanh.
    w = rng.standard_normal((*lead, n_in, n_out)) / math.sqrt(n_in)
    return {"w": w, "b": np.zeros((*lead, n_out))}

  return {
    "hidden": layer(cfg.width, cfg.width, lead=(cfg.depth,)),
    "readout": layer(cfg.width, cfg.out_dim),
  }


def mlp_problem(
  T: int = 4,
  cfg: MLPConfig | None = None,
  *,
  seed: int = 0,
  learning_rate: float = 1e-3,
  dtype: Any = jnp.float32,
) -> Problem:
  """The MLP toy: per-example loss weights for regression to random targets.

  Inner loss: :math:`\\frac1B\\sum_i \\sigma(\\eta_{t,i})\\,\\|f_\\theta(x_i) -
  y_i\\|^2`; outer loss: the unweighted mean squared error on a held-out batch.

  Args:
    T: number of inner steps.
    cfg: sizes; :class:`MLPConfig` defaults if ``None``.
    seed: PRNG seed of the parameters and the data.
    learning_rate: inner Adam learning rate.
    dtype: floating dtype of parameters, data and meta-parameters.

  Returns:
    A :class:`Problem`.
  """
  cfg = cfg or MLPConfig()
  rng = np.random.default_rng(seed)
  params = _to_jax(_mlp_init(rng, cfg), dtype)
  inner_batches = _to_jax(
    {
      "x": rng.standard_normal((T, cfg.batch, cfg.width)),
      "y": rng.standard_normal((T, cfg.batch, cfg.out_dim)),
      "step": np.arange(T, dtype=np.int32),
    },
    dtype,
  )
  outer_batch = _to_jax(
    {
      "x": rng.standard_normal((cfg.batch, cfg.width)),
      "y": rng.standard_normal((cfg.batch, cfg.out_dim)),
    },
    dtype,
  )

  def per_example_error(params, batch):
    return jnp.sum((mlp_apply(params, batch["x"]) - batch["y"]) ** 2, axis=-1)

  def inner_loss(params, meta_params, batch):
    w = _step_weights(meta_params, batch["step"])
    return jnp.mean(w * per_example_error(params, batch))

  def outer_loss(params, batch):
    return jnp.mean(per_example_error(params, batch))

  config = dataclasses.asdict(cfg)
  config["n_params"] = _count(params)
  return Problem(
    name="mlp",
    task=TASK,
    T=T,
    params=params,
    meta_params=_to_jax(np.zeros((T, cfg.batch)), dtype),
    inner_batches=inner_batches,
    outer_batch=outer_batch,
    inner_loss=inner_loss,
    outer_loss=outer_loss,
    learning_rate=learning_rate,
    config=config,
  )


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
  """

  vocab: int = 512
  d_model: int = 128
  n_layers: int = 4
  d_ff: int = 512
  n_heads: int = 4
  batch: int = 8
  seq_len: int = 256

  @classmethod
  def small(cls) -> LMConfig:
    return cls(vocab=16, d_model=8, n_layers=1, d_ff=16, n_heads=2, batch=2, seq_len=8)

  def __post_init__(self):
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ValueError(
        f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
        "into an even head dimension (RoPE rotates pairs of features)."
      )


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  return x * inv * scale[None, None, :]


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


def _attention(x: jax.Array, layer: dict[str, jax.Array], n_heads: int) -> jax.Array:
  b, s, d = x.shape
  dh = d // n_heads

  def heads(w):
    return (x @ w).reshape(b, s, n_heads, dh)

  q, k, v = _rope(heads(layer["wq"])), _rope(heads(layer["wk"])), heads(layer["wv"])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
  causal = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None, :, :]
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
  return out @ layer["wo"]


def lm_apply(params: dict[str, Any], tokens: jax.Array, cfg: LMConfig) -> jax.Array:
  """Next-token logits ``(B, S, vocab)`` of integer ``tokens`` ``(B, S)``."""

  def block(x, layer):
    x = x + _attention(_rms_norm(x, layer["norm_attn"]), layer, cfg.n_heads)
    h = _rms_norm(x, layer["norm_ff"])
    return x + jax.nn.gelu(h @ layer["w_in"]) @ layer["w_out"], None

  # Layers stacked on a leading axis and scanned over (compile time does not
  # grow with depth), as in most JAX LM code bases.
  x, _ = jax.lax.scan(block, params["embed"][tokens], params["layers"])
  x = _rms_norm(x, params["norm_final"])
  # Tied input/output embeddings. Besides saving parameters, this keeps every
  # embedding row's gradient nonzero (the softmax touches every row): an
  # untied input embedding has exactly-zero gradient rows for tokens absent
  # from a batch, where stock optax.adam's sqrt(v) has an infinite derivative
  # and the "standard" baseline's meta-gradient would be NaN.
  return x @ params["embed"].T


def _lm_init(rng: np.random.Generator, cfg: LMConfig) -> dict[str, Any]:
  d, f, n = cfg.d_model, cfg.d_ff, cfg.n_layers

  def normal(shape, fan_in):
    return rng.standard_normal(shape) / math.sqrt(fan_in)

  layers = {  # Stacked over layers: leading axis n_layers.
    "norm_attn": np.ones((n, d)),
    "wq": normal((n, d, d), d),
    "wk": normal((n, d, d), d),
    "wv": normal((n, d, d), d),
    "wo": normal((n, d, d), d * n),
    "norm_ff": np.ones((n, d)),
    "w_in": normal((n, d, f), d),
    "w_out": normal((n, f, d), f * n),
  }
  return {"embed": normal((cfg.vocab, d), d), "layers": layers, "norm_final": np.ones((d,))}


def _token_ce(params: dict[str, Any], tokens: jax.Array, cfg: LMConfig) -> jax.Array:
  """Per-sequence mean next-token cross-entropy, shape ``(B,)``; ``tokens``: ``(B, S + 1)``."""
  logits = lm_apply(params, tokens[:, :-1], cfg)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(nll, axis=-1)


def lm_problem(
  T: int = 4,
  cfg: LMConfig | None = None,
  *,
  seed: int = 0,
  learning_rate: float = 1e-3,
  dtype: Any = jnp.float32,
) -> Problem:
  """The transformer LM: per-sequence loss weights for next-token prediction.

  Inner loss: :math:`\\frac1B\\sum_i \\sigma(\\eta_{t,i})\\,\\mathrm{CE}_i`
  with :math:`\\mathrm{CE}_i` the token-mean cross-entropy of sequence i;
  outer loss: the plain cross-entropy of a held-out batch. Tokens are
  uniformly random ids from a seeded NumPy generator (no downloads).

  Args:
    T: number of inner steps.
    cfg: sizes; :class:`LMConfig` defaults if ``None``.
    seed: PRNG seed of the parameters and the tokens.
    learning_rate: inner Adam learning rate.
    dtype: floating dtype of parameters and meta-parameters.

  Returns:
    A :class:`Problem`.
  """
  cfg = cfg or LMConfig()
  rng = np.random.default_rng(seed)
  params = _to_jax(_lm_init(rng, cfg), dtype)
  shape = (cfg.batch, cfg.seq_len + 1)
  inner_batches = _to_jax(
    {
      "tokens": rng.integers(0, cfg.vocab, (T, *shape), dtype=np.int32),
      "step": np.arange(T, dtype=np.int32),
    },
    dtype,
  )
  outer_batch = _to_jax({"tokens": rng.integers(0, cfg.vocab, shape, dtype=np.int32)}, dtype)

  def inner_loss(params, meta_params, batch):
    w = _step_weights(meta_params, batch["step"])
    return jnp.mean(w * _token_ce(params, batch["tokens"], cfg))

  def outer_loss(params, batch):
    return jnp.mean(_token_ce(params, batch["tokens"], cfg))

  config = dataclasses.asdict(cfg)
  config["n_params"] = _count(params)
  return Problem(
    name="lm",
    task=TASK,
    T=T,
    params=params,
    meta_params=_to_jax(np.zeros((T, cfg.batch)), dtype),
    inner_batches=inner_batches,
    outer_batch=outer_batch,
    inner_loss=inner_loss,
    outer_loss=outer_loss,
    learning_rate=learning_rate,
    config=config,
  )


#: Problem constructors by model name.
MODELS: dict[str, tuple[Callable[..., Problem], type]] = {
  "mlp": (mlp_problem, MLPConfig),
  "lm": (lm_problem, LMConfig),
}


def make_problem(
  model: str,
  T: int,
  *,
  small: bool = False,
  seed: int = 0,
  dtype: Any = jnp.float32,
  **sizes: int,
) -> Problem:
  """Builds the problem ``model`` (``"mlp"`` or ``"lm"``) with ``T`` inner steps.

  Args:
    model: ``"mlp"`` or ``"lm"``.
    T: number of inner steps.
    small: start from the tiny sizes (``Config.small()``) used for smoke
      runs and tests instead of the benchmark sizes.
    seed: PRNG seed.
    dtype: floating dtype.
    **sizes: overrides of :class:`MLPConfig` / :class:`LMConfig` fields,
      e.g. ``batch=128``.

  Returns:
    A :class:`Problem`.

  Examples:
    >>> p = make_problem("mlp", T=2, small=True, batch=4)
    >>> p.meta_params.shape, p.inner_batches["x"].shape
    ((2, 4), (2, 4, 8))
  """
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}.")
  if T < 1:
    raise ValueError(f"T must be a positive number of inner steps, got {T}.")
  ctor, cfg_cls = MODELS[model]
  cfg = cfg_cls.small() if small else cfg_cls()
  cfg = dataclasses.replace(cfg, **sizes)
  return ctor(T, cfg, seed=seed, dtype=dtype)
