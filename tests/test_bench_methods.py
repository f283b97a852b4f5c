"""benchmarks.methods: its meta-gradient methods compute what their names say, at tiny sizes."""

import chex
import helpers
import jax
import jax.numpy as jnp
from absl.testing import absltest

import benchmarks
from benchmarks import methods


class MethodsTest(helpers.F64TestCase):
  def test_methods_on_ridge(self):
    prob = methods.ridge(60, jnp.float64, n=32, d=4)
    grads = {
      m: methods.meta_grad(prob, m, jnp.float64)(*prob.args_for(m))
      for m in ("bptt", "mixflow", "forward", "first_order", "implicit_cg", "truncated")
    }
    ref = grads["bptt"]
    for m in ("mixflow", "forward"):  # exact
      self.assertLess(methods.rel_err(grads[m], ref), 1e-12, m)
    # The L2 strengths act on theta only through the inner gradient: first order drops them.
    self.assertEqual(methods.rel_err(grads["first_order"], ref), 1.0)
    # 60 steps of a well-conditioned problem: close to the fixed point, so implicit is close.
    self.assertLess(methods.rel_err(grads["implicit_cg"], ref), 1e-4)
    self.assertGreater(methods.rel_err(grads["truncated"], ref), 1e-3)
    info = methods.implicit_info(prob, "cg", jnp.float64)
    self.assertLess(info["grad_norm"], 1e-4)
    self.assertLess(info["relative_residual"], 1e-9)

  def test_markdown_table(self):
    record = dict(
      problem="ridge", T=5, method="implicit_cg", err_f64=0.5, err_f32=0.5, temp_mib=1.0, ms=2.0
    )
    table = methods.format_markdown(
      [record, {**record, "grad_norm": 0.3, "relative_residual": 1e-11, "iterations": 7}]
    )
    self.assertIn("| ridge | 5 | implicit_cg | 0.5 | 0.5 | 1.000 | 2.00 | | |", table)
    self.assertIn("| 0.3 | 1.0e-11 (7) |", table)

  def test_lm_attention_for_forward_mode(self):
    """``attention="mfo_checkpoint"``: the same model, and a bare jax.jvp works."""

    def problem(**sizes):
      return benchmarks.make_problem("lm", 1, small=True, seed=1, dtype=jnp.float64, **sizes)

    default, ckpt = problem(), problem(attention="mfo_checkpoint")
    value_and_grad = lambda p: jax.jit(jax.value_and_grad(p.outer_loss))(p.params, p.outer_batch)
    chex.assert_trees_all_close(value_and_grad(ckpt), value_and_grad(default), rtol=1e-12)
    tangent = jax.tree.map(jnp.ones_like, ckpt.params)
    jvp = jax.jit(lambda p, t: jax.jvp(lambda q: ckpt.outer_loss(q, ckpt.outer_batch), (p,), (t,)))
    _, dv = jvp(ckpt.params, tangent)
    self.assertTrue(bool(jnp.isfinite(dv)))


if __name__ == "__main__":
  absltest.main()
