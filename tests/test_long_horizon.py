"""checkpoint_every: two-level (and nested) checkpointing over the inner steps."""

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo


def _inner_loss(params, meta, batch):
  x, y = batch
  pred = jnp.tanh(x @ params["w"]) @ params["v"]
  return jnp.mean(jax.nn.sigmoid(meta["logits"]) * (pred - y) ** 2)


def _problem(T, width=3, n=4):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(k[0], (2, width)), "v": jax.random.normal(k[1], (width,))}
  batches = (jax.random.normal(k[2], (T, n, 2)), jax.random.normal(k[3], (T, n)))
  meta = {"logits": jnp.linspace(-1.0, 1.0, n), "log_lr": jnp.log(0.05)}
  return params, meta, batches


def _meta_grad(T, checkpoint_every, mode="mixflow", **kw):
  params, meta, batches = _problem(T)
  opt = mfo.transforms.adam(0.05)
  run = mfo.unroll(
    _inner_loss,
    opt,
    hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])},
    mode=mode,
    checkpoint_every=checkpoint_every,
    return_losses=True,
    **kw,
  )

  def meta_loss(meta, params):
    p, _, losses = run(meta, params, opt.init(params), batches)
    return jnp.sum(p["v"] ** 2) + jnp.mean(losses)

  return jax.jit(jax.value_and_grad(meta_loss, argnums=(0, 1)))(meta, params)


class CheckpointEveryTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    ("divides", 12, 4, "mixflow"),
    ("remainder", 13, 4, "mixflow"),
    ("remainder_standard", 13, 5, "standard"),
    ("k_larger_than_T", 5, 8, "mixflow"),
    ("k_one", 4, 1, "mixflow"),
    ("nested", 23, (8, 3), "mixflow"),
    ("nested_standard", 23, (8, 3), "standard"),
  )
  def test_meta_gradient_unchanged(self, T, k, mode):
    want = _meta_grad(T, None, mode)
    got = _meta_grad(T, k, mode)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)

  @parameterized.named_parameters(
    ("remat_saved_grads", True, True),
    ("no_remat", False, False),
    ("remat_recomputed_grads", True, False),
  )
  def test_with_remat_options(self, remat, save_inner_grads):
    want = _meta_grad(10, None, remat=remat, save_inner_grads=save_inner_grads)
    got = _meta_grad(10, 3, remat=remat, save_inner_grads=save_inner_grads)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)

  def test_meta_optimizer_option(self):
    params, meta, batches = _problem(9)
    outer = jax.tree.map(lambda x: x[0], batches)
    kw = dict(hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])})
    runs = []
    for k in (None, 4):
      mo = mfo.meta_optimizer(
        _inner_loss,
        _inner_loss,
        mfo.transforms.adam(0.05),
        optax.adam(0.01),
        checkpoint_every=k,
        **kw,
      )
      state = mo.init(meta, params)
      for _ in range(2):
        state, metrics = jax.jit(mo.step)(state, batches, outer)
      runs.append((state, metrics))
    chex.assert_trees_all_close(runs[1], runs[0], rtol=1e-12, atol=1e-14)

  def test_bad_value(self):
    opt = mfo.transforms.sgd(0.1)
    for bad in (0, -3, 2.5, (4, 0)):
      with self.assertRaisesRegex(ValueError, "checkpoint_every must be a positive int"):
        mfo.unroll(_inner_loss, opt, checkpoint_every=bad)


class LongHorizonMemoryTest(helpers.TestCase):
  def test_stored_carries_grow_like_sqrt_T(self):
    """Compiled temp memory at T=1024: per-step storage vs K=32 (compile only)."""
    T = 1024
    params, meta, batches = _problem(T, width=64, n=8)
    opt = mfo.transforms.adam(0.05)

    def temp_bytes(k):
      run = mfo.unroll(_inner_loss, opt, checkpoint_every=k)

      def meta_loss(meta, params):
        p, _ = run(meta, params, opt.init(params), batches)
        return jnp.sum(p["v"] ** 2)

      return helpers.default_flags_memory(jax.grad(meta_loss), meta, params).temp_bytes

    per_step, sqrt_t = temp_bytes(None), temp_bytes(32)
    carry_bytes = 4 * 3 * (2 * 64 + 64)  # params + Adam's two moments, float32
    # Per step: T carries plus T saved gradients. With K = 32: T/K + K carries.
    self.assertGreater(per_step, T * carry_bytes)
    self.assertLess(sqrt_t, per_step / 8)


class LongHorizonExampleTest(helpers.TestCase):
  def test_long_horizon_example_runs(self):
    """examples/long_horizon.py at a tiny size: records are well-formed and agree."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "long_horizon.py"
    spec = importlib.util.spec_from_file_location("long_horizon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = Path(self.create_tempdir().full_path) / "records.json"
    records = module.main(
      ["--T", "49", "--width", "4", "--batch", "2", "--reps", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(records, default=str))
    assert [r["carries_stored"] for r in records][0] == 49
    assert all(r["carries_stored"] < 49 for r in records[1:])
    grads = [r["meta_grad"] for r in records]
    assert all(g is not None for g in grads)
    assert max(grads) - min(grads) <= 1e-5 * max(abs(g) for g in grads)


if __name__ == "__main__":
  absltest.main()
