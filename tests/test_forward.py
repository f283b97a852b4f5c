"""Forward-mode meta-gradients: equal to reverse mode, flat in T, carried tangents, errors."""

import itertools
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
import registry
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

T_OPTIONS = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}


def _mlp(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"][None, :]) @ params["w2"]


def _mse(params, meta, batch):
  del meta
  x, y = batch
  return jnp.mean((_mlp(params, x) - y) ** 2)


def _problem(T, width=4, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {
    "w1": jax.random.normal(k[0], (3, width)),
    "b1": 0.1 * jax.random.normal(k[1], (width,)),
    "w2": jax.random.normal(k[2], (width, 1)) / 2,
  }
  x = jax.random.normal(k[3], (T, 6, 3))
  y = jnp.sin(jnp.sum(x, axis=-1, keepdims=True))
  x_val = jax.random.normal(k[4], (6, 3))
  return params, (x, y), (x_val, jnp.sin(jnp.sum(x_val, axis=-1, keepdims=True)))


def _exp_lr(m):
  return {"learning_rate": jnp.exp(m["log_lr"])}


# (registry entry, meta-parameter kind) pairs of tests/registry.py: hyperparameters of each
# optimizer family, stock clipping in a chain, loss weights and per-parameter rates.
CASES = (
  ("sgd_momentum", "hyperparams"),
  ("sgd_nesterov", "hyperparams"),
  ("optax_clip_adam", "learning_rate"),
  ("adam", "hyperparams"),
  ("adamw", "hyperparams"),
  ("rmsprop", "hyperparams"),
  ("mfo_clip_adam", "hyperparams"),
  ("adam", "loss_weights"),
  ("sgd", "per_param_rates"),
)


def _stateful_loss(params, meta, batch, state):
  # A differentiable running statistic (like BatchNorm's), carried through the inner steps.
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  scale = 0.7 * state["scale"] + 0.3 * jnp.mean(h**2, axis=0)
  pred = (h / jnp.sqrt(scale[None, :] + 0.1)) @ params["w2"]
  return jnp.mean((pred - y) ** 2), {"scale": scale}


def _stateful_outer(params, meta, batch, state):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  return jnp.mean(((h / jnp.sqrt(state["scale"][None, :] + 0.1)) @ params["w2"] - y) ** 2)


class ForwardEqualsReverseTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    *(
      {"testcase_name": f"{opt}_{kind}_T{T}_steps", "opt_name": opt, "kind_name": kind, "T": T}
      for (opt, kind), T in itertools.product(CASES, (1, 5))
    )
  )
  def test_two_online_steps_match_reverse_mode(self, opt_name, kind_name, T):
    entry, kind = registry.OPTIMIZERS[opt_name], registry.META_KINDS[kind_name]
    params, inner, outer = helpers.exactness_problem(T)
    meta = kind.init(entry, params)
    loss = helpers.inner_loss(kind.weighted_loss)
    states = {}
    for mode in ("standard", "forward"):
      # Outer SGD: Adam would scale round-off in a near-zero meta-gradient up to a full step. A
      # small step keeps raw betas and decays below 1.
      mo = mfo.meta_optimizer(
        loss,
        lambda p, m, b: helpers.outer_loss(p, b),
        entry.make(),
        optax.sgd(1e-3),
        hyperparams_fn=kind.hyperparams_fn(entry),
        mode=mode,
      )
      state = mo.init(meta, params)
      step = jax.jit(mo.step)
      for _ in range(2):  # the second step starts from the carried inner state
        state, metrics = step(state, inner, outer)
      states[mode] = (state, metrics)
    chex.assert_trees_all_close(states["forward"], states["standard"], rtol=1e-10, atol=1e-12)
    self.assertGreater(float(states["forward"][1]["meta_grad_norm"]), 1e-3)

  def test_gradient_equals_plain_bptt_through_stock_optax(self):
    params, inner, outer = _problem(5)

    def plain(meta):
      opt = optax.adamw(jnp.exp(meta["log_lr"]), weight_decay=jnp.exp(meta["log_wd"]))

      def step(carry, batch):
        p, s = carry
        u, s = opt.update(jax.grad(_mse)(p, meta, batch), s, p)
        return (optax.apply_updates(p, u), s), None

      (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), inner)
      return _mse(p, meta, outer)

    opt = registry.OPTIMIZERS["adamw"].make(learning_rate=0.1)
    meta = {"log_lr": jnp.log(0.05), "log_wd": jnp.log(0.1)}
    hp = lambda m: {"learning_rate": jnp.exp(m["log_lr"]), "weight_decay": jnp.exp(m["log_wd"])}
    mo = mfo.meta_optimizer(
      _mse, _mse, opt, helpers.recording_opt(), hyperparams_fn=hp, mode="forward"
    )
    state, _ = jax.jit(mo.step)(mo.init(meta, params), inner, outer)
    chex.assert_trees_all_close(state.outer_state, jax.grad(plain)(meta), rtol=1e-10)

  @parameterized.named_parameters(("truncated", False), ("carried", True))
  def test_model_state(self, carry):
    params, inner, outer = _problem(4)
    meta = {"log_lr": jnp.log(0.05)}
    model_state = {"scale": jnp.ones(4)}
    states = {}
    for mode in ("standard", "forward"):
      mo = mfo.meta_optimizer(
        _stateful_loss,
        _stateful_outer,
        mfo.transforms.adam(0.1),
        helpers.recording_opt(),
        hyperparams_fn=_exp_lr,
        mode=mode,
        has_model_state=True,
        carry_tangents=carry and mode == "forward",
      )
      state = mo.init(meta, params, model_state)
      state, _ = jax.jit(mo.step)(state, inner, outer)
      states[mode] = state.outer_state
    chex.assert_trees_all_close(states["forward"], states["standard"], rtol=1e-10)

  def test_batched_tasks_and_learned_init(self):
    params, (x, y), (xv, yv) = _problem(3)
    tasks = ((jnp.stack([x, -x]), jnp.stack([y, y])), (jnp.stack([xv, -xv]), jnp.stack([yv, yv])))
    meta = {"log_lr": jnp.log(0.1), "b1": params["b1"]}  # a small learned init: 5 elements

    def init_params_fn(m):
      return {**params, "b1": m["b1"]}

    grads = {}
    for mode in ("standard", "forward"):
      mo = mfo.meta_optimizer(
        _mse,
        _mse,
        mfo.transforms.sgd(0.1),
        helpers.recording_opt(),
        hyperparams_fn=_exp_lr,
        mode=mode,
        init_params_fn=init_params_fn,
        batched_tasks=True,
      )
      state, _ = jax.jit(mo.step)(mo.init(meta), *tasks)
      grads[mode] = state.outer_state
    chex.assert_trees_all_close(grads["forward"], grads["standard"], rtol=1e-10)


class CarriedTangentsTest(helpers.F64TestCase):
  def test_equals_reverse_mode_through_the_whole_run(self):
    T, k = 3, 3
    params, (x, y), outer = _problem(T * k)
    meta = {"log_lr": jnp.log(0.05), "b1": jnp.asarray(0.8)}
    hp = lambda m: {"learning_rate": jnp.exp(m["log_lr"]), "b1": m["b1"], "b2": m["b2"]}
    mo = mfo.meta_optimizer(
      _mse,
      _mse,
      mfo.transforms.adam(0.1),
      helpers.recording_opt(),
      hyperparams_fn=lambda m: hp({**m, "b2": jnp.asarray(0.99)}),
      mode="forward",
      carry_tangents=True,
    )

    def whole_run(meta):  # plain BPTT through stock optax, all k*T inner steps
      opt = optax.adam(jnp.exp(meta["log_lr"]), b1=meta["b1"], b2=0.99)

      def inner_step(carry, batch):
        p, s = carry
        u, s = opt.update(jax.grad(_mse)(p, meta, batch), s, p)
        return (optax.apply_updates(p, u), s), None

      (p, _), _ = jax.lax.scan(inner_step, (params, opt.init(params)), (x, y))
      return _mse(p, meta, outer)

    expected = jax.grad(whole_run)(meta)
    state = mo.init(meta, params)
    step = jax.jit(mo.step, donate_argnums=0)
    for i in range(k):
      state, _ = step(state, (x[i * T : (i + 1) * T], y[i * T : (i + 1) * T]), outer)
    chex.assert_trees_all_close(state.outer_state, expected, rtol=1e-10)
    self.assertEqual(state.tangents.params["w1"].shape, (2, 3, 4))

  def test_online_updates_jit_once(self):
    params, inner, outer = _problem(2)
    entry, kind = registry.OPTIMIZERS["rmsprop"], registry.META_KINDS["hyperparams"]
    meta = kind.init(entry, params)
    mo = mfo.meta_optimizer(
      _mse,
      _mse,
      entry.make(),
      optax.adam(0.01),
      hyperparams_fn=kind.hyperparams_fn(entry),
      mode="forward",
      carry_tangents=True,
    )

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state):
      return mo.step(state, inner, outer)

    state = mo.init(meta, params)
    for _ in range(3):
      state, metrics = step(state)
    self.assertTrue(jnp.isfinite(metrics["meta_grad_norm"]))
    self.assertFalse(jnp.allclose(state.meta_params["log_lr"], meta["log_lr"]))


class MemoryTest(helpers.TestCase):
  @parameterized.named_parameters(("truncated", False), ("carried", True))
  def test_compiled_memory_is_flat_in_T(self, carry):
    params = {"w1": jnp.zeros((16, 64)), "b1": jnp.zeros(64), "w2": jnp.zeros((64, 1))}
    mo = mfo.meta_optimizer(
      _mse,
      _mse,
      mfo.transforms.adam(0.01),
      optax.adam(0.01),
      hyperparams_fn=_exp_lr,
      mode="forward",
      carry_tangents=carry,
    )
    state = mo.init({"log_lr": jnp.log(0.01)}, params)
    outer = (jnp.zeros((32, 16)), jnp.zeros((32, 1)))
    temp = {}
    for T in (10, 10_000):
      inner = (
        jax.ShapeDtypeStruct((T, 32, 16), jnp.float32),
        jax.ShapeDtypeStruct((T, 32, 1), jnp.float32),
      )
      # Optimised compilation, as users get it (the test session sets fast-compile flags).
      temp[T] = mfo.compiled_memory(mo.step, state, inner, outer, compiler_options=T_OPTIONS)
    self.assertLessEqual(temp[10_000].temp_bytes, 1.1 * temp[10].temp_bytes)
    self.assertGreater(temp[10].temp_bytes, 0)


class ErrorsTest(helpers.TestCase):
  def _build(self, **kwargs):
    return mfo.meta_optimizer(_mse, _mse, mfo.transforms.sgd(0.1), optax.sgd(0.1), **kwargs)

  def test_too_many_meta_parameters(self):
    params, inner, outer = _problem(2)  # 20 parameters
    mo = self._build(mode="forward", init_params_fn=lambda m: m, max_forward_elements=19)
    with self.assertRaisesRegex(ValueError, r"one Jacobian-vector product.*20 elements"):
      mo.step(mo.init(params), inner, outer)
    with self.assertRaisesRegex(ValueError, r"mode='mixflow'.*max_forward_elements \(now 1000\)"):
      self._build(mode="forward", carry_tangents=True).init({"a": jnp.zeros(1001)}, params)
    mo = self._build(mode="forward", init_params_fn=lambda m: m, max_forward_elements=20)
    mo.step(mo.init(params), inner, outer)

  def test_carry_tangents_needs_forward_online(self):
    with self.assertRaisesRegex(ValueError, "mode='forward'"):
      self._build(carry_tangents=True)
    with self.assertRaisesRegex(ValueError, "reset_inner"):
      self._build(mode="forward", carry_tangents=True, reset_inner=True)

  def test_carried_step_needs_a_state_with_tangents(self):
    params, inner, outer = _problem(2)
    state = self._build(mode="forward").init({"log_lr": jnp.log(0.1)}, params)
    mo = self._build(mode="forward", carry_tangents=True, hyperparams_fn=_exp_lr)
    with self.assertRaisesRegex(TypeError, "tangents were made by its init"):
      mo.step(state, inner, outer)

  def test_check_finite_points_to_standard(self):
    with self.assertRaisesRegex(ValueError, "mode='standard'"):
      self._build(mode="forward", check_finite=True)


# Run in a subprocess: the device count is fixed when JAX's backend starts.
_SHARDING_CHECK = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import mixflow_optax as mfo

  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  mesh = jax.make_mesh((4,), ("d",), (AxisType.Auto,))

  def loss(p, m, b):
    x, y = b
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

  k = jax.random.split(jax.random.PRNGKey(0), 3)
  p = {"w": jax.random.normal(k[0], (8, 16)), "v": jax.random.normal(k[1], (16, 1))}
  x = jax.random.normal(k[2], (5, 32, 8))
  y = jnp.sin(x[..., :1])
  mo = mfo.meta_optimizer(
    loss, loss, mfo.transforms.adam(0.1), optax.adam(0.01),
    hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["lr"]), "b1": m["b1"]},
    mode="forward", carry_tangents=True)

  def hidden(tree):  # shard the hidden axis of params and of their tangents
    def put(a):
      spec = P(*([None] * (a.ndim - 1)), "d") if a.shape[-1] == 16 else P()
      return jax.device_put(a, NamedSharding(mesh, spec))
    return jax.tree.map(put, tree)

  out = {}
  for sharded in (False, True):
    s = mo.init({"lr": jnp.log(0.05), "b1": jnp.asarray(0.9)}, p)
    batches = (x, y)
    if sharded:
      s = s._replace(params=hidden(s.params), tangents=hidden(s.tangents))
      batches = jax.device_put(batches, NamedSharding(mesh, P(None, "d")))
    step = jax.jit(mo.step, donate_argnums=0)
    for _ in range(3):
      s, _ = step(s, batches, (x[0], y[0]))
    out[sharded] = s
  assert out[True].tangents.params["w"].sharding.spec == P(None, None, "d")
  np.testing.assert_allclose(out[True].meta_params["lr"], out[False].meta_params["lr"], rtol=1e-10)
  np.testing.assert_allclose(out[True].tangents.params["w"], out[False].tangents.params["w"], rtol=1e-9)
  print("ok")
  """
)


class ShardingTest(helpers.TestCase):
  def test_sharded_tangents_match_one_device(self):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    root = str(pathlib.Path(__file__).resolve().parents[1])  # this checkout's mixflow_optax
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
      [sys.executable, "-c", _SHARDING_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertEqual(proc.stdout.strip(), "ok")


class UnrollUnderJvpTest(helpers.F64TestCase):
  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_jacfwd_equals_grad(self, mode):
    params, inner, outer = _problem(3)
    opt = mfo.transforms.adam(0.1)
    run = mfo.unroll(_mse, opt, hyperparams_fn=_exp_lr, mode=mode)

    def meta_loss(meta):
      p, _ = run(meta, params, opt.init(params), inner)
      return _mse(p, meta, outer)

    meta = {"log_lr": jnp.log(0.05)}
    forward = jax.jit(jax.jacfwd(meta_loss))(meta)
    chex.assert_trees_all_close(forward, jax.grad(meta_loss)(meta), rtol=1e-10)
    chex.assert_trees_all_close(jax.jacfwd(meta_loss)(meta), forward, rtol=1e-12)


if __name__ == "__main__":
  absltest.main()
