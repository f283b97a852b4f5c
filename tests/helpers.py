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

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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
