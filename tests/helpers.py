"""Shared test bases, tiny problems and memory measurement under default XLA flags.

- ``TestCase``: absltest/parameterized base for every test class.
- ``F64TestCase``: the same, with 64-bit floats enabled for each test (the float64 base of the
  exactness tests).
- ``weighted_mlp_loss`` / ``mlp_problem`` / ``lr_hyperparams``: the canonical tiny meta-learning
  problem (a one-hidden-layer tanh MLP with learned per-example loss weights and a learned log
  learning rate).
- ``default_flags_memory``: compiled memory of a function as a user gets it. The root
  conftest.py sets fast-compile XLA flags for the test session; they change compiled memory
  (XLA's fusion decisions), so every memory or ordering claim is checked with the defaults
  restored for that one compilation.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import mixflow_optax as mfo

# XLA's defaults for the flags the root conftest.py changes for speed (tests/test_repo.py checks
# that the two lists name the same flags). Passed as per-compilation options, they override the
# XLA_FLAGS environment variable: the compiled memory is then the same as in a process started
# without XLA_FLAGS (checked against one: 2.48 vs 2.48 MiB where the fast flags give 2.91).
DEFAULT_XLA_OPTIONS = {
  "xla_cpu_use_fusion_emitters": True,
  "xla_backend_optimization_level": 3,
}


class TestCase(parameterized.TestCase):
  """Base class of the suite's tests."""


class F64TestCase(TestCase):
  """Runs every test with 64-bit floats enabled (a context, not a global flip)."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))


def default_flags_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> mfo.CompiledMemory:
  """``mfo.compiled_memory(fn, *args)`` compiled with XLA's default flags, as users compile it."""
  return mfo.compiled_memory(fn, *args, compiler_options=DEFAULT_XLA_OPTIONS, **kwargs)


def user_xla_flags(flags: str | None = None) -> str:
  """``XLA_FLAGS`` without the fast-compile flags of the root conftest.py (for subprocesses)."""
  flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
  pattern = r"--(" + "|".join(DEFAULT_XLA_OPTIONS) + r")=\S*"
  return " ".join(re.sub(pattern, "", flags).split())


def weighted_mlp_loss(params, meta, batch):
  """Inner loss: squared error of a tanh MLP, weighted per example by ``sigmoid(logits)``."""
  x, y = batch
  pred = jnp.tanh(x @ params["w"]) @ params["v"]
  return jnp.mean(jax.nn.sigmoid(meta["logits"]) * (pred - y) ** 2)


def mlp_problem(T: int = 3, batch: int = 4, features: int = 2, hidden: int = 3, seed: int = 3):
  """``(params, meta, batches)`` for ``weighted_mlp_loss``; batches have a leading axis T."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {
    "w": jax.random.normal(k[0], (features, hidden)),
    "v": jax.random.normal(k[1], (hidden,)),
  }
  batches = (jax.random.normal(k[2], (T, batch, features)), jax.random.normal(k[3], (T, batch)))
  meta = {"logits": jax.random.normal(k[4], (batch,)), "log_lr": jnp.log(0.1)}
  return params, meta, batches


def lr_hyperparams(meta):
  """``hyperparams_fn`` mapping ``meta["log_lr"]`` to a positive learning rate."""
  return {"learning_rate": jnp.exp(meta["log_lr"])}


# ---------------------------------------------------------------------------
# Utilities of the transform conformance tests.
# ---------------------------------------------------------------------------

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "f64": jnp.float64}
"""Parameter dtypes of the dtype-preservation tests, by test-id suffix."""

TIGHT = dict(rtol=1e-12, atol=1e-12)
"""Tolerances of float64 comparisons that must agree to rounding."""


def named_product(**axes):
  """Like ``parameterized.product``, with readable ``a_b`` test ids."""
  keys = list(axes)
  return tuple(
    {"testcase_name": "_".join(values), **dict(zip(keys, values))}
    for values in itertools.product(*axes.values())
  )


def named_grid(**axes):
  """Like ``parameterized.product`` over axes given as ``{id part: value}`` dicts, readable ids."""
  keys = list(axes)
  return tuple(
    {"testcase_name": "_".join(parts), **{k: axes[k][p] for k, p in zip(keys, parts)}}
    for parts in itertools.product(*axes.values())
  )


def central_fd(f, x, h):
  """Central finite difference ``(f(x + h) - f(x - h)) / 2h`` of a scalar function."""
  return (f(x + h) - f(x - h)) / (2 * h)


# A tiny problem: one tanh layer, 4 examples, 3 inputs, 2 outputs.


def layer_params(dtype=jnp.float64):
  """Fixed parameters ``{"w": (3, 2), "b": (2,)}`` of the one-layer problem."""
  rng = np.random.RandomState(0)
  return {
    "w": jnp.asarray(0.5 * rng.normal(size=(3, 2)), dtype),
    "b": jnp.asarray([0.1, -0.2], dtype),
  }


def _layer_predict(params, x):
  return jnp.tanh(x @ params["w"] + params["b"][None, :])


def layer_batch(dtype=jnp.float64, zeros="none"):
  """A fixed ``(x, y)`` batch of the one-layer problem.

  ``zeros="some"``: a dead input, so ``grad w[2, :]`` is exactly 0 at every
  step. ``zeros="all"``: zero inputs and targets, so with a zero bias the
  whole gradient is exactly 0 (exactly, also under jit: tanh(0) = 0)."""
  rng = np.random.RandomState(1)
  x = rng.normal(size=(4, 3))
  y = 0.5 * rng.normal(size=(4, 2))
  if zeros == "some":
    x[:, 2] = 0.0
  if zeros == "all":
    x[:], y[:] = 0.0, 0.0
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def layer_loss(params, batch):
  """Mean squared error of the one-layer problem."""
  x, y = batch
  return jnp.mean((_layer_predict(params, x) - y) ** 2)


def step(opt, params, state, batch, **update_kwargs):
  """One optimizer step on ``layer_loss``; returns ``(params, state)``."""
  grads = jax.grad(layer_loss)(params, batch)
  updates, state = opt.update(grads, state, params, **update_kwargs)
  return optax.apply_updates(params, updates), state


def run(opt, params, batch, steps, **update_kwargs):
  """Runs ``steps`` eager optimizer steps; returns every iterate and the final state.

  Eager on purpose: for a handful of steps on this tiny problem, dispatching
  cached primitives costs far less than compiling.
  """
  state = opt.init(params)
  iterates = []
  for _ in range(steps):
    params, state = step(opt, params, state, batch, **update_kwargs)
    iterates.append(params)
  return iterates, state


def run_pair(opt, ref, params, batch, steps, *, wrap=lambda fn: fn):
  """Runs ``opt`` and ``ref`` side by side under one ``jax.jit`` (one compile)."""

  @jax.jit
  @wrap
  def pair_step(pa, sa, pb, sb):
    return step(opt, pa, sa, batch) + step(ref, pb, sb, batch)

  pa, sa, pb, sb = params, opt.init(params), params, ref.init(params)
  iterates, ref_iterates = [], []
  for _ in range(steps):
    pa, sa, pb, sb = pair_step(pa, sa, pb, sb)
    iterates.append(pa)
    ref_iterates.append(pb)
  return (iterates, sa), (ref_iterates, sb)


def grad_sequence(n=3, dtype=jnp.float64):
  """Fixed gradient pytrees (independent of the parameters), global norm ~3."""
  rng = np.random.RandomState(2)
  return [
    {
      "w": jnp.asarray(rng.normal(size=(3, 2)), dtype),
      "b": jnp.asarray(rng.normal(size=(2,)), dtype),
    }
    for _ in range(n)
  ]


def updates_for(opt, grads_seq, params=None, **update_kwargs):
  """Updates of ``opt`` for a fixed gradient sequence (parameters move)."""
  params = layer_params() if params is None else params
  state = opt.init(params)
  out = []
  for g in grads_seq:
    u, state = opt.update(g, state, params, **update_kwargs)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


def weighted_sum(tree_list):
  """A fixed, non-symmetric linear functional of a list of update pytrees."""
  total = 0.0
  for i, tree in enumerate(tree_list):
    for j, leaf in enumerate(jax.tree.leaves(tree)):
      w = jnp.arange(1, leaf.size + 1, dtype=leaf.dtype).reshape(leaf.shape)
      total = total + jnp.sum(jnp.sin(w + 3 * i + j) * leaf)
  return total


# ---------------------------------------------------------------------------
# The exactness problem: meta-gradients through a two-layer MLP trained by unrolled steps.
# ---------------------------------------------------------------------------

LR = 0.05
"""Inner learning rate of the exactness problem (and the initial value of a learned one)."""


def _exactness_mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return h @ params["w2"]


def _per_example(params, batch):
  x, y = batch
  return jnp.mean((_exactness_mlp(params, x) - y) ** 2, axis=-1)


def exactness_problem(T, seed=0):
  """``(params, (xs, ys), outer)``: 3-4-2 MLP, T inner batches of 5, an outer batch of 7."""
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  params = {
    "w1": jax.random.normal(k[0], (3, 4)),
    "b1": 0.1 * jax.random.normal(k[1], (4,)),
    "w2": jax.random.normal(k[2], (4, 2)),
  }
  xs = jax.random.normal(k[3], (T, 5, 3))
  ys = jax.random.normal(k[4], (T, 5, 2))
  outer = (jax.random.normal(k[5], (7, 3)), jnp.ones((7, 2)))
  return params, (xs, ys), outer


def inner_loss(weighted=False):
  """Inner loss ``(params, meta, batch)``; ``weighted``: each example by ``sigmoid(meta["logits"])``."""

  def inner_loss(params, meta, batch):
    per_ex = _per_example(params, batch)
    if weighted:
      return jnp.mean(jax.nn.sigmoid(meta["logits"]) * per_ex)
    return jnp.mean(per_ex)

  return inner_loss


def outer_loss(params, outer):
  """Outer (validation) loss of the exactness problem."""
  return jnp.mean(_per_example(params, outer))


def unroll_meta_loss(opt, loss, hyperparams_fn, mode, *, remat=True):
  """Meta-loss of the exactness problem through ``mfo.unroll`` with the mfo optimizer ``opt``.

  ``remat`` sets both ``remat`` and ``save_inner_grads``.
  """
  run = mfo.unroll(
    loss,
    opt,
    hyperparams_fn=hyperparams_fn,
    mode=mode,
    remat=remat,
    save_inner_grads=remat,
  )

  def meta_loss(meta, params0, batches, outer):
    params, _ = run(meta, params0, opt.init(params0), batches)
    return outer_loss(params, outer)

  return meta_loss


def recording_opt():
  """An outer optimizer that makes no update and keeps the last meta-gradient in its state."""
  return optax.GradientTransformation(
    lambda p: jax.tree.map(jnp.zeros_like, p),
    lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
  )


def forward_meta_gradient(opt, loss, hyperparams_fn, meta, params0, batches, outer):
  """``d outer_loss / d (meta, params0)`` by ``mfo.meta_optimizer(..., mode="forward")``.

  One meta-step from a learned initialisation ``params0`` (``init_params_fn``), so that forward
  mode, like reverse mode, gives the gradient with respect to both.
  """
  hp = None if hyperparams_fn is None else (lambda m: hyperparams_fn(m["meta"]))
  mo = mfo.meta_optimizer(
    lambda p, m, b: loss(p, m["meta"], b),
    lambda p, m, b: outer_loss(p, b),
    opt,
    recording_opt(),
    hyperparams_fn=hp,
    mode="forward",
    init_params_fn=lambda m: m["params0"],
  )
  state, _ = jax.jit(mo.step)(mo.init({"meta": meta, "params0": params0}), batches, outer)
  return state.outer_state["meta"], state.outer_state["params0"]


def bptt_meta_loss(stock, loss, *, first_order=False):
  """Plain BPTT reference: ``jax.grad`` inside a ``lax.scan`` of stock optax steps.

  ``stock(meta) -> (optimizer, scale)`` builds the stock optax optimizer from the (traced)
  meta-parameters; ``scale`` (or None) multiplies its updates leaf by leaf (per-parameter rates
  as the last, linear factor). ``first_order``: the inner gradient is a constant
  (``stop_gradient``), the first-order approximation ``mode="first_order"`` computes.
  """

  def meta_loss(meta, params0, batches, outer):
    opt, scale = stock(meta)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(loss)(params, meta, batch)
      if first_order:
        grads = jax.lax.stop_gradient(grads)
      updates, state = opt.update(grads, state, params)
      if scale is not None:
        updates = jax.tree.map(jnp.multiply, updates, scale)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params0, opt.init(params0)), batches)
    return outer_loss(params, outer)

  return meta_loss


def max_rel_err(a, b):
  """Largest absolute difference of two pytrees, relative to the largest entry of ``b``."""
  num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
  return num / max(den, 1e-300)
