"""One process of the multi-process run of ``tests/test_multiprocess.py``.

Started once per process with the same arguments except ``--process-id``::

  python tests/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12355 \
    --local-devices 2 --out /tmp/result.npz -- --steps 3 --width 32

It joins the loopback coordinator (``jax.distributed.initialize`` with the
CPU backend's gloo collectives and short timeouts), runs
``examples/distributed_meta_learning.py``'s ``main`` in float64 with the
arguments after ``--``, takes the exact meta-gradients at the final state on a
fresh batch, gathers the state and the meta-gradients to every process and
process 0 writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distributed_meta_learning.py"
# Seconds: joining the coordinator, noticing a dead peer, waiting at shutdown.
INIT_TIMEOUT, HEARTBEAT_TIMEOUT, SHUTDOWN_TIMEOUT = 60, 10, 10


def load_example() -> Any:
  """Imports ``examples/distributed_meta_learning.py`` as a module."""
  spec = importlib.util.spec_from_file_location("distributed_meta_learning", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def meta_gradients(example: Any, state: Any, inner_batches: Any, outer_batch: Any) -> Any:
  """Exact meta-gradients of the example's validation loss w.r.t. (log_lr, params)."""
  import jax

  import mixflow_optax as mfo

  run = mfo.unroll(example.loss, example.INNER_OPT, hyperparams_fn=example.hyperparams_fn)

  def meta_loss(log_lr, params, opt_state, inner_batches, outer_batch):
    params_T, _ = run(log_lr, params, opt_state, inner_batches)
    return example.loss(params_T, log_lr, outer_batch)

  grad_fn = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))
  return grad_fn(state.meta_params, state.params, state.inner_state, inner_batches, outer_batch)


def flatten(tree: Any) -> dict[str, Any]:
  """``{path: leaf}`` of a pytree (the keys of the saved ``.npz``)."""
  import jax

  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_example(example_argv: Sequence[str], grad_seed: int) -> dict[str, Any]:
  """The example's ``main`` and the meta-gradients at its final state."""
  example = load_example()
  result = example.main(list(example_argv))
  a = example._parse(list(example_argv))
  data = example.Data(result["mesh"], a.batch, a.T, grad_seed)
  grads = meta_gradients(example, result["state"], *data.next())
  return {"state": result["state"], "meta_grads": grads, "memory": result["memory"]}


def main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--process-id", type=int, required=True)
  p.add_argument("--num-processes", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--local-devices", type=int, default=2)
  p.add_argument("--out", required=True)
  p.add_argument("--grad-seed", type=int, default=1)
  p.add_argument("--exit-after-init", action="store_true", help="die on purpose (tests)")
  p.add_argument("example_argv", nargs="*")
  a = p.parse_args(argv)

  # Before JAX starts its backend: the number of CPU devices of this process.
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={a.local_devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{a.port}",
    num_processes=a.num_processes,
    process_id=a.process_id,
    initialization_timeout=INIT_TIMEOUT,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
  )
  if a.exit_after_init:
    print(f"process {a.process_id}: dying on purpose", file=sys.stderr, flush=True)
    os._exit(3)  # a crash: no atexit handlers, no distributed shutdown
  result = run_example(a.example_argv, a.grad_seed)
  gathered = multihost_utils.process_allgather(
    {"state": result["state"], "meta_grads": result["meta_grads"]}, tiled=True
  )
  if jax.process_index() == 0:
    memory = result["memory"]["sharded"]
    np.savez(
      a.out,
      **{k: np.asarray(v) for k, v in flatten(gathered).items()},
      **{f"memory/{k}": np.asarray(v) for k, v in memory._asdict().items()},
      devices=np.asarray(jax.device_count()),
      processes=np.asarray(jax.process_count()),
    )
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
