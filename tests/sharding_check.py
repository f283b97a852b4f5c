"""Meta-gradients under ``jax.sharding`` on 8 devices, against one device.

The problem is a tanh MLP (8 -> 256 -> 256 -> 1) whose parameters dominate
memory (batch 16, T = 4 AdamW steps), with per-parameter learning rates
(sharded like the parameters) and a scalar weight decay (replicated) as
meta-parameters, in float64. Parameters, inner optimizer state and
per-parameter meta-parameters are sharded FSDP-style (the largest axis of each
array over the mesh axis ``"data"``); batches are sharded over ``"data"`` along
the batch axis. For each case the same jitted function is compiled for one
device and for the 8-device mesh, and the script checks:

- the sharded results equal the single-device ones (float64, to 1e-10 of each
  leaf's largest entry);
- outputs keep the inputs' shardings (meta-gradients, ``params_T``,
  ``opt_state_T``, the meta-optimizer state), so the state stays sharded from
  step to step without constraints;
- per-device compiled memory (``memory_analysis()``: temporaries, arguments,
  outputs) is below half of the single-device program's;
- the stored inner carries follow the parameters' sharding: the single-device
  program holds the T stacked copies of the largest weight, ``f64[T,256,256]``,
  and the sharded one holds no such buffer.

Cases: ``jax.grad`` through ``mfo.unroll`` and ``mfo.meta_optimizer(...).step``
(three steps, each fed the state the last returned) in mixflow and standard
mode, the forward ``mfo.unroll``, a MAML ``step`` (``init_params_fn``, jitted
without ``out_shardings``: the re-initialised inner optimizer state follows
the parameters' sharding by itself), and ``mfo.unroll`` on a mesh with explicit axes
(``jax.sharding.AxisType.Explicit``), where the model gathers its weights with
``jax.sharding.reshard``.

The JAX backend must see 8 devices, so run it in its own process (as
``tests/test_sharding.py`` does)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py

It prints a JSON summary and exits with status 1 if a check fails.
"""

from __future__ import annotations

import os

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get(
  "XLA_FLAGS", ""
):
  # Must happen before JAX initialises its backend.
  os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  )

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mixflow_optax as mfo  # noqa: E402

NUM_DEVICES = 8
AXIS = "data"
T, BATCH, D_IN, WIDTH = 4, 16, 8, 256
RTOL = 1e-10
MAX_MEMORY_RATIO = 0.5


def fsdp_spec(shape: tuple[int, ...], size: int) -> P:
  """Shards the largest axis divisible by ``size`` over ``AXIS``; else replicates."""
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % size == 0 and shape[i] >= size:
      return P(*(AXIS if j == i else None for j in range(len(shape))))
  return P()


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
  """FSDP-style shardings for every leaf of ``tree`` (scalars are replicated)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.size)), tree)


def batch_shardings(tree: Any, mesh: Mesh, axis: int) -> Any:
  """Shards axis ``axis`` (the batch axis) of every leaf over ``AXIS``."""

  def spec(x):
    return P(*(AXIS if j == axis else None for j in range(np.ndim(x))))

  return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), tree)


def mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  h = jnp.tanh(h @ params["w2"] + params["b2"][None, :])
  return h @ params["w3"]


def inner_loss(params, meta, batch):
  del meta
  x, y = batch
  return jnp.mean((mlp(params, x) - y) ** 2)


def outer_loss(params, meta, batch):
  del meta
  x, y = batch
  return jnp.mean((mlp(params, x) - y) ** 2)


def hyperparams_fn(meta):
  return {
    "learning_rate": jax.tree.map(jnp.exp, meta["log_lr"]),
    "weight_decay": jnp.exp(meta["log_wd"]),
  }


# eps = 1e-3 keeps the meta-gradient well conditioned. With Adam's default
# eps = 1e-8, du/dg reaches lr / eps = 1e6 at near-zero gradient entries, and the
# 1e-16 differences between the reduction orders of the two programs grow to
# ~5e-10 (in standard and mixflow mode alike); with 1e-3 they stay ~1e-13.
INNER_OPT = mfo.transforms.adamw(1e-2, eps=1e-3, weight_decay=1e-3)


def make_problem() -> dict[str, Any]:
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {
    "w1": jax.random.normal(k[0], (D_IN, WIDTH)) / D_IN**0.5,
    "b1": jnp.zeros(WIDTH),
    "w2": jax.random.normal(k[1], (WIDTH, WIDTH)) / WIDTH**0.5,
    "b2": jnp.zeros(WIDTH),
    "w3": jax.random.normal(k[2], (WIDTH, 1)) / WIDTH**0.5,
  }
  x = jax.random.normal(k[3], (T + 1, BATCH, D_IN))
  y = jnp.sin(3.0 * x[..., :1]) + 0.1 * jax.random.normal(k[4], (T + 1, BATCH, 1))
  meta = {
    "log_lr": jax.tree.map(lambda p: jnp.full_like(p, jnp.log(1e-2)), params),
    "log_wd": jnp.log(jnp.asarray(1e-3)),
  }
  return {
    "meta": meta,
    "params": params,
    "opt_state": INNER_OPT.init(params),
    "inner_batches": (x[:T], y[:T]),
    "outer_batch": (x[T], y[T]),
  }


def memory(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {
    "temp": int(m.temp_size_in_bytes),
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
  }


def max_rel_err(ref: Any, out: Any) -> float:
  """max over leaves of max|out - ref| / max|ref| (0 for all-zero leaves that match)."""
  errs = []
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    errs.append(diff / scale if scale > 0 else diff)
  return max(errs)


def same_shardings(out: Any, expected: Any) -> list[str]:
  """Paths of the leaves of ``out`` whose sharding differs from ``expected``."""
  if len(jax.tree.leaves(out)) != len(jax.tree.leaves(expected)):
    return [f"{len(jax.tree.leaves(out))} outputs for {len(jax.tree.leaves(expected))} shardings"]
  bad = []
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(expected)):
    if not x.sharding.is_equivalent_to(s, x.ndim):
      bad.append(f"{jax.tree_util.keystr(path)}: {x.sharding} != {s}")
  return bad


def stacked_buffers(hlo: str, shape: tuple[int, ...]) -> int:
  """How many times the compiled program names a float64 buffer of ``shape``."""
  return len(re.findall(re.escape(f"f64[{','.join(map(str, shape))}]"), hlo))


def full_gathers(hlo: str, shape: tuple[int, ...]) -> int:
  """All-gathers whose result is a whole array of ``shape`` (a per-step FSDP gather)."""
  pattern = rf"= f64\[{','.join(map(str, shape))}\][^\n]*all-gather(?:-start)?\("
  return len(re.findall(pattern, hlo))


def compare(
  name: str,
  fn: Callable,
  single_args: tuple,
  sharded_args: tuple,
  *,
  expected_out_shardings: Any | None = None,
  steps: int = 1,
  check_memory: bool = True,
) -> dict[str, Any]:
  """Compiles ``fn`` for one device and for the mesh, runs both and compares.

  With ``steps > 1``, ``fn`` is a ``(state, *rest) -> (state, metrics)`` step
  applied repeatedly (its state output feeds the next call), and
  ``expected_out_shardings`` are those of the state.
  """
  start = time.perf_counter()
  results, mems, hlos = {}, {}, {}
  runs = (("single", fn, single_args), ("sharded", fn, sharded_args))
  for kind, f, args in runs:
    compiled = f.lower(*args).compile()
    out = compiled(*args)
    for _ in range(steps - 1):
      out = compiled(out[0], *args[1:])
    results[kind], mems[kind], hlos[kind] = out, memory(compiled), compiled.as_text()
  full_stack = (T, WIDTH, WIDTH)
  record: dict[str, Any] = {
    "max_rel_err": max_rel_err(results["single"], results["sharded"]),
    "memory_single": mems["single"],
    "memory_per_device": mems["sharded"],
    "memory_ratio": {k: mems["sharded"][k] / max(mems["single"][k], 1) for k in mems["single"]},
    "hlo": {
      "single_full_stacks": stacked_buffers(hlos["single"], full_stack),
      "sharded_full_stacks": stacked_buffers(hlos["sharded"], full_stack),
      "sharded_full_weight_gathers": full_gathers(hlos["sharded"], (WIDTH, WIDTH)),
      "sharded_all_gathers": hlos["sharded"].count("all-gather("),
    },
    "sharding_mismatches": (
      same_shardings(
        results["sharded"][0] if steps > 1 else results["sharded"], expected_out_shardings
      )
      if expected_out_shardings is not None
      else []
    ),
  }
  record["check_memory"] = check_memory
  record["seconds"] = time.perf_counter() - start
  return {name: record}


def failures_of(name: str, r: dict[str, Any]) -> list[str]:
  fails = []
  if not r["max_rel_err"] <= RTOL:
    fails.append(f"{name}: sharded != single device (max rel err {r['max_rel_err']:.3g})")
  if r["sharding_mismatches"]:
    fails.append(f"{name}: output shardings changed: {r['sharding_mismatches']}")
  if r["check_memory"]:
    for k, ratio in r["memory_ratio"].items():
      if not ratio < MAX_MEMORY_RATIO:
        fails.append(f"{name}: per-device {k} memory is {ratio:.2f}x the single device's")
    if r["hlo"]["single_full_stacks"] == 0:
      fails.append(f"{name}: the single-device program has no stacked f64{[T, WIDTH, WIDTH]}")
    if r["hlo"]["sharded_full_stacks"]:
      fails.append(f"{name}: the sharded program stores full (unsharded) stacked weights")
  if r.get("natural_changed_leaves"):
    fails.append(f"{name}: {r['natural_changed_leaves']} state leaves lose their sharding")
  return fails


def unroll_cases(mesh: Mesh, problem: dict[str, Any]) -> dict[str, Any]:
  cpu0 = jax.devices()[0]
  names = ("meta", "params", "opt_state", "inner_batches", "outer_batch")
  single = tuple(jax.device_put(problem[k], cpu0) for k in names)
  shardings = (
    fsdp_shardings(problem["meta"], mesh),
    fsdp_shardings(problem["params"], mesh),
    fsdp_shardings(problem["opt_state"], mesh),
    batch_shardings(problem["inner_batches"], mesh, axis=1),  # axis 0 is the step axis T
    batch_shardings(problem["outer_batch"], mesh, axis=0),
  )
  sharded = tuple(jax.device_put(x, s) for x, s in zip(single, shardings))
  out = {}
  for mode in ("mixflow", "standard"):
    run = mfo.unroll(inner_loss, INNER_OPT, hyperparams_fn=hyperparams_fn, mode=mode)

    def meta_loss(meta, params, opt_state, inner_batches, outer_batch, run=run):
      params_T, _ = run(meta, params, opt_state, inner_batches)
      return outer_loss(params_T, meta, outer_batch)

    # Meta-gradients w.r.t. the meta-parameters and the initial parameters (MAML).
    grad_fn = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))
    out.update(
      compare(f"unroll_grad/{mode}", grad_fn, single, sharded, expected_out_shardings=shardings[:2])
    )
  run = jax.jit(mfo.unroll(inner_loss, INNER_OPT, hyperparams_fn=hyperparams_fn))
  out.update(
    compare(
      "unroll_forward/mixflow",
      run,
      single[:4],
      sharded[:4],
      expected_out_shardings=shardings[1:3],  # params_T, opt_state_T
      check_memory=False,  # no backward pass, nothing stored across steps
    )
  )
  return out


def meta_step_cases(mesh: Mesh, problem: dict[str, Any]) -> dict[str, Any]:
  cpu0 = jax.devices()[0]
  batches = (problem["inner_batches"], problem["outer_batch"])
  out = {}
  for mode in ("mixflow", "standard"):
    mo = mfo.meta_optimizer(
      inner_loss, outer_loss, INNER_OPT, optax.adam(1e-2), hyperparams_fn=hyperparams_fn, mode=mode
    )
    state = mo.init(problem["meta"], problem["params"])
    state_shardings = fsdp_shardings(state, mesh)
    single = jax.device_put((state, *batches), cpu0)
    sharded = (
      jax.device_put(state, state_shardings),
      jax.device_put(batches[0], batch_shardings(batches[0], mesh, axis=1)),
      jax.device_put(batches[1], batch_shardings(batches[1], mesh, axis=0)),
    )
    out.update(
      compare(
        f"meta_step/{mode}",
        jax.jit(mo.step),
        single,
        sharded,
        expected_out_shardings=state_shardings,
        steps=3,  # the state each step returns is the next step's input
      )
    )
  return out


def maml_case(mesh: Mesh, problem: dict[str, Any]) -> dict[str, Any]:
  """MAML (learned initialisation), jitted as a user would: without ``out_shardings``.

  Each step re-initialises the inner optimizer state (zeros) from the
  parameters. Fresh zeros carry no sharding of their own; the library ties
  them to the parameters' sharding, so the state comes back sharded like the
  input state. The record also holds the per-device memory of the same step
  jitted with ``out_shardings`` (the layout pinned by hand), and counts the
  output leaves of the natural program whose sharding differs from the input
  state's.
  """
  mo = mfo.meta_optimizer(
    inner_loss,
    outer_loss,
    INNER_OPT,
    optax.adam(1e-2),
    hyperparams_fn=lambda m: hyperparams_fn(m["rates"]),
    init_params_fn=lambda m: m["init"],
  )
  state = mo.init({"rates": problem["meta"], "init": problem["params"]})
  state_shardings = fsdp_shardings(state, mesh)
  batches = (problem["inner_batches"], problem["outer_batch"])
  single = jax.device_put((state, *batches), jax.devices()[0])
  sharded = (
    jax.device_put(state, state_shardings),
    jax.device_put(batches[0], batch_shardings(batches[0], mesh, axis=1)),
    jax.device_put(batches[1], batch_shardings(batches[1], mesh, axis=0)),
  )
  out = compare(
    "meta_step/maml",
    jax.jit(mo.step),
    single,
    sharded,
    expected_out_shardings=state_shardings,
    steps=3,
  )
  natural = jax.jit(mo.step).lower(*sharded).compile()
  pinned = jax.jit(mo.step, out_shardings=(state_shardings, None)).lower(*sharded).compile()
  wanted = zip(
    jax.tree.leaves(natural.output_shardings[0]),
    jax.tree.leaves(state_shardings),
    jax.tree.leaves(state),
  )
  record = out["meta_step/maml"]
  record["natural_changed_leaves"] = sum(
    not got.is_equivalent_to(s, np.ndim(x)) for got, s, x in wanted
  )
  record["with_out_shardings"] = {"memory_per_device": memory(pinned)}
  return out


def explicit_axes_case() -> dict[str, Any]:
  """``mfo.unroll`` on a mesh with explicit axes: sharding is part of the types."""
  from jax.sharding import reshard

  def model(params, x):
    # With explicit axes the model says where FSDP gathers its weights.
    h = jnp.tanh(x @ reshard(params["w1"], P()))
    return h @ reshard(params["w2"], P())

  def loss(params, meta, batch):
    del meta
    x, y = batch
    return jnp.mean((model(params, x) - y) ** 2)

  k = jax.random.split(jax.random.PRNGKey(1), 4)
  params = {
    "w1": jax.random.normal(k[0], (D_IN, 64)) / D_IN**0.5,
    "w2": jax.random.normal(k[3], (64, 1)) / 8.0,
  }
  batches = (jax.random.normal(k[1], (T, BATCH, D_IN)), jax.random.normal(k[2], (T, BATCH, 1)))
  meta = jax.tree.map(lambda p: jnp.full_like(p, jnp.log(1e-2)), params)
  opt = mfo.transforms.adam(1e-2)
  run = mfo.unroll(loss, opt, hyperparams_fn=lambda m: {"learning_rate": jax.tree.map(jnp.exp, m)})

  def meta_loss(meta, params, batches):
    params_T, _ = run(meta, params, opt.init(params), batches)
    return loss(params_T, meta, jax.tree.map(lambda b: b[0], batches))

  grad_fn = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))
  explicit = (AxisType.Explicit,)
  mesh1 = jax.make_mesh((1,), (AXIS,), explicit, devices=jax.devices()[:1])
  mesh8 = jax.make_mesh((NUM_DEVICES,), (AXIS,), explicit)
  start = time.perf_counter()
  with jax.set_mesh(mesh1):
    ref = grad_fn(meta, params, batches)
  with jax.set_mesh(mesh8):
    p_sh, b_sh = fsdp_shardings(params, mesh8), batch_shardings(batches, mesh8, axis=1)
    args = (jax.device_put(meta, p_sh), jax.device_put(params, p_sh), jax.device_put(batches, b_sh))
    got = grad_fn(*args)
  return {
    "unroll_grad/explicit_axes": {
      "max_rel_err": max_rel_err(ref, got),
      "sharding_mismatches": same_shardings(got, (p_sh, p_sh)),
      "check_memory": False,  # a second, small model: exactness and types only
      "seconds": time.perf_counter() - start,
    }
  }


def main() -> int:
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  start = time.perf_counter()
  if jax.device_count() < NUM_DEVICES:
    print(
      json.dumps(
        {
          "failures": [
            f"{jax.device_count()} device(s); run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES}"
          ]
        }
      )
    )
    return 1
  # Auto axes: XLA's sharding propagation lays out everything the inputs do not fix.
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), (AxisType.Auto,))
  problem = make_problem()
  n_params = sum(x.size for x in jax.tree.leaves(problem["params"]))
  cases = {}
  cases.update(unroll_cases(mesh, problem))
  cases.update(meta_step_cases(mesh, problem))
  cases.update(maml_case(mesh, problem))
  cases.update(explicit_axes_case())
  failures = [f for name, r in cases.items() for f in failures_of(name, r)]
  summary = {
    "jax": jax.__version__,
    "devices": jax.device_count(),
    "problem": {"T": T, "batch": BATCH, "width": WIDTH, "params": int(n_params)},
    # theta, Adam's mu and nu, and the saved inner gradient, per step (float64).
    "static_bytes_estimate": int(4 * T * n_params * 8),
    "cases": cases,
    "failures": failures,
    "seconds": time.perf_counter() - start,
  }
  print(json.dumps(summary, indent=1))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
