r"""Measuring the memory of a jitted function: compiled analysis and runtime peak.

Two numbers answer "how much memory does this meta-gradient need":

- the compiled memory analysis (``jax.jit(f).lower(*args).compile()
  .memory_analysis()``): deterministic, available on every backend, and
  needs no run, so it also works for programs too large to execute;
- the allocator's runtime peak (``device.memory_stats()["peak_bytes_in_use"]``),
  which GPUs and TPUs report and the CPU backend does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = ["CompiledMemory", "compiled_memory", "peak_memory"]

_MIB = 2.0**20


class CompiledMemory(NamedTuple):
  """Compiled memory analysis of one program, in bytes (per device).

  Attributes:
    temp_bytes: temporaries: activations, residuals, every buffer the program
      allocates for itself. This is what mixed-mode differentiation shrinks.
    argument_bytes: the inputs.
    output_bytes: the outputs.
    alias_bytes: outputs that reuse (donated) input buffers.
  """

  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int

  @property
  def temp_mib(self) -> float:
    """``temp_bytes`` in MiB."""
    return self.temp_bytes / _MIB

  @property
  def total_bytes(self) -> int:
    """Temporaries, arguments and outputs, counting aliased buffers once."""
    return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes

  @property
  def total_mib(self) -> float:
    """``total_bytes`` in MiB."""
    return self.total_bytes / _MIB


def _jitted(fn: Callable[..., Any]) -> Any:
  return fn if hasattr(fn, "lower") else jax.jit(fn)


def compiled_memory(
  fn: Callable[..., Any],
  *args: Any,
  compiler_options: dict[str, Any] | None = None,
  **kwargs: Any,
) -> CompiledMemory:
  """Compiles ``fn(*args, **kwargs)`` (without running it) and reads its memory analysis.

  Args:
    fn: a function or a :func:`jax.jit`-ed function (its shardings, static and
      donated arguments are kept).
    *args: the arguments, as arrays or :class:`jax.ShapeDtypeStruct` (so that
      programs too large to run can still be measured).
    compiler_options: XLA compiler options for this compilation only.
    **kwargs: keyword arguments of ``fn``.

  Returns:
    A :class:`CompiledMemory`. Every field is 0 when the backend reports no
    analysis.

  Examples:
    >>> import jax, jax.numpy as jnp, mixflow_optax as mfo
    >>> mem = mfo.compiled_memory(lambda x: jnp.sin(x) @ x.T, jnp.ones((256, 256)))
    >>> mem.output_bytes
    262144
  """
  compiled = _jitted(fn).lower(*args, **kwargs).compile(compiler_options)
  stats = compiled.memory_analysis()

  def size(name: str) -> int:
    return int(getattr(stats, f"{name}_size_in_bytes", 0) or 0) if stats is not None else 0

  return CompiledMemory(size("temp"), size("argument"), size("output"), size("alias"))


def peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int | None:
  """Runs ``fn(*args, **kwargs)`` once and returns the device allocator's peak, in bytes.

  The peak is measured from the bytes in use before the call, on the first
  local device. Compile and warm the function first if compilation should
  not count. GPUs and TPUs report it; the CPU backend does not, and then
  this returns None (use :func:`compiled_memory` there).

  Args:
    fn: the function to run (jitted or not).
    *args: its arguments.
    **kwargs: its keyword arguments.

  Returns:
    Peak bytes in use during the call above those in use before it, or None
    where the backend keeps no allocator statistics.
  """
  device = jax.local_devices()[0]
  try:
    before = device.memory_stats()
  except Exception:  # noqa: BLE001 - runtimes without statistics raise various errors
    before = None
  jax.block_until_ready(fn(*args, **kwargs))
  if not before or "peak_bytes_in_use" not in before:
    return None
  after = device.memory_stats()
  return int(max(after["peak_bytes_in_use"] - before["bytes_in_use"], 0))
