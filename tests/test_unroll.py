"""mfo.unroll: modes, jit/vmap/jvp, integer batches, losses, bad input."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo

# The suite's canonical tiny problem (tests/helpers.py).
_inner_loss = helpers.weighted_mlp_loss
_problem = helpers.mlp_problem
_hp = helpers.lr_hyperparams


def _meta_loss(mode, opt=None, **kwargs):
  opt = opt or mfo.transforms.adam(0.1)
  run = mfo.unroll(_inner_loss, opt, hyperparams_fn=_hp, mode=mode, **kwargs)

  def meta_loss(meta, params, batches):
    p, _ = run(meta, params, opt.init(params), batches)
    return jnp.sum(p["v"] ** 2) + jnp.sum(p["w"])

  return meta_loss


class UnrollTest(helpers.F64TestCase):
  def test_forward_matches_stock_optax_loop(self):
    params, meta, batches = _problem()
    opt = mfo.transforms.adam(0.1)
    run = jax.jit(mfo.unroll(_inner_loss, opt, return_losses=True))
    p, state, losses = run(meta, params, opt.init(params), batches)
    stock = optax.adam(0.1)
    q, s = params, stock.init(params)
    want_losses = []
    for t in range(3):
      b = jax.tree.map(lambda x, t=t: x[t], batches)
      loss, g = jax.value_and_grad(_inner_loss)(q, meta, b)
      want_losses.append(loss)
      u, s = stock.update(g, s, q)
      q = optax.apply_updates(q, u)
    chex.assert_trees_all_close(p, q, rtol=1e-12)
    chex.assert_trees_all_close(state, s, rtol=1e-12)
    np.testing.assert_allclose(losses, jnp.stack(want_losses), rtol=1e-12)

  @parameterized.named_parameters(
    *helpers.named_grid(
      mode={"mixflow": "mixflow", "standard": "standard"},
      remat={"remat": True, "no_remat": False},
      save_inner_grads={"saved_grads": True, "recomputed_grads": False},
    )
  )
  def test_remat_options_do_not_change_meta_gradient(self, mode, remat, save_inner_grads):
    params, meta, batches = _problem()
    ref = jax.jit(jax.grad(_meta_loss("standard", remat=False), argnums=(0, 1)))
    got = jax.jit(
      jax.grad(_meta_loss(mode, remat=remat, save_inner_grads=save_inner_grads), argnums=(0, 1))
    )
    chex.assert_trees_all_close(
      got(meta, params, batches), ref(meta, params, batches), rtol=1e-11, atol=1e-14
    )

  def test_meta_loss_using_inner_losses(self):
    params, meta, batches = _problem()

    def meta_loss(mode):
      opt = mfo.transforms.sgd(0.1, momentum=0.9)
      run = mfo.unroll(_inner_loss, opt, hyperparams_fn=_hp, mode=mode, return_losses=True)

      def f(meta, params):
        p, _, losses = run(meta, params, opt.init(params), batches)
        return jnp.sum(p["v"]) + jnp.sum(losses * jnp.arange(1.0, 4.0))

      return jax.jit(jax.grad(f, argnums=(0, 1)))

    chex.assert_trees_all_close(
      meta_loss("mixflow")(meta, params), meta_loss("standard")(meta, params), rtol=1e-11
    )

  def test_integer_batches(self):
    # Token ids as inputs: integer leaves get no cotangent and cause no error.
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"emb": jax.random.normal(k[0], (11, 4)), "out": jax.random.normal(k[1], (4, 11))}
    tokens = jax.random.randint(k[2], (3, 2, 6), 0, 11)

    def lm_loss(p, meta, toks):
      h = jnp.tanh(p["emb"][toks[:, :-1]])
      logits = h @ p["out"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:])
      return jnp.mean(jax.nn.softplus(meta) * ce)

    opt = mfo.transforms.adam(0.05)

    def meta_loss(mode):
      run = mfo.unroll(lm_loss, opt, mode=mode)

      def f(meta, p):
        p, _ = run(meta, p, opt.init(p), tokens)
        return lm_loss(p, jnp.zeros(()), tokens[0])

      return jax.jit(jax.grad(f, argnums=(0, 1)))

    chex.assert_trees_all_close(
      meta_loss("mixflow")(jnp.asarray(0.3), params),
      meta_loss("standard")(jnp.asarray(0.3), params),
      rtol=1e-10,
      atol=1e-14,
    )

  def test_vmap_over_maml_tasks(self):
    params, meta, _ = _problem()
    k = jax.random.split(jax.random.PRNGKey(9), 2)
    tasks = (jax.random.normal(k[0], (5, 3, 4, 2)), jax.random.normal(k[1], (5, 3, 4)))
    g = jax.jit(jax.vmap(jax.grad(_meta_loss("mixflow"), argnums=(0, 1)), in_axes=(None, None, 0)))
    got = g(meta, params, tasks)
    ref = jax.jit(jax.grad(_meta_loss("standard"), argnums=(0, 1)))
    for i in range(5):
      want = ref(meta, params, jax.tree.map(lambda x, i=i: x[i], tasks))
      chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], got), want, rtol=1e-10)

  def test_standard_mode_under_jvp(self):
    params, meta, batches = _problem()
    f = _meta_loss("standard")
    tangent = jax.tree.map(jnp.ones_like, meta)
    _, jvp_out = jax.jit(lambda m, t: jax.jvp(lambda m: f(m, params, batches), (m,), (t,)))(
      meta, tangent
    )
    grad = jax.jit(jax.grad(_meta_loss("mixflow")))(meta, params, batches)
    np.testing.assert_allclose(jvp_out, sum(jnp.sum(g) for g in jax.tree.leaves(grad)), rtol=1e-10)

  def test_no_retrace_on_new_values(self):
    params, meta, batches = _problem()
    grad_fn = jax.grad(_meta_loss("mixflow"))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def g(meta, params, batches):
      return grad_fn(meta, params, batches)

    g(meta, params, batches)
    g(jax.tree.map(lambda x: x + 1.0, meta), params, batches)

  def test_first_order_mode_drops_second_order_terms(self):
    # With the inner gradient a constant, θ_T = θ_0 − α Σ_t g_t (SGD), so
    # dL/dθ_0 = ∇L(θ_T) and dL/dα = −Σ_t <∇L(θ_T), g_t>.
    params, meta, batches = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(_inner_loss, opt, hyperparams_fn=_hp, mode="first_order")
    outer = lambda p: jnp.sum(p["v"] ** 2) + jnp.sum(p["w"])

    def f(meta, p0):
      p, _ = run(meta, p0, opt.init(p0), batches)
      return outer(p)

    d_meta, d_p0 = jax.jit(jax.grad(f, argnums=(0, 1)))(meta, params)

    @jax.jit
    def reference(meta, q):
      gs = []
      for t in range(3):
        g = jax.grad(_inner_loss)(q, meta, jax.tree.map(lambda x, t=t: x[t], batches))
        gs.append(g)
        q = jax.tree.map(lambda a, b: a - 0.1 * b, q, g)
      return jax.grad(outer)(q), gs

    dq, gs = reference(meta, params)
    chex.assert_trees_all_close(d_p0, dq, rtol=1e-12)
    want_lr = -sum(
      sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(dq), jax.tree.leaves(g))) for g in gs
    )
    np.testing.assert_allclose(d_meta["log_lr"], want_lr * 0.1, rtol=1e-10)
    np.testing.assert_allclose(d_meta["logits"], 0.0)  # weights only act via g


class MemoryTest(helpers.TestCase):
  """Compiled (deterministic) memory under default XLA flags: mixflow stores no per-step activations."""

  def test_mixflow_uses_less_temp_memory_than_standard(self):
    D, B, T = 32, 1024, 4
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = [jax.random.normal(kk, (D, D)) / D**0.5 for kk in jax.random.split(k[0], 8)]
    xs = jax.random.normal(k[1], (T, B, D))

    def inner_loss(p, meta, x):
      for w in p:
        x = jnp.tanh(x @ w)
      return jnp.mean(meta * x**2)

    opt = mfo.transforms.adam(1e-3)

    def temp_bytes(mode, remat):
      run = mfo.unroll(inner_loss, opt, mode=mode, remat=remat, save_inner_grads=remat)

      def f(meta, p):
        p, _ = run(meta, p, opt.init(p), xs)
        return sum(jnp.sum(w**2) for w in p)

      grad_fn = jax.grad(f, argnums=(0, 1))
      return helpers.default_flags_memory(grad_fn, jnp.ones(()), params).temp_bytes

    mixflow = temp_bytes("mixflow", True)
    self.assertLess(mixflow * 4, temp_bytes("standard", False))
    self.assertLess(mixflow, temp_bytes("standard", True))


class BadInputTest(helpers.TestCase):
  def test_leading_axis_mismatch(self):
    params, meta, (x, y) = _problem()
    opt = mfo.transforms.adam(0.1)
    run = mfo.unroll(_inner_loss, opt)
    with self.assertRaisesRegex(ValueError, r"disagree on the leading.*\[0\]: 3.*\[1\]: 2"):
      run(meta, params, opt.init(params), (x, y[:2]))

  def test_scalar_batch_leaf(self):
    params, meta, (x, _) = _problem()
    opt = mfo.transforms.adam(0.1)
    with self.assertRaisesRegex(ValueError, "leading axis of length T"):
      mfo.unroll(_inner_loss, opt)(meta, params, opt.init(params), (x, jnp.zeros(())))

  def test_integer_params(self):
    _, meta, batches = _problem()
    opt = mfo.transforms.sgd(0.1)
    params = {"w": jnp.ones((2, 3), jnp.int32), "v": jnp.ones(3)}
    with self.assertRaisesRegex(TypeError, r"\['w'\].*int32.*floating point"):
      mfo.unroll(_inner_loss, opt)(meta, params, opt.init(params), batches)

  def test_hyperparams_fn_with_stock_optax(self):
    with self.assertRaisesRegex(TypeError, "stock optax.*mfo.transforms.adam"):
      mfo.unroll(_inner_loss, optax.adam(0.1), hyperparams_fn=_hp)

  def test_unknown_hyperparameter(self):
    params, meta, batches = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(_inner_loss, opt, hyperparams_fn=lambda m: {"lr": 0.1})
    with self.assertRaisesRegex(ValueError, r"unknown hyperparameter.*'lr'.*\['learning_rate'\]"):
      run(meta, params, opt.init(params), batches)

  def test_hyperparameter_tree_mismatch(self):
    params, meta, batches = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(_inner_loss, opt, hyperparams_fn=lambda m: {"learning_rate": {"w": 0.1}})
    with self.assertRaisesRegex(ValueError, "same structure as the parameters"):
      run(meta, params, opt.init(params), batches)

  def test_non_scalar_inner_loss(self):
    params, meta, batches = _problem()
    opt = mfo.transforms.sgd(0.1)
    run = mfo.unroll(lambda p, m, b: p["v"] * 2.0, opt)
    with self.assertRaisesRegex(TypeError, "scalar loss"):
      jax.grad(lambda m: jnp.sum(run(m, params, opt.init(params), batches)[0]["v"]))(meta)

  def test_bad_mode(self):
    with self.assertRaisesRegex(ValueError, "mode must be one of"):
      mfo.unroll(_inner_loss, mfo.transforms.sgd(0.1), mode="fast")


if __name__ == "__main__":
  absltest.main()
