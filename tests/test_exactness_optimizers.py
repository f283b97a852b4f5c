"""Meta-gradients through the new optimizers equal plain BPTT through stock optax.

The problem and meta-parameter kinds (tests/helpers.py) and the reference loop
are those of tests/test_exactness.py (a Python-free ``lax.scan`` of ``jax.grad``
+ stock optax steps, differentiated by ``jax.grad``), run for every new hand-written
optimizer and for one optimizer wrapped by ``reparameterize``, in float64,
for the learning rate, per-parameter rates, loss weights and MAML in mixflow
mode, and for the learning rate in standard mode. Where stock optax's meta-gradient is NaN (exactly
zero gradient entries) the reference is central finite differences.
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

T = mfo.transforms
STEPS = 3

# name -> (mfo factory(lr), stock optax factory(lr)). The learning rate is the
# last, linear factor of every update (the per-parameter-rate reference
# relies on it).
OPTIMIZERS = {
  "lion": (lambda lr: T.lion(lr, weight_decay=0.1), lambda lr: optax.lion(lr, weight_decay=0.1)),
  "nadam": (T.nadam, optax.nadam),
  "nadamw": (
    lambda lr: T.nadamw(lr, weight_decay=0.1),
    lambda lr: optax.nadamw(lr, weight_decay=0.1),
  ),
  "adabelief": (T.adabelief, optax.adabelief),
  "amsgrad": (T.amsgrad, optax.amsgrad),
  "adagrad": (T.adagrad, optax.adagrad),
  # Factored second moments for both matrices (3x4 and 4x2), clipping active.
  "adafactor": (
    lambda lr: T.adafactor(lr, min_dim_size_to_factor=2),
    lambda lr: optax.adafactor(lr, min_dim_size_to_factor=2),
  ),
  "lamb": (lambda lr: T.lamb(lr, weight_decay=0.1), lambda lr: optax.lamb(lr, weight_decay=0.1)),
  "muon": (T.muon, optax.contrib.muon),
  "reparameterize_yogi": (
    lambda lr: T.reparameterize(optax.yogi)(learning_rate=lr),
    optax.yogi,
  ),
}


@functools.cache
def _reference_meta_gradient(opt_name, kind):
  """Cached: shared by the two modes."""
  with jax.enable_x64(True):
    params, batches, outer = helpers.exactness_problem(STEPS)
    meta = helpers.meta_params(kind, params)
    ref = jax.jit(jax.grad(helpers.bptt_meta_loss(OPTIMIZERS[opt_name][1], kind), argnums=(0, 1)))
    return jax.device_get(ref(meta, params, batches, outer))


# Every optimizer x meta-parameter kind in mixflow mode; standard mode for the
# learning rate (the two modes share everything but the inner-gradient rule,
# which tests/test_exactness.py covers for every kind).
_CASES = tuple(
  {"testcase_name": f"{o}_{k}_{m}", "opt_name": o, "kind": k, "mode": m}
  for o in OPTIMIZERS
  for k in helpers.META_KINDS
  for m in (("mixflow", "standard") if k == "learning_rate" else ("mixflow",))
)


class ExactnessTest(helpers.F64TestCase):
  @parameterized.named_parameters(*_CASES)
  def test_matches_plain_bptt_through_stock_optax(self, opt_name, kind, mode):
    params, batches, outer = helpers.exactness_problem(STEPS)
    meta = helpers.meta_params(kind, params)
    ours = jax.jit(
      jax.grad(
        helpers.unroll_meta_loss(OPTIMIZERS[opt_name][0](helpers.LR), kind, mode), argnums=(0, 1)
      )
    )
    got = ours(meta, params, batches, outer)
    want = _reference_meta_gradient(opt_name, kind)
    leaves = jax.tree.leaves(want)
    self.assertTrue(all(bool(np.all(np.isfinite(x))) for x in leaves), "stock reference is NaN")
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got)))
    self.assertGreater(max(float(np.max(np.abs(x))) for x in leaves), 1e-6)  # Not vacuous.
    self.assertLessEqual(helpers.max_rel_err(got, want), 1e-10)


# Optimizers whose stock meta-gradient is NaN when a gradient entry is exactly 0.
_ZERO_GRAD_OPTIMIZERS = {
  "nadam": (T.nadam, optax.nadam),
  "amsgrad": (T.amsgrad, optax.amsgrad),
  "adabelief_eps_root_0": (
    lambda lr: T.adabelief(lr, eps=1e-8, eps_root=0.0),
    lambda lr: optax.adabelief(lr, eps=1e-8, eps_root=0.0),
  ),
  "lamb": (T.lamb, optax.lamb),
}


class ZeroGradientTest(helpers.F64TestCase):
  """Through mfo.unroll: finite, equal to central differences, where stock optax gives NaN."""

  @parameterized.named_parameters(
    *(
      {"testcase_name": f"{o}_{m}", "opt_name": o, "mode": m}
      for o in _ZERO_GRAD_OPTIMIZERS
      for m in ("mixflow", "standard")
    )
  )
  def test_exactly_zero_gradient_entries(self, opt_name, mode):
    make, make_stock = _ZERO_GRAD_OPTIMIZERS[opt_name]
    # Feature 1 is always 0: the gradient of w[:, 1] is exactly 0 at every step.
    params = {"w": jnp.asarray([[0.5, -1.0], [0.3, 0.7]]), "b": jnp.asarray([0.1, -0.2])}
    xs = jnp.asarray([[[1.0, 0.0]], [[0.5, 0.0]], [[2.0, 0.0]]])
    meta = {"target": jnp.asarray([0.2, -0.4]), "log_lr": jnp.log(0.1)}

    def inner_loss(p, m, x):
      return jnp.sum((jnp.tanh(x @ p["w"] + p["b"][None, :]) - m["target"][None, :]) ** 2)

    def outer(p):
      return jnp.sum(p["w"] ** 2) + jnp.sum(jnp.tanh(p["b"]))

    opt = make(0.1)
    run = mfo.unroll(
      inner_loss, opt, hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])}, mode=mode
    )

    def meta_loss(m, p0):
      p, _ = run(m, p0, opt.init(p0), xs)
      return outer(p)

    def stock_meta_loss(m, p0):
      s_opt = make_stock(jnp.exp(m["log_lr"]))
      p, s = p0, s_opt.init(p0)
      for x in xs:
        u, s = s_opt.update(jax.grad(inner_loss)(p, m, x), s, p)
        p = optax.apply_updates(p, u)
      return outer(p)

    np.testing.assert_allclose(meta_loss(meta, params), stock_meta_loss(meta, params), rtol=1e-13)
    got = jax.jit(jax.grad(meta_loss, argnums=(0, 1)))(meta, params)
    stock = jax.grad(stock_meta_loss, argnums=(0, 1))(meta, params)
    self.assertTrue(any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(stock)))
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got)))
    # Central differences along a random direction in (meta, params0).
    leaves, treedef = jax.tree.flatten((meta, params))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = jax.tree.unflatten(
      treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
    )
    f = jax.jit(lambda s: meta_loss(*jax.tree.map(lambda x, d: x + s * d, (meta, params), v)))
    fd = (f(1e-6) - f(-1e-6)) / 2e-6
    ad = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(v)))
    np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6, atol=1e-9)
    self.assertGreater(abs(float(ad)), 1e-3)


if __name__ == "__main__":
  absltest.main()
