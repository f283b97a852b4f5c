"""Settings shared by :func:`mixflow_optax.unroll` and :func:`mixflow_optax.meta_optimizer`.

Both take the same keyword options; each builds the objects below once, with
the checks, and hands them down instead of forwarding the options one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax

from mixflow_optax._checks import check_bool, check_positive_int, check_positive_ints
from mixflow_optax._placement import carry_offload_policy

Mode = Literal["mixflow", "standard", "first_order"]
#: The meta-gradient modes, in the order the messages list them.
MODES: tuple[str, ...] = ("mixflow", "standard", "first_order")

#: Name given to the inner gradients (:func:`jax.ad_checkpoint.checkpoint_name`),
#: kept by the remat policy when ``save_inner_grads=True``.
INNER_GRAD_NAME = "mixflow_inner_grad"


def check_mode(mode: Any) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """What the unrolled loop stores for the backward pass, and what it recomputes.

  Attributes:
    remat: :func:`jax.checkpoint` around each inner step (store step inputs only).
    save_inner_grads: with ``remat``, keep each inner gradient.
    checkpoint_every: store the carry every ``K1`` steps, nested levels
      ``(K1, K2, ...)``; ``()``: every step.
    unroll_steps: the ``unroll`` argument of the ``lax.scan``.
    offload_carries: keep the stored carries in host memory (``pinned_host``).
  """

  remat: bool = True
  save_inner_grads: bool = True
  checkpoint_every: tuple[int, ...] = ()
  unroll_steps: int | bool = 1
  offload_carries: bool = False

  def step_policy(self) -> Any:
    """The :func:`jax.checkpoint` policy of one inner step (None: no remat)."""
    if not self.remat:
      return None
    saved = (INNER_GRAD_NAME,) if self.save_inner_grads else ()
    if self.offload_carries:
      return carry_offload_policy(saved)
    if saved:
      return jax.checkpoint_policies.save_only_these_names(*saved)
    return jax.checkpoint_policies.nothing_saveable


def memory_config(
  owner: str,
  *,
  remat: bool = True,
  save_inner_grads: bool = True,
  checkpoint_every: int | Sequence[int] | None = None,
  unroll_steps: int | bool = 1,
  offload_carries: bool = False,
) -> MemoryConfig:
  """Checks the memory options of ``owner`` and returns them as one object."""
  check_bool(owner, "remat", remat)
  check_bool(owner, "save_inner_grads", save_inner_grads)
  check_bool(owner, "offload_carries", offload_carries)
  if offload_carries and not remat:
    raise ValueError(
      f"{owner}(offload_carries=True) offloads the carries that jax.checkpoint stores: "
      "it needs remat=True."
    )
  levels = (
    ()
    if checkpoint_every is None
    else check_positive_ints(owner, "checkpoint_every", checkpoint_every)
  )
  # lax.scan takes a positive int or a bool (True: unroll fully, False: 1).
  if not isinstance(unroll_steps, bool):
    unroll_steps = check_positive_int(owner, "unroll_steps", unroll_steps)
  return MemoryConfig(
    bool(remat), bool(save_inner_grads), levels, unroll_steps, bool(offload_carries)
  )
