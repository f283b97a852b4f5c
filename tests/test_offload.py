"""offload_carries: the stored inner carries in host memory, the meta-gradient unchanged.

On the CPU backend the device memory is host memory and XLA's CPU lowering
drops the placement, so these tests check what is the same on every backend:
the meta-gradient (float64, against plain BPTT through stock optax) and the
program JAX hands to XLA (every stored carry is a ``pinned_host`` array).
"""

from __future__ import annotations

import re
from unittest import mock

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo
from mixflow_optax import _placement

T = 6


def _inner_loss(params, meta, batch):
  del meta
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def _problem():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (5, 7)), "v": jax.random.normal(k[1], (7, 1))}
  batches = (jax.random.normal(k[2], (T, 3, 5)), jax.random.normal(k[3], (T, 3, 1)))
  return jnp.log(jnp.asarray(3e-2)), params, batches


def _hp(log_lr):
  return {"learning_rate": jnp.exp(log_lr)}


def _outer(params, batches):
  return _inner_loss(params, None, jax.tree.map(lambda b: b[0], batches))


def _meta_grad(**kwargs):
  opt = mfo.transforms.adam(1.0)
  run = mfo.unroll(_inner_loss, opt, hyperparams_fn=_hp, **kwargs)

  def meta_loss(log_lr, params, batches):
    params_T, _ = run(log_lr, params, opt.init(params), batches)
    return _outer(params_T, batches)

  return jax.grad(meta_loss, argnums=(0, 1))


def _bptt_meta_grad(log_lr, params, batches):
  """Plain BPTT through stock optax.adam: the reference."""

  def meta_loss(log_lr, params):
    opt = optax.adam(jnp.exp(log_lr))

    def step(carry, batch):
      p, s = carry
      g = jax.grad(_inner_loss)(p, None, batch)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params_T, _), _ = jax.lax.scan(step, (params, opt.init(params)), batches)
    return _outer(params_T, batches)

  return jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(log_lr, params)


def _stacks(jaxpr: str, shape: tuple[int, ...]) -> dict[str, int]:
  """How many float64 arrays of ``shape`` the program names, on the device and on the host."""
  dims = ",".join(map(str, shape))
  return {
    "device": len(re.findall(rf"f64\[{dims}\]", jaxpr)),
    "host": len(re.findall(rf"f64<host>\[{dims}\]", jaxpr)),
  }


class OffloadTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    ("mixflow", "mixflow", None),
    ("standard", "standard", None),
    ("mixflow_nested_checkpoints", "mixflow", (4, 2)),
  )
  def test_meta_gradient_is_exact(self, mode, checkpoint_every):
    log_lr, params, batches = _problem()
    got = jax.jit(_meta_grad(mode=mode, offload_carries=True, checkpoint_every=checkpoint_every))(
      log_lr, params, batches
    )
    chex.assert_trees_all_close(got, _bptt_meta_grad(log_lr, params, batches), rtol=1e-11)

  @parameterized.named_parameters(("offloaded", True), ("on_device", False))
  def test_stored_carries_live_in_host_memory(self, offload):
    log_lr, params, batches = _problem()
    # Without saved inner gradients the stored stacks of shape (T, 5, 7) are
    # the carries: the parameter w and Adam's two moments of it.
    grad_fn = _meta_grad(offload_carries=offload, save_inner_grads=False)
    stacks = _stacks(str(jax.make_jaxpr(grad_fn)(log_lr, params, batches)), (T, 5, 7))
    if offload:
      self.assertEqual(stacks["device"], 0, stacks)
      self.assertGreater(stacks["host"], 0, stacks)
    else:
      self.assertGreater(stacks["device"], 0, stacks)
      self.assertEqual(stacks["host"], 0, stacks)

  def test_segment_carries_live_in_host_memory(self):
    log_lr, params, batches = _problem()
    # checkpoint_every=2: T / 2 = 3 segment carries, 2 step carries per segment.
    grad_fn = _meta_grad(offload_carries=True, save_inner_grads=False, checkpoint_every=2)
    jaxpr = str(jax.make_jaxpr(grad_fn)(log_lr, params, batches))
    for shape in ((3, 5, 7), (2, 5, 7)):
      stacks = _stacks(jaxpr, shape)
      self.assertEqual(stacks["device"], 0, (shape, stacks))
      self.assertGreater(stacks["host"], 0, (shape, stacks))

  def test_meta_optimizer_step_is_unchanged(self):
    log_lr, params, batches = _problem()
    outer = jax.tree.map(lambda b: b[0], batches)

    def step(**kwargs):
      mo = mfo.meta_optimizer(
        _inner_loss,
        _inner_loss,
        mfo.transforms.adam(1.0),
        optax.adam(1e-2),
        hyperparams_fn=_hp,
        **kwargs,
      )
      state = mo.init(log_lr, params)
      return jax.jit(mo.step)(state, batches, outer)

    chex.assert_trees_all_close(step(offload_carries=True), step(), rtol=1e-13, atol=1e-15)

  def test_needs_remat(self):
    with self.assertRaisesRegex(ValueError, "remat=True"):
      mfo.unroll(_inner_loss, mfo.transforms.adam(1.0), remat=False, offload_carries=True)

  def test_backend_without_host_memory_raises(self):
    log_lr, params, batches = _problem()
    with mock.patch.object(_placement, "_memory_kinds", return_value={"device"}):
      with self.assertRaisesRegex(ValueError, "'pinned_host' memory kind"):
        jax.make_jaxpr(_meta_grad(offload_carries=True))(log_lr, params, batches)


if __name__ == "__main__":
  absltest.main()
