"""mfo.meta_optimizer: optax tutorial reproduction, exactness, MAML tasks, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import mixflow_optax as mfo


def _tutorial_samples(n_steps, N=7, seed=0):
  """The data of optax's meta-learning tutorial: y = 10 x + noise."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 10.0, size=(n_steps, N))
  y = 10.0 * x + rng.normal(size=(n_steps, N))
  return jnp.asarray(x), jnp.asarray(y)


class TutorialReproductionTest(parameterized.TestCase):
  """optax's examples/meta_learning.ipynb, rewritten on mfo.meta_optimizer."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_same_trajectory_as_the_optax_tutorial(self, mode):
    n_steps = 40
    xs, ys = _tutorial_samples(n_steps)
    init_lr, meta_lr = jnp.asarray(0.1), jnp.asarray(0.03)
    theta0 = jnp.asarray(-0.6)

    # --- The tutorial, as written with optax.inject_hyperparams. ---
    opt = optax.inject_hyperparams(optax.rmsprop)(learning_rate=init_lr)
    meta_opt = optax.adam(learning_rate=meta_lr)

    def loss(theta, x, y):
      return optax.l2_loss(y, x * theta)

    def step(theta, state, x, y):
      grad = jax.grad(loss)(theta, x, y)
      updates, state = opt.update(grad, state)
      return optax.apply_updates(theta, updates), state

    def outer_loss(eta, theta, state, samples):
      state.hyperparams["learning_rate"] = jax.nn.sigmoid(eta)
      for x, y in samples[:-1]:
        theta, state = step(theta, state, x, y)
      x, y = samples[-1]
      return loss(theta, x, y), (theta, state)

    @jax.jit
    def outer_step(eta, theta, meta_state, state, samples):
      grad, (theta, state) = jax.grad(outer_loss, has_aux=True)(eta, theta, state, samples)
      meta_updates, meta_state = meta_opt.update(grad, meta_state)
      return optax.apply_updates(eta, meta_updates), theta, meta_state, state

    eta = -jnp.log(1.0 / init_lr - 1)
    theta, state, meta_state = theta0, opt.init(theta0), meta_opt.init(eta)
    want_etas, want_thetas = [], []
    for i in range(n_steps):
      samples = [(xs[i, j], ys[i, j]) for j in range(7)]
      eta, theta, meta_state, state = outer_step(eta, theta, meta_state, state, samples)
      want_etas.append(eta)
      want_thetas.append(theta)

    # --- The same with mfo.meta_optimizer. ---
    def mfo_loss(theta, meta, xy):
      return optax.l2_loss(xy[1], xy[0] * theta)

    mo = mfo.meta_optimizer(
      mfo_loss,
      mfo_loss,
      mfo.transforms.rmsprop(init_lr),
      optax.adam(meta_lr),
      hyperparams_fn=lambda eta: {"learning_rate": jax.nn.sigmoid(eta)},
      mode=mode,
    )
    mstate = mo.init(-jnp.log(1.0 / init_lr - 1), theta0)

    def body(mstate, data):
      x, y = data
      mstate, metrics = mo.step(mstate, (x[:-1], y[:-1]), (x[-1], y[-1]))
      return mstate, (mstate.meta_params, mstate.params, metrics["outer_loss"])

    _, (etas, thetas, _) = jax.jit(lambda s: jax.lax.scan(body, s, (xs, ys)))(mstate)
    np.testing.assert_allclose(etas, jnp.stack(want_etas), rtol=1e-10)
    np.testing.assert_allclose(thetas, jnp.stack(want_thetas), rtol=1e-10)
    # The learning rate actually moved (the test can fail).
    self.assertGreater(abs(float(etas[-1] - etas[0])), 1e-3)


def _sine_tasks(n_tasks, T, k, seed):
  rng = np.random.default_rng(seed)
  amp = rng.uniform(0.5, 2.0, size=(n_tasks, 1, 1))
  phase = rng.uniform(0.0, np.pi, size=(n_tasks, 1, 1))
  x_in = rng.uniform(-3, 3, size=(n_tasks, T, k))
  x_out = rng.uniform(-3, 3, size=(n_tasks, 2 * k))
  y_in = amp * np.sin(x_in + phase)
  y_out = amp[:, 0] * np.sin(x_out + phase[:, 0])
  return (jnp.asarray(x_in), jnp.asarray(y_in)), (jnp.asarray(x_out), jnp.asarray(y_out))


def _net(params, x):
  h = jnp.tanh(x[:, None] * params["w1"][None, :] + params["b1"][None, :])
  return jnp.sum(h * params["w2"][None, :], axis=-1)


def _regression_loss(params, meta, batch):
  x, y = batch
  return jnp.mean((_net(params, x) - y) ** 2)


def _maml_meta(seed=0, width=16):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  init = {
    "w1": jax.random.normal(k[0], (width,)),
    "b1": jnp.zeros(width),
    "w2": jax.random.normal(k[1], (width,)) / width**0.5,
  }
  log_lr = jax.tree.map(lambda p: jnp.full_like(p, jnp.log(0.05)), init)  # Meta-SGD
  return {"init": init, "log_lr": log_lr}


def _maml_optimizer(mode, outer_opt, inner_opt=None):
  inner_opt = inner_opt or mfo.transforms.sgd(0.05)
  return mfo.meta_optimizer(
    _regression_loss,
    _regression_loss,
    inner_opt,
    outer_opt,
    hyperparams_fn=lambda m: {"learning_rate": jax.tree.map(jnp.exp, m["log_lr"])},
    init_params_fn=lambda m: m["init"],
    batched_tasks=True,
    mode=mode,
  )


class MamlTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_meta_sgd_meta_gradient_equals_plain_bptt(self, mode):
    inner, outer = _sine_tasks(n_tasks=3, T=3, k=5, seed=1)
    meta = _maml_meta()
    # With outer SGD(1), one step moves meta by exactly minus the meta-gradient.
    mo = _maml_optimizer(mode, optax.sgd(1.0))
    new_state, metrics = jax.jit(mo.step)(mo.init(meta), inner, outer)
    got = jax.tree.map(lambda a, b: a - b, meta, new_state.meta_params)

    def plain_task_loss(m, inner_task, outer_task):
      params = m["init"]
      for t in range(3):
        g = jax.grad(_regression_loss)(params, None, jax.tree.map(lambda x, t=t: x[t], inner_task))
        params = jax.tree.map(lambda p, gg, lr: p - jnp.exp(lr) * gg, params, g, m["log_lr"])
      return _regression_loss(params, None, outer_task)

    def plain_meta_loss(m):
      return jnp.mean(jax.vmap(plain_task_loss, in_axes=(None, 0, 0))(m, inner, outer))

    want = jax.jit(jax.grad(plain_meta_loss))(meta)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(metrics["outer_loss"], plain_meta_loss(meta), rtol=1e-12)
    self.assertEqual(metrics["inner_losses"].shape, (3, 3))
    np.testing.assert_allclose(metrics["meta_grad_norm"], optax.tree.norm(want), rtol=1e-10)
    # The state's params are the (updated) learned initialisation.
    chex.assert_trees_all_close(new_state.params, new_state.meta_params["init"])

  def test_reset_inner_keeps_the_starting_point(self):
    inner, outer = _sine_tasks(n_tasks=1, T=2, k=4, seed=2)
    inner, outer = jax.tree.map(lambda x: x[0], (inner, outer))
    meta = {"log_lr": jnp.log(0.05)}
    params0 = _maml_meta()["init"]
    mo = mfo.meta_optimizer(
      _regression_loss,
      _regression_loss,
      mfo.transforms.adam(0.05),
      optax.sgd(1.0),
      hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m["log_lr"])},
      reset_inner=True,
    )
    state = mo.init(meta, params0)
    s1, _ = jax.jit(mo.step)(state, inner, outer)
    chex.assert_trees_all_close(s1.params, params0)
    chex.assert_trees_all_equal(s1.count, jnp.asarray(1, jnp.int32))

  def test_maml_convergence_smoke(self):
    # A couple of hundred meta-steps of MAML/Meta-SGD on sinusoids lower the
    # post-adaptation loss on held-out tasks.
    mo = _maml_optimizer("mixflow", optax.adam(3e-3))
    state = mo.init(_maml_meta(seed=3, width=24))
    test_inner, test_outer = _sine_tasks(n_tasks=16, T=3, k=10, seed=99)

    @jax.jit
    def evaluate(state):
      mo_eval = _maml_optimizer("mixflow", optax.sgd(0.0))
      _, metrics = mo_eval.step(state, test_inner, test_outer)
      return metrics["outer_loss"]

    @jax.jit
    def train(state, seed):
      def body(state, key):
        x_in = jax.random.uniform(key, (8, 3, 10), minval=-3, maxval=3)
        k2, k3, k4 = jax.random.split(key, 3)
        amp = jax.random.uniform(k2, (8, 1, 1), minval=0.5, maxval=2.0)
        phase = jax.random.uniform(k3, (8, 1, 1), maxval=jnp.pi)
        x_out = jax.random.uniform(k4, (8, 20), minval=-3, maxval=3)
        inner = (x_in, amp * jnp.sin(x_in + phase))
        outer = (x_out, amp[:, 0] * jnp.sin(x_out + phase[:, 0]))
        return mo.step(state, inner, outer)[0], None

      return jax.lax.scan(body, state, jax.random.split(jax.random.PRNGKey(seed), 200))[0]

    before = float(evaluate(state))
    after = float(evaluate(train(state, 0)))
    self.assertLess(after, 0.7 * before)


class MetaBadInputTest(absltest.TestCase):
  def _mo(self, **kw):
    return mfo.meta_optimizer(
      _regression_loss, _regression_loss, mfo.transforms.sgd(0.1), optax.adam(0.1), **kw
    )

  def test_integer_meta_params(self):
    with self.assertRaisesRegex(TypeError, r"meta_params leaf \['n'\].*int32.*floating point"):
      self._mo().init({"n": jnp.asarray(3, jnp.int32)}, jnp.zeros(3))

  def test_batched_tasks_need_a_reset(self):
    with self.assertRaisesRegex(ValueError, "reset_inner=True.*init_params_fn"):
      self._mo(batched_tasks=True)

  def test_non_scalar_outer_loss(self):
    mo = mfo.meta_optimizer(
      _regression_loss,
      lambda p, m, b: (_net(p, b[0]) - b[1]) ** 2,
      mfo.transforms.sgd(0.1),
      optax.adam(0.1),
    )
    params = _maml_meta()["init"]
    inner, outer = jax.tree.map(lambda x: x[0], _sine_tasks(1, 2, 3, 0))
    with self.assertRaisesRegex(TypeError, "outer_loss.*scalar.*jnp.mean"):
      mo.step(mo.init(jnp.zeros(()), params), inner, outer)

  def test_params_with_init_params_fn(self):
    mo = self._mo(init_params_fn=lambda m: m)
    with self.assertRaisesRegex(TypeError, "without params"):
      mo.init(jnp.zeros(3), jnp.zeros(3))


if __name__ == "__main__":
  absltest.main()


class RecipeExactnessTest(parameterized.TestCase):
  """Recipes through meta_optimizer equal plain BPTT through stock optax."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def _one_step_meta_gradient(self, mo, meta, params0, inner, outer):
    # With outer SGD(1), one step moves meta by exactly minus the meta-gradient.
    new_state, _ = jax.jit(mo.step)(mo.init(meta, params0), inner, outer)
    return jax.tree.map(lambda a, b: a - b, meta, new_state.meta_params)

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_adamw_betas_weight_decay_and_lr(self, mode):
    inner, outer = jax.tree.map(lambda x: x[0], _sine_tasks(1, 4, 6, seed=5))
    params0 = _maml_meta(seed=5)["init"]
    meta = {
      "logit_b1": jnp.asarray(2.0),
      "logit_b2": jnp.asarray(4.0),
      "log_wd": jnp.log(1e-2),
      "log_lr": jnp.log(0.03),
    }

    def hp(m):  # positivity and (0, 1) ranges by parameterisation
      return {
        "b1": jax.nn.sigmoid(m["logit_b1"]),
        "b2": jax.nn.sigmoid(m["logit_b2"]),
        "weight_decay": jnp.exp(m["log_wd"]),
        "learning_rate": jnp.exp(m["log_lr"]),
      }

    mo = mfo.meta_optimizer(
      _regression_loss,
      _regression_loss,
      mfo.transforms.adamw(0.03),
      optax.sgd(1.0),
      hyperparams_fn=hp,
      mode=mode,
    )
    got = self._one_step_meta_gradient(mo, meta, params0, inner, outer)

    def plain(m):
      h = hp(m)
      opt = optax.adamw(h["learning_rate"], b1=h["b1"], b2=h["b2"], weight_decay=h["weight_decay"])
      params, state = params0, opt.init(params0)
      for t in range(4):
        g = jax.grad(_regression_loss)(params, None, jax.tree.map(lambda x, t=t: x[t], inner))
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
      return _regression_loss(params, None, outer)

    want = jax.jit(jax.grad(plain))(meta)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)
    self.assertTrue(all(abs(float(v)) > 1e-8 for v in jax.tree.leaves(want)))

  @parameterized.named_parameters(("mixflow", "mixflow"), ("standard", "standard"))
  def test_loss_weights_from_a_scoring_network(self, mode):
    # A small network scores each (x, y) example; its weights are the
    # meta-parameters and act only through the inner loss.
    inner, outer = jax.tree.map(lambda x: x[0], _sine_tasks(1, 3, 6, seed=6))
    params0 = _maml_meta(seed=6)["init"]
    k = jax.random.split(jax.random.PRNGKey(7), 2)
    scorer = {"w": 0.5 * jax.random.normal(k[0], (2, 8)), "v": 0.5 * jax.random.normal(k[1], (8,))}

    def weights(s, x, y):
      feats = jnp.stack([x, y], axis=-1)
      return 2.0 * jax.nn.sigmoid(jnp.tanh(feats @ s["w"]) @ s["v"])

    def weighted_loss(params, s, batch):
      x, y = batch
      return jnp.mean(weights(s, x, y) * (_net(params, x) - y) ** 2)

    mo = mfo.meta_optimizer(
      weighted_loss, _regression_loss, mfo.transforms.adam(0.05), optax.sgd(1.0), mode=mode
    )
    got = self._one_step_meta_gradient(mo, scorer, params0, inner, outer)

    def plain(s):
      opt = optax.adam(0.05)
      params, state = params0, opt.init(params0)
      for t in range(3):
        g = jax.grad(weighted_loss)(params, s, jax.tree.map(lambda x, t=t: x[t], inner))
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
      return _regression_loss(params, None, outer)

    want = jax.jit(jax.grad(plain))(scorer)
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)

  def test_first_order_mode_in_meta_optimizer(self):
    # First-order MAML: the meta-gradient of the init is the outer gradient at
    # the adapted parameters (SGD inner loop).
    inner, outer = _sine_tasks(n_tasks=2, T=2, k=4, seed=8)
    meta = {"init": _maml_meta(seed=8)["init"]}
    mo = mfo.meta_optimizer(
      _regression_loss,
      _regression_loss,
      mfo.transforms.sgd(0.05),
      optax.sgd(1.0),
      init_params_fn=lambda m: m["init"],
      batched_tasks=True,
      mode="first_order",
    )
    new_state, _ = jax.jit(mo.step)(mo.init(meta), inner, outer)
    got = jax.tree.map(lambda a, b: a - b, meta, new_state.meta_params)["init"]

    def adapted_grad(inner_task, outer_task):
      p = meta["init"]
      for t in range(2):
        g = jax.grad(_regression_loss)(p, None, jax.tree.map(lambda x, t=t: x[t], inner_task))
        p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
      return jax.grad(_regression_loss)(p, None, outer_task)

    want = jax.tree.map(lambda g: jnp.mean(g, 0), jax.vmap(adapted_grad)(inner, outer))
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-14)


class ConvergenceSmokeTest(absltest.TestCase):
  """A few hundred meta-steps on CPU improve the outer loss (float32)."""

  def test_learning_rate_learning(self):
    # Online meta-learning of SGD's log learning rate, starting far too small.
    inner, outer = _sine_tasks(n_tasks=1, T=4, k=16, seed=11)
    inner, outer = jax.tree.map(lambda x: x[0].astype(jnp.float32), (inner, outer))
    params0 = jax.tree.map(lambda p: p.astype(jnp.float32), _maml_meta(seed=11)["init"])
    mo = mfo.meta_optimizer(
      _regression_loss,
      _regression_loss,
      mfo.transforms.sgd(1e-3, momentum=0.9),
      optax.adam(0.05),
      hyperparams_fn=lambda m: {"learning_rate": jnp.exp(m)},
      reset_inner=True,
    )
    state = mo.init(jnp.log(jnp.float32(1e-3)), params0)

    @jax.jit
    def train(state):
      def body(state, _):
        state, metrics = mo.step(state, inner, outer)
        return state, metrics["outer_loss"]

      return jax.lax.scan(body, state, None, length=200)

    state, losses = train(state)
    self.assertLess(float(losses[-1]), 0.5 * float(losses[0]))
    self.assertGreater(float(jnp.exp(state.meta_params)), 5e-3)  # the rate grew over 5x

  def test_loss_weighting_downweights_corrupted_examples(self):
    # Half of the inner examples have corrupted labels; per-example weight
    # logits are learned against a clean validation batch.
    n, T = 32, 4
    rng = np.random.default_rng(12)
    x = rng.uniform(-2, 2, size=(T, n)).astype(np.float32)
    y = np.sin(x)
    corrupted = np.zeros((T, n), bool)
    corrupted[:, ::2] = True
    y = np.where(corrupted, -3.0 * y + 2.0, y).astype(np.float32)
    x_val = rng.uniform(-2, 2, size=(64,)).astype(np.float32)
    inner = (jnp.asarray(x), jnp.asarray(y), jnp.arange(T * n).reshape(T, n))
    outer = (jnp.asarray(x_val), jnp.sin(jnp.asarray(x_val)))
    params0 = jax.tree.map(lambda p: p.astype(jnp.float32), _maml_meta(seed=12)["init"])

    def weighted_loss(params, logits, batch):
      x, y, idx = batch
      w = jax.nn.sigmoid(logits[idx])
      return jnp.mean(w * (_net(params, x) - y) ** 2)

    mo = mfo.meta_optimizer(
      weighted_loss,
      _regression_loss,
      mfo.transforms.adam(0.05),
      optax.adam(0.1),
      reset_inner=True,
    )
    state = mo.init(jnp.zeros(T * n, jnp.float32), params0)

    @jax.jit
    def train(state):
      def body(state, _):
        state, metrics = mo.step(state, inner, outer)
        return state, metrics["outer_loss"]

      return jax.lax.scan(body, state, None, length=300)

    state, losses = train(state)
    self.assertLess(float(losses[-1]), 0.7 * float(losses[0]))
    w = jax.nn.sigmoid(state.meta_params).reshape(T, n)
    self.assertLess(float(jnp.mean(w[corrupted])), float(jnp.mean(w[~corrupted])) - 0.1)
