"""Writing your own reparameterised transform (docs/custom_transforms.md).

- ``ReparamTransformation`` keeps its hyperparameters through every tuple operation.
- The per-leaf helpers are public, and the custom-transform guide's example
  (executed here) follows its optax counterpart, meta-gradient included.
"""

import copy
import functools
import pathlib
import pickle
import re

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
from absl.testing import absltest

import mixflow_optax as mfo

_GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom_transforms.md"


@functools.cache
def _guide_namespace() -> dict:
  """Runs the guide's Python code blocks in order, as a reader would paste them."""
  blocks = re.findall(r"```python\n(.*?)```", _GUIDE.read_text(), flags=re.S)
  assert len(blocks) == 2, len(blocks)
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(_GUIDE), "exec"), namespace)  # noqa: S102
  return namespace


class ReparamTransformationTupleTest(helpers.TestCase):
  def test_hyperparams_survive_tuple_operations(self):
    opt = mfo.transforms.adam(1e-3)
    want = opt.hyperparams
    copies = {
      "_replace": opt._replace(update=opt.update),
      "_make": type(opt)._make(opt),
      "_make_triple": type(opt)._make((opt.init, opt.update, want)),
      "copy": copy.copy(opt),
      "deepcopy": copy.deepcopy(opt),
    }
    for name, got in copies.items():
      with self.subTest(name):
        self.assertIsInstance(got, mfo.transforms.ReparamTransformation)
        self.assertEqual(sorted(got.hyperparams), sorted(want))
        self.assertEqual(float(got.hyperparams["learning_rate"]), 1e-3)
        self.assertEqual(len(got), 2)  # still (init, update) for optax
    self.assertEqual(
      opt._replace(hyperparams={"learning_rate": 0.5}).hyperparams, {"learning_rate": 0.5}
    )
    with self.assertRaisesRegex(ValueError, "unexpected field"):
      opt._replace(learning_rate=0.5)

  def test_pickle_round_trip(self):
    # Transforms built by factories hold closures, which pickle cannot store;
    # with importable functions the hyperparameters travel with the object.
    t = mfo.transforms.ReparamTransformation(len, max, {"learning_rate": 0.1})
    got = pickle.loads(pickle.dumps(t))
    self.assertEqual(got.hyperparams, {"learning_rate": 0.1})
    self.assertEqual(tuple(got), (len, max))


class CustomTransformGuideTest(helpers.F64TestCase):
  def test_per_leaf_helpers_are_public_and_documented(self):
    for name in ("per_leaf", "map_leaves", "leaf_results", "resolve_hyperparams", "PerLeaf"):
      self.assertIn(name, mfo.transforms.__all__)
      self.assertTrue(getattr(mfo.transforms, name).__doc__)

  def test_guide_example_follows_optax(self):
    ns = _guide_namespace()
    opt, stock = ns["adagrad"](0.3), optax.adagrad(0.3)
    loss = lambda w, x: jnp.sum(jnp.sin(w * x) ** 2) + jnp.sum(w**2)
    params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.zeros(())}

    @jax.jit
    def trajectory(params):
      def step(carry, x):
        (p, s), (q, r) = carry
        u, s = opt.update(jax.grad(lambda w: loss(w["w"], x) + w["b"] ** 2)(p), s, p)
        v, r = stock.update(jax.grad(lambda w: loss(w["w"], x) + w["b"] ** 2)(q), r, q)
        return ((optax.apply_updates(p, u), s), (optax.apply_updates(q, v), r)), None

      init = ((params, opt.init(params)), (params, stock.init(params)))
      return jax.lax.scan(step, init, jnp.arange(1.0, 5.0))[0]

    (p, _), (q, _) = trajectory(params)
    chex.assert_trees_all_close(p, q, rtol=1e-13, atol=1e-15)
    self.assertGreater(float(jnp.abs(p["w"] - params["w"]).max()), 0.1)

  def test_guide_meta_gradient_matches_bptt_through_optax(self):
    ns = _guide_namespace()
    xs, w0, m = jnp.ones((3, 4)), jnp.zeros(4), jnp.log(0.1)

    def bptt(log_lr):
      stock = optax.adagrad(jnp.exp(log_lr))
      w, s = w0, stock.init(w0)
      for x in xs:
        u, s = stock.update(jax.grad(ns["loss"])(w, log_lr, x), s, w)
        w = optax.apply_updates(w, u)
      return ns["loss"](w, log_lr, xs[-1])

    chex.assert_trees_all_close(ns["meta_grad"], jax.grad(bptt)(m), rtol=1e-12)
    self.assertTrue(bool(jnp.isfinite(ns["meta_grad"])))


if __name__ == "__main__":
  absltest.main()
