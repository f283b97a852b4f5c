r"""Where the unrolled loop's arrays live: sharding of fresh states, host offloading of carries.

- :func:`shard_like_params`: an optimizer state built inside :func:`jax.jit` from
  the parameters (``inner_opt.init(params)``, e.g. MAML's re-initialisation)
  is made of fresh zeros whose sharding XLA cannot infer; it would come back
  replicated. Tying every state leaf to the parameter leaf it mirrors keeps
  it sharded like the parameters.
- :func:`carry_offload_policy`: the inner carries that the backward pass
  stores, :math:`T\,(|\theta| + |s|)` (the static memory that mixed-mode
  differentiation does not shrink), kept in host memory (``pinned_host``) and
  brought back to the device step by step in the backward pass.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.shard_alike import shard_alike

__all__ = ["CARRY_NAME", "shard_like_params", "carry_offload_policy", "check_host_offload"]

#: Name of the inner carry ``(params, opt_state, model_state)`` at the start of
#: each inner step (:func:`jax.ad_checkpoint.checkpoint_name`), offloaded to host
#: memory with ``offload_carries=True``.
CARRY_NAME = "mixflow_inner_carry"

# The memory kind that the offloaded carries are placed in.
_HOST = "pinned_host"


def shard_like_params(state: Any, params: Any) -> Any:
  """Gives each leaf of ``state`` that mirrors a leaf of ``params`` the same sharding.

  Subtrees of ``state`` with the tree structure and shapes of ``params``
  (Adam's ``mu`` and ``nu``, momentum traces, ...) are paired leaf by leaf
  with ``jax.experimental.shard_alike``: XLA's sharding propagation then gives
  both the parameters' sharding. Other leaves (step counters, scalars) are
  left alone. With a single device there is nothing to shard and ``state`` is
  returned as is.
  """
  if jax.device_count() == 1:
    return state
  treedef = jax.tree.structure(params)
  shapes = [jax.numpy.shape(p) for p in jax.tree.leaves(params)]

  def mirrors_params(node: Any) -> bool:
    if jax.tree.structure(node) != treedef:
      return False
    return [jax.numpy.shape(x) for x in jax.tree.leaves(node)] == shapes

  def tie(node: Any) -> Any:
    if not mirrors_params(node):
      return node
    return jax.tree.map(lambda x, p: shard_alike(x, p)[0], node, params)

  return jax.tree.map(tie, state, is_leaf=mirrors_params)


def _memory_kinds(device: jax.Device) -> set[str]:
  return {m.kind for m in device.addressable_memories()}


def check_host_offload() -> None:
  """Raises if the default backend has no host memory to offload the carries to.

  The CPU backend has one (its device memory is host memory), and there the
  placement is a no-op: XLA's CPU lowering drops it.
  """
  device = jax.local_devices()[0]
  kinds = _memory_kinds(device)
  if _HOST not in kinds:
    raise ValueError(
      f"offload_carries=True needs a backend with a {_HOST!r} memory kind "
      f"(GPU, TPU); the {device.platform!r} backend has {sorted(kinds)}. Pass "
      "offload_carries=False, or checkpoint_every=K to store fewer carries."
    )


def carry_offload_policy(saved_names: tuple[str, ...], offloaded_name: str = CARRY_NAME) -> Any:
  """Remat policy: keep ``saved_names`` on the device, offload ``offloaded_name`` to host."""
  return jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=list(saved_names),
    names_which_can_be_offloaded=[offloaded_name],
    offload_src="device",
    offload_dst=_HOST,
  )
