"""A population's member axis sharded over 4 devices, against one device.

Run in its own process (``tests/test_population.py`` does), with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``. Four members, each with
its own params and Adam state, are sharded one per device; the meta-parameters
are replicated. Three jitted meta-steps (with staggered resets) must give the
single-device results (float64) and keep the members sharded and the
meta-parameters replicated. Prints a JSON summary.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mixflow_optax as mfo

MEMBERS, T = 4, 2


def _loss(params, meta, batch):
  x, y = batch
  pred = jnp.tanh(x @ params["w"]) @ params["v"]
  return jnp.mean(jax.nn.sigmoid(meta["logits"]) * (pred - y) ** 2)


def _outer_loss(params, meta, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def main() -> None:
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  members = {
    "w": jax.random.normal(k[0], (MEMBERS, 2, 8)),
    "v": jax.random.normal(k[1], (MEMBERS, 8)),
  }
  xs = jax.random.normal(k[2], (MEMBERS, T, 4, 2))
  xo = jax.random.normal(k[3], (MEMBERS, 4, 2))
  inner, outer = (xs, jnp.sin(xs[..., 0])), (xo, jnp.sin(xo[..., 0]))
  meta = {"logits": jax.random.normal(k[4], (4,)), "log_lr": jnp.log(0.1)}
  mo = mfo.meta_optimizer(
    _loss,
    _outer_loss,
    mfo.transforms.adam(0.1),
    optax.adam(0.01),
    hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])},
    population_size=MEMBERS,
    reset_every=2,
  )

  def run(state, inner, outer):
    for _ in range(3):
      state, metrics = mo.step(state, inner, outer)
    return state, metrics

  want = jax.jit(run)(mo.init(meta, members), inner, outer)

  mesh = Mesh(jax.devices(), ("members",))
  by_member = NamedSharding(mesh, P("members"))
  replicated = NamedSharding(mesh, P())

  def place(tree, sharding):
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

  state = mo.init(meta, members)
  state = state._replace(
    meta_params=place(state.meta_params, replicated),
    outer_state=place(state.outer_state, replicated),
    count=place(state.count, replicated),
    params=place(state.params, by_member),
    inner_state=place(state.inner_state, by_member),
    initial_params=place(state.initial_params, by_member),
    member_age=place(state.member_age, by_member),
  )
  got = jax.jit(run)(state, place(inner, by_member), place(outer, by_member))

  errs = [
    float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-300))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    if jnp.issubdtype(a.dtype, jnp.floating)
  ]
  new_state = got[0]
  summary = {
    "devices": jax.device_count(),
    "max_rel_err": max(errs),
    "params_sharded": all(
      x.sharding.spec[:1] == ("members",) for x in jax.tree.leaves(new_state.params)
    ),
    "meta_params_replicated": all(
      x.sharding.is_fully_replicated for x in jax.tree.leaves(new_state.meta_params)
    ),
    "member_age": [int(a) for a in new_state.member_age],
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  # Here, not at import: pytest's --doctest-modules imports this file in the test session, where a
  # module-level flip would turn on float64 for every later test of that worker.
  jax.config.update("jax_enable_x64", True)
  main()
