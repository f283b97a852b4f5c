r"""Meta-learning per-parameter learning rates of a sharded MLP with ``jax.sharding``.

An MLP regressor is trained online by Adam whose learning rates, one per
parameter entry, are meta-parameters :math:`\eta`:

.. math::

  \theta_{t+1} = \theta_t - e^{\eta} \odot \mathrm{adam}_t(\nabla_\theta L(\theta_t, x_t)),
  \qquad \eta \leftarrow \eta - \mathrm{outer\_adam}\big(\nabla_\eta
  L_\text{val}(\theta_T(\eta))\big),

with exact meta-gradients through T inner steps (MixFlow mode,
:func:`mixflow_optax.meta_optimizer`). Everything runs under ``jax.jit`` on a
one-axis mesh ``"data"`` spanning all devices:

- the batches are sharded along their batch axis (data parallelism; the
  leading axis of the inner batches is the step axis T and stays whole);
- the parameters, Adam's moments, the per-parameter learning rates and the
  outer Adam's moments are sharded FSDP-style: the largest axis of every
  array is split over the same mesh axis;
- XLA's sharding propagation lays out the rest. The inner carries that the
  backward pass stores (T copies of the parameters, moments and inner
  gradients, the static memory of the unrolled loop) follow the parameters'
  sharding, so their per-device size falls with the number of devices.

The script prints the per-device compiled memory of one meta-step next to that
of the same step compiled for one device, then runs a few meta-steps. On GPU
or TPU, ``--offload-carries`` keeps those stored carries in host memory
(``offload_carries=True``; see ``docs/multi_host.md``).

Run it here on 8 simulated CPU devices (about a minute on 2 cores)::

  python examples/distributed_meta_learning.py --simulate-devices 8

``--simulate-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(and ``JAX_PLATFORMS=cpu``) before JAX is imported; the device count is fixed
when JAX starts its backend.

On a multi-host TPU or GPU slice, start the same command on every host with
``--distributed`` (and without ``--simulate-devices``)::

  python examples/distributed_meta_learning.py --distributed

``--distributed`` calls ``jax.distributed.initialize()`` before anything else
touches JAX. On Cloud TPU, SLURM or Open MPI it finds the coordinator itself;
elsewhere pass ``--coordinator-address``, ``--num-processes`` and
``--process-id``. Two processes on one machine, two CPU devices each (the
CPU backend's collectives then go through gloo)::

  python examples/distributed_meta_learning.py --simulate-devices 2 --distributed \
    --coordinator-address 127.0.0.1:12355 --num-processes 2 --process-id 0 &
  python examples/distributed_meta_learning.py --simulate-devices 2 --distributed \
    --coordinator-address 127.0.0.1:12355 --num-processes 2 --process-id 1

``jax.devices()`` then lists the devices of all processes, the mesh spans
them, and the rest of the code is unchanged. Each process passes only the rows
of every batch that its own devices hold (``--batch`` is the global batch) and
``jax.make_array_from_process_local_data`` assembles the global, sharded array
from those slices. The parameters are created by a jitted function with
``out_shardings``, so each process materialises only its own shards. The
synthetic batches are a function of the seed and the step only, so the
meta-learning run is the same on one process or many (``tests/test_multiprocess.py``
checks this).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--simulate-devices",
    type=int,
    default=0,
    metavar="N",
    help="run on N simulated CPU devices (sets XLA_FLAGS before importing jax)",
  )
  p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize()")
  p.add_argument("--coordinator-address", help="host:port of process 0 (with --distributed)")
  p.add_argument("--num-processes", type=int, help="number of processes (with --distributed)")
  p.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
  p.add_argument("--steps", type=int, default=20, help="meta-steps")
  p.add_argument("--T", type=int, default=4, help="inner steps per meta-step")
  p.add_argument("--batch", type=int, default=64, help="global batch per inner step")
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--depth", type=int, default=3, help="hidden layers")
  p.add_argument("--mode", default="mixflow", choices=("mixflow", "standard"))
  p.add_argument(
    "--offload-carries",
    action="store_true",
    help="keep the stored inner carries in host memory (GPU/TPU; no effect on CPU)",
  )
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse(sys.argv[1:])
  if _ARGS.simulate_devices:
    # Must happen before JAX initialises its backend.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={_ARGS.simulate_devices}".strip()
    )
    os.environ["JAX_PLATFORMS"] = "cpu"

import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mixflow_optax as mfo  # noqa: E402

__all__ = [
  "AXIS",
  "INNER_OPT",
  "fsdp_spec",
  "fsdp_shardings",
  "hyperparams_fn",
  "init_mlp",
  "mlp",
  "make_meta_optimizer",
  "Data",
  "main",
]

#: The one mesh axis: data parallelism for the batches, FSDP for the parameters.
AXIS = "data"
D_IN = 16


def fsdp_spec(shape: Sequence[int], num_shards: int) -> P:
  """Shards the largest axis divisible by ``num_shards``; replicates scalars and the rest."""
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % num_shards == 0 and shape[i] >= num_shards:
      return P(*(AXIS if j == i else None for j in range(len(shape))))
  return P()


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
  """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.size)), tree)


def init_mlp(key: jax.Array, width: int, depth: int) -> dict[str, dict[str, jax.Array]]:
  """LeCun-normal weights and zero biases: ``D_IN -> width x depth -> 1``."""
  sizes = [D_IN] + [width] * depth + [1]
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"layer{i}": {
      "w": jax.random.normal(k, (m, n)) / np.sqrt(m),
      "b": jnp.zeros((n,)),
    }
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def mlp(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
  layers = list(params.values())
  for layer in layers[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"][None, :])
  return x @ layers[-1]["w"] + layers[-1]["b"][None, :]


def loss(params, meta, batch):
  del meta  # the learning rates act through the optimizer only
  x, y = batch
  return jnp.mean((mlp(params, x) - y) ** 2)


#: The inner optimizer; its per-parameter learning rates are the meta-parameters.
INNER_OPT = mfo.transforms.adam(1e-3)


def hyperparams_fn(log_lr: Any) -> dict[str, Any]:
  """Per-parameter log learning rates -> Adam's learning-rate tree."""
  return {"learning_rate": jax.tree.map(jnp.exp, log_lr)}


def make_meta_optimizer(mode: str, offload_carries: bool = False) -> mfo.MetaOptimizer:
  """Online meta-learning of Adam's per-parameter log learning rates."""
  return mfo.meta_optimizer(
    loss,
    loss,
    INNER_OPT,
    optax.adam(3e-2),
    hyperparams_fn=hyperparams_fn,
    mode=mode,
    offload_carries=offload_carries,
  )


def _process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice:
  """The rows along ``axis`` that this process's devices hold under ``sharding``."""
  index = sharding.addressable_devices_indices_map(shape).values()
  starts = [i[axis].start or 0 for i in index]
  stops = [shape[axis] if i[axis].stop is None else i[axis].stop for i in index]
  return slice(min(starts), max(stops))


class Data:
  """Noisy regression targets of a fixed random teacher, in process-local slices.

  The batch of step ``k`` is a function of ``(seed, k)`` only. Every process
  draws it (a stand-in for opening the same dataset), keeps the rows its own
  devices hold and hands only those to
  ``jax.make_array_from_process_local_data``, which assembles the global,
  sharded array. The run is therefore the same on any number of processes.
  Floating point data follow JAX's default (float64 with ``jax_enable_x64``).
  """

  def __init__(self, mesh: Mesh, batch: int, T: int, seed: int):
    if batch % mesh.size:
      raise ValueError(f"--batch {batch} must be divisible by the {mesh.size} devices.")
    self.batch, self.T, self.seed, self.step = batch, T, seed, 0
    self.dtype = jax.dtypes.canonicalize_dtype(np.float64)
    teacher = np.random.default_rng(12345)
    self.w1 = teacher.normal(size=(D_IN, 32)) / np.sqrt(D_IN)
    self.w2 = teacher.normal(size=(32, 1)) / np.sqrt(32)
    # The step axis T (leading) is whole; the batch axis is split over the devices.
    self.inner_sharding = NamedSharding(mesh, P(None, AXIS))
    self.outer_sharding = NamedSharding(mesh, P(AXIS))

  def _rows(self, rng: np.random.Generator, *lead: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(*lead, self.batch, D_IN))
    y = np.tanh(x @ self.w1) @ self.w2 + 0.1 * rng.normal(size=(*lead, self.batch, 1))
    return x.astype(self.dtype), y.astype(self.dtype)

  def next(self) -> tuple[Any, Any]:
    """``(inner_batches, outer_batch)``: global arrays of shapes ``(T, batch, .)``, ``(batch, .)``."""
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1

    def put(tree, sharding, axis):
      def local(a):
        rows = _process_rows(sharding, a.shape, axis)
        local_rows = a[(slice(None),) * axis + (rows,)]
        return jax.make_array_from_process_local_data(sharding, local_rows, a.shape)

      return jax.tree.map(local, tree)

    inner = put(self._rows(rng, self.T), self.inner_sharding, axis=1)
    return inner, put(self._rows(rng), self.outer_sharding, axis=0)


def _on_one_device(tree: Any) -> Any:
  device = SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _initialize_distributed(a: argparse.Namespace) -> None:
  if a.simulate_devices or os.environ.get("JAX_PLATFORMS") == "cpu":
    # Multi-process collectives of the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=a.coordinator_address,
    num_processes=a.num_processes,
    process_id=a.process_id,
  )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Builds the mesh, shards everything, compares memory, runs the meta-steps.

  Returns ``memory`` (per-device :class:`mixflow_optax.CompiledMemory` of one
  meta-step, sharded and, on one process, single-device), ``history``,
  ``seconds``, the final ``state`` and the ``mesh``.
  """
  a = _parse(argv)
  if a.distributed:
    _initialize_distributed(a)
  # Auto axes: the inputs' shardings are fixed here and XLA propagates them
  # through the unrolled loop (no sharding annotations inside the model).
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(AxisType.Auto,))
  mo = make_meta_optimizer(a.mode, a.offload_carries)
  data = Data(mesh, a.batch, a.T, a.seed)

  # Parameters and the meta-optimizer state are created directly in their
  # shards: the shapes come from eval_shape, the layout from out_shardings.
  init_fn = lambda key: init_mlp(key, a.width, a.depth)  # noqa: E731
  key = jax.random.PRNGKey(a.seed)
  param_shardings = fsdp_shardings(jax.eval_shape(init_fn, key), mesh)
  params = jax.jit(init_fn, out_shardings=param_shardings)(key)

  def init_state(params):
    log_lr = jax.tree.map(lambda p: jnp.full_like(p, jnp.log(1e-3)), params)
    return mo.init(log_lr, params)

  state_shardings = fsdp_shardings(jax.eval_shape(init_state, params), mesh)
  state = jax.jit(init_state, out_shardings=state_shardings)(params)

  # out_shardings keeps the state's layout from step to step (no recompiles,
  # nothing silently replicated); donating the old state reuses its buffers.
  replicated = NamedSharding(mesh, P())
  step = jax.jit(mo.step, out_shardings=(state_shardings, replicated), donate_argnums=0)

  inner, outer = data.next()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"{jax.device_count()} devices ({jax.process_count()} process(es), "
    f"{jax.devices()[0].platform}); MLP {D_IN}->{a.width}x{a.depth}->1, "
    f"{n_params:,} parameters; T={a.T}, global batch {a.batch}, mode={a.mode}"
  )
  # Compile once; the loop below calls the compiled step.
  compiled_step = step.lower(state, inner, outer).compile()
  # The figures are per device: what each process holds on each of its devices.
  memory = {"sharded": mfo.compiled_memory(step, state, inner, outer)}
  if jax.process_count() == 1:
    # The same step compiled for one device, from shapes only (nothing is allocated).
    memory["single"] = mfo.compiled_memory(mo.step, *_on_one_device((state, inner, outer)))
  print(
    f"{'meta-step memory':<18}{'1 device':>12}{f'{jax.device_count()} devices':>14}{'ratio':>8}"
  )
  for kind in ("temp", "argument", "output"):
    one = getattr(memory["single"], f"{kind}_bytes") if "single" in memory else None
    sharded = getattr(memory["sharded"], f"{kind}_bytes")
    cols = [f"{one / 2**20:12.2f}" if one else f"{'-':>12}", f"{sharded / 2**20:14.2f}"]
    cols.append(f"{sharded / one:8.3f}" if one else "")
    print(f"{kind + ' MiB':<18}" + "".join(cols))

  start = time.perf_counter()
  history = []
  for i in range(a.steps):
    state, metrics = compiled_step(state, inner, outer)
    inner, outer = data.next()
    if i % max(a.steps // 5, 1) == 0 or i == a.steps - 1:
      # Replicated scalars: every process reads the same values locally.
      lrs = jnp.concatenate([jnp.exp(x).ravel() for x in jax.tree.leaves(state.meta_params)])
      lr_stats = jax.jit(
        lambda v: (jnp.median(v), jnp.min(v), jnp.max(v)), out_shardings=replicated
      )
      median, low, high = (float(v) for v in lr_stats(lrs))
      record = {
        "step": i,
        "outer_loss": float(metrics["outer_loss"]),
        "median_lr": median,
        "lr_range": (low, high),
      }
      history.append(record)
      print(
        f"meta-step {i:3d}: validation loss {record['outer_loss']:.4f}, "
        f"learning rates median {median:.2e} (min {low:.2e}, max {high:.2e})"
      )
  seconds = time.perf_counter() - start
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:  # GPU and TPU; CPU has none
    print(f"peak memory on {jax.local_devices()[0]}: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
  shard = state.params["layer1"]["w"].sharding
  print(f"{a.steps} meta-steps in {seconds:.1f} s; layer1/w is sharded as {shard.spec}")
  return {"memory": memory, "history": history, "seconds": seconds, "state": state, "mesh": mesh}


if __name__ == "__main__":
  main(sys.argv[1:])
