"""mfo.nn: blockwise attention and chunked losses, exact in every order of differentiation."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import flax.linen as linen
import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

import mixflow_optax as mfo

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
_NEG = -0.7 * float(np.finfo(np.float32).max)


def _naive_attention(
  q,
  k,
  v,
  bias=None,
  mask=None,
  *,
  scale=None,
  is_causal=False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size=None,
):
  """Softmax attention with jax.nn.dot_product_attention's semantics, in the inputs' dtype."""
  shape = q.shape
  q, k, v = (x.reshape((1,) * (4 - x.ndim) + x.shape) for x in (q, k, v))
  t, n, h = q.shape[1:]
  s, kv_heads = k.shape[1:3]
  k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
  scale = 1 / np.sqrt(h) if scale is None else scale
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    logits = logits + bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  keep = jnp.ones(logits.shape, bool)
  if mask is not None:
    keep &= mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  qi, kj = np.arange(t)[:, None], np.arange(s)[None, :]
  if is_causal:
    keep &= jnp.asarray(qi >= kj)[None, None]
  if local_window_size is not None:
    left, right = (
      (local_window_size,) * 2 if isinstance(local_window_size, int) else local_window_size
    )
    keep &= jnp.asarray((qi <= kj + left) & (qi >= kj - right))[None, None]
  if query_seq_lengths is not None:
    keep &= (jnp.arange(t)[None, :] < query_seq_lengths[:, None])[:, None, :, None]
  if key_value_seq_lengths is not None:
    keep &= (jnp.arange(s)[None, :] < key_value_seq_lengths[:, None])[:, None, None, :]
  probs = jax.nn.softmax(jnp.where(keep, logits, _NEG), axis=-1)
  out = jnp.einsum("bnts,bsnh->btnh", probs, v)
  if query_seq_lengths is not None:
    out = out * (jnp.arange(t)[None, :] < query_seq_lengths[:, None])[:, :, None, None]
  return out.reshape(shape)


def _case(b=2, t=13, s=13, n=2, kv=2, h=4, bias=None, mask=None, lengths=False, seed=0, **kw):
  """Inputs of one attention call: float arrays (differentiated) and the rest."""
  keys = jax.random.split(jax.random.key(seed), 6)
  lead = () if b is None else (b,)
  floats = {
    "q": jax.random.normal(keys[0], lead + (t, n, h)),
    "k": jax.random.normal(keys[1], lead + (s, kv, h)),
    "v": jax.random.normal(keys[2], lead + (s, kv, h)),
  }
  if bias is not None:
    floats["bias"] = jax.random.normal(keys[3], bias)
  other = dict(kw)
  if mask is not None:
    m = jax.random.bernoulli(keys[4], 0.6, mask)
    other["mask"] = m.at[..., 1, :].set(False)  # a fully masked query row
  if lengths:
    other["query_seq_lengths"] = jnp.array([t - 3, 1], jnp.int32)
    other["key_value_seq_lengths"] = jnp.array([s - 2, 0], jnp.int32)
  return floats, other


_CASES = {
  "plain": {},
  "ragged_cross_gqa": dict(t=7, s=11, n=4, kv=2, bias=(2, 4, 7, 11)),
  "mqa_causal_window": dict(t=12, s=12, n=3, kv=1, is_causal=True, local_window_size=(4, 1)),
  # Self-attention with only causal / window masks: the flash path skips masked block pairs.
  "causal_self_padded": dict(t=13, s=13, n=4, kv=2, is_causal=True),
  "window_self": dict(t=12, s=12, local_window_size=(0, 3)),
  "int_window_scale": dict(t=9, s=10, local_window_size=2, scale=0.3),
  "bias_mask_broadcast": dict(t=6, s=9, n=4, kv=2, bias=(2, 1, 1, 9), mask=(1, 4, 6, 9)),
  "bias_over_q": dict(t=6, s=9, bias=(1, 2, 6, 1), mask=(2, 1, 6, 9), is_causal=True),
  "seq_lengths": dict(t=8, s=10, n=2, kv=1, lengths=True),
  "unbatched": dict(b=None, t=5, s=7, bias=(2, 5, 7)),
}


def _loss(attention, other, weights):
  def loss(floats):
    out = attention(floats["q"], floats["k"], floats["v"], floats.get("bias"), **other)
    return jnp.sum(jnp.sin(out) * weights)

  return loss


def _value_grad_hvp(attention, floats, other):
  """Output, gradient and Hessian-vector product (jax.jvp of jax.grad) of a scalar loss."""
  weights = jax.random.normal(jax.random.key(7), floats["q"].shape)
  tangents = jax.tree.map(lambda x: jnp.cos(3.0 * x), floats)
  loss = _loss(attention, other, weights)

  @jax.jit
  def f(floats):
    out = attention(floats["q"], floats["k"], floats["v"], floats.get("bias"), **other)
    grad, hvp = jax.jvp(jax.grad(loss), (floats,), (tangents,))
    return out, grad, hvp

  return f(floats)


class AttentionTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    (f"{case}_{differentiation}", case, differentiation)
    for case in _CASES
    for differentiation in ("flash", "checkpoint")
  )
  def test_value_grad_hvp_match_naive_float64(self, case, differentiation):
    floats, other = _case(**_CASES[case])
    ours = _value_grad_hvp(
      lambda *a, **kw: mfo.nn.dot_product_attention(
        *a, **kw, block_size=4, differentiation=differentiation
      ),
      floats,
      other,
    )
    want = _value_grad_hvp(_naive_attention, floats, other)
    self.assertEqual(ours[0].dtype, jnp.float64)
    chex.assert_trees_all_close(ours, want, rtol=1e-12, atol=1e-12)
    # The gradient is not trivially zero.
    self.assertGreater(float(jnp.abs(ours[1]["k"]).max()), 1e-3)

  @parameterized.named_parameters(
    ("plain", "plain"),
    ("gqa_bias", "ragged_cross_gqa"),
    ("causal_window", "mqa_causal_window"),
    ("masks", "bias_mask_broadcast"),
    ("lengths", "seq_lengths"),
    ("unbatched", "unbatched"),
  )
  def test_float32_matches_jax_nn(self, case):
    with jax.enable_x64(False):
      floats, other = _case(**_CASES[case])
      args = (floats["q"], floats["k"], floats["v"], floats.get("bias"))
      got = mfo.nn.dot_product_attention(*args, **other, block_size=4)
      want = jax.nn.dot_product_attention(*args, **other, implementation="xla")
    self.assertEqual(got.dtype, jnp.float32)
    chex.assert_trees_all_close(got, want, atol=1e-5)

  def test_default_block_size_is_per_backend(self):
    from mixflow_optax.nn._attention import _default_block_size

    self.assertEqual(_default_block_size("cpu"), 128)
    self.assertEqual(_default_block_size("gpu"), 256)
    self.assertEqual(_default_block_size("tpu"), 256)
    # block_size=None is the backend's size: the same blocks, hence the same program.
    q = jnp.ones((1, 300, 2, 8), jnp.float32)
    attend = lambda **kw: jax.jit(
      lambda q: mfo.nn.dot_product_attention(q, q, q, is_causal=True, **kw)
    )
    default_hlo = attend().lower(q).as_text()
    explicit_hlo = attend(block_size=_default_block_size()).lower(q).as_text()
    self.assertEqual(
      default_hlo.replace("jit__lambda", ""), explicit_hlo.replace("jit__lambda", "")
    )
    self.assertNotEqual(explicit_hlo, attend(block_size=64).lower(q).as_text())

  @parameterized.named_parameters(
    ("causal", 16, 4, True, None, 10),
    ("causal_padded", 13, 4, True, None, 10),
    ("causal_window", 13, 4, True, (2, 0), 7),
    ("window", 12, 4, False, (4, 1), 7),
    ("window_reaching_every_block", 12, 4, False, (8, 8), None),
    ("one_block", 4, 4, True, None, None),
  )
  def test_visible_block_pairs(self, seq, block, is_causal, window, expected):
    from mixflow_optax.nn import _attention

    nb = -(-seq // block)
    pairs = _attention._visible_pairs(seq, block, nb, is_causal, window)
    self.assertEqual(None if pairs is None else len(pairs[0]), expected)
    if pairs is None:
      return
    # Exactly the pairs with at least one (query, key) the masks leave open.
    qs, ks = np.arange(seq)[:, None], np.arange(seq)[None, :]
    left, right = window if window is not None else (seq, seq)
    open_ = (ks >= qs - left) & (ks <= qs + (0 if is_causal else right))
    want = {(q // block, k // block) for q, k in zip(*np.nonzero(open_))}
    self.assertEqual(set(zip(*pairs)), want)

  def test_block_size_does_not_change_the_result(self):
    floats, other = _case(t=20, s=23, is_causal=True, bias=(2, 2, 20, 23))
    outs = [
      mfo.nn.dot_product_attention(*floats.values(), **other, block_size=b) for b in (1, 5, 23, 64)
    ]
    for out in outs[1:]:
      chex.assert_trees_all_close(out, outs[0], rtol=1e-13, atol=1e-13)

  def test_forward_mode_checkpoint_and_flash_switching_to_it(self):
    floats, _ = _case()
    args = (floats["q"], floats["k"], floats["v"])
    f = lambda q, d: mfo.nn.dot_product_attention(q, *args[1:], differentiation=d)
    want = jax.jvp(lambda q: _naive_attention(q, *args[1:]), (args[0],), (args[0],))[1]
    for d in ("checkpoint", "flash"):  # flash sees the jvp and runs the checkpoint path
      jvp = jax.jvp(lambda q, d=d: f(q, d), (args[0],), (args[0],))[1]
      chex.assert_trees_all_close(jvp, want, rtol=1e-12, atol=1e-12)
    # A jvp outside a staged call (jit, checkpoint, scan) is invisible from inside: JAX raises.
    with self.assertRaises(TypeError):
      jax.jvp(jax.checkpoint(lambda q: f(q, "flash")), (args[0],), (args[0],))

  @parameterized.named_parameters(
    ("value_shape", dict(v=(2, 13, 2, 5)), "value must have"),
    ("heads", dict(q=(2, 13, 3, 4)), "multiple"),
    ("bias", dict(bias=(2, 2, 5, 13)), "bias of shape"),
    ("mask_dtype", dict(mask=jnp.ones((13, 13))), "boolean"),
    ("lengths", dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), "query_seq_lengths"),
  )
  def test_bad_inputs_raise_clear_errors(self, change, message):
    floats, _ = _case()
    args = {k: floats[k] for k in ("q", "k", "v")}
    kwargs = {}
    for name, x in change.items():
      if name in args:
        args[name] = jnp.zeros(x)
      elif name == "bias":
        kwargs[name] = jnp.zeros(x)
      else:
        kwargs[name] = x
    with self.assertRaisesRegex(ValueError, message):
      mfo.nn.dot_product_attention(*args.values(), **kwargs)

  @parameterized.named_parameters(
    ("causal_block_pairs", dict(is_causal=True), False),
    ("key_blocks_with_bias", dict(), True),
  )
  def test_checkpoint_policy_keeps_the_attention_residuals(self, options, with_bias):
    """A layer checkpointed with save_only_these_names(ATTENTION_RESIDUALS): same values, and
    recomputing it does not run the attention's block loop again."""
    b, s, d, n = 2, 12, 8, 2
    keys = jax.random.split(jax.random.key(3), 4)
    w = 0.5 * jax.random.normal(keys[0], (3, d, n, d // n))
    x = jax.random.normal(keys[1], (b, s, d))
    bias = 0.3 * jax.random.normal(keys[2], (1, n, s, s)) if with_bias else None

    def layer(attention):
      def f(w):
        q, k, v = jnp.einsum("bsd,cdnh->cbsnh", x, w)
        return jnp.sum(jnp.sin(attention(q, k, v, bias, **options)))

      return f

    def ours(q, k, v, bias, **kw):
      return mfo.nn.dot_product_attention(q, k, v, bias, block_size=4, **kw)

    policy = jax.checkpoint_policies.save_only_these_names(mfo.nn.ATTENTION_RESIDUALS)
    tangent = jnp.cos(w)

    def value_grad_hvp(f):
      def run(w):
        grad, hvp = jax.jvp(jax.grad(f), (w,), (tangent,))
        return f(w), grad, hvp

      return run

    kept = jax.checkpoint(layer(ours), policy=policy)
    want = jax.jit(value_grad_hvp(layer(_naive_attention)))(w)
    for f in (kept, jax.checkpoint(layer(ours))):
      chex.assert_trees_all_close(jax.jit(value_grad_hvp(f))(w), want, rtol=1e-12, atol=1e-12)

    def loops(f):
      return str(jax.make_jaxpr(jax.grad(f))(w)).count("scan[")

    # Forward loop, its recomputation, backward loop; the policy drops the recomputation.
    self.assertEqual(loops(jax.checkpoint(layer(ours))), 3)
    self.assertEqual(loops(kept), 2)

  def test_meta_gradient_through_attention_model_mixflow_equals_standard(self):
    d, vocab, s = 8, 11, 10
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
      "emb": 0.5 * jax.random.normal(keys[0], (vocab, d)),
      "qkv": 0.4 * jax.random.normal(keys[1], (d, 3, 2, d // 2)),
      "out": 0.4 * jax.random.normal(keys[2], (d, vocab)),
    }
    tokens = jax.random.randint(keys[3], (2, 3, s + 1), 0, vocab)  # T = 2 steps, batch 3

    def inner_loss(p, log_temp, batch):
      x = p["emb"][batch[:, :-1]]
      q, k, v = jnp.moveaxis(jnp.einsum("bsd,dchf->bschf", x, p["qkv"]), 2, 0)
      h = mfo.nn.dot_product_attention(
        q, k, v, is_causal=True, scale=jnp.exp(log_temp), block_size=4
      )
      logits = (x + h.reshape(x.shape)) @ p["out"]
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    opt = mfo.transforms.adam(0.05)

    def meta_grad(mode):
      run = mfo.unroll(inner_loss, opt, mode=mode)

      def f(log_temp, p0):
        p, _ = run(log_temp, p0, opt.init(p0), tokens)
        return inner_loss(p, log_temp, tokens[0])

      return jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(-1.0), params)

    mixflow, standard = meta_grad("mixflow"), meta_grad("standard")
    self.assertGreater(float(jnp.abs(mixflow[0])), 1e-4)
    chex.assert_trees_all_close(mixflow, standard, rtol=1e-10, atol=1e-13)


class FlaxTest(helpers.TestCase):
  def test_nnx_multi_head_attention(self):
    x = jax.random.normal(jax.random.key(0), (2, 37, 16))
    mask = nnx.make_causal_mask(x[..., 0])  # float 0/1, (batch, 1, q, k)
    make = lambda fn: nnx.MultiHeadAttention(
      num_heads=4, in_features=16, decode=False, attention_fn=fn, rngs=nnx.Rngs(0)
    )
    ours = make(functools.partial(mfo.nn.flax_attention, block_size=8))
    want = make(nnx.dot_product_attention)
    chex.assert_trees_all_close(ours(x, mask=mask), want(x, mask=mask), atol=1e-5)
    chex.assert_trees_all_close(ours(x, is_causal=True), want(x, is_causal=True), atol=1e-5)

  def test_linen_multi_head_dot_product_attention(self):
    x = jax.random.normal(jax.random.key(0), (2, 3, 21, 16))  # two batch dimensions
    mask = linen.make_causal_mask(x[..., 0])
    ours = linen.MultiHeadDotProductAttention(
      num_heads=2, attention_fn=functools.partial(mfo.nn.flax_attention, block_size=4)
    )
    want = linen.MultiHeadDotProductAttention(num_heads=2)
    params = want.init(jax.random.key(1), x, mask=mask)
    chex.assert_trees_all_close(
      ours.apply(params, x, mask=mask), want.apply(params, x, mask=mask), atol=1e-5
    )

  def test_dropout_and_sown_weights_raise(self):
    q = jnp.ones((1, 4, 2, 8))
    with self.assertRaisesRegex(ValueError, "dropout"):
      mfo.nn.flax_attention(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "sow"):
      mfo.nn.flax_attention(q, q, q, module=object())


def _naive_cross_entropy(hidden, w_out, labels, *, bias=None):
  logits = hidden @ w_out + (0 if bias is None else bias[None, None, :])
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - label_logit


class ChunkedCrossEntropyTest(helpers.F64TestCase):
  @parameterized.named_parameters(
    ("ragged_chunks_bias", 7, True),
    ("one_chunk", 64, False),
  )
  def test_value_grad_hvp_match_naive_float64(self, chunk_size, use_bias):
    keys = jax.random.split(jax.random.key(0), 4)
    floats = {
      "h": jax.random.normal(keys[0], (3, 11, 6)),
      "w": jax.random.normal(keys[1], (6, 29)),
    }
    if use_bias:
      floats["b"] = jax.random.normal(keys[2], (29,))
    labels = jax.random.randint(keys[3], (3, 11), 0, 29)
    weights = jnp.cos(jnp.arange(33.0)).reshape(3, 11)
    tangents = jax.tree.map(lambda x: jnp.sin(2.0 * x), floats)

    def value_grad_hvp(ce):
      loss = lambda f: jnp.sum(weights * ce(f["h"], f["w"], labels, bias=f.get("b")))
      grad, hvp = jax.jvp(jax.grad(loss), (floats,), (tangents,))
      return ce(floats["h"], floats["w"], labels, bias=floats.get("b")), grad, hvp

    ours = jax.jit(
      lambda: value_grad_hvp(functools.partial(mfo.nn.chunked_cross_entropy, chunk_size=chunk_size))
    )()
    want = jax.jit(lambda: value_grad_hvp(_naive_cross_entropy))()
    chex.assert_trees_all_close(ours, want, rtol=1e-12, atol=1e-12)

  def test_bad_labels_raise(self):
    with self.assertRaisesRegex(ValueError, "labels"):
      mfo.nn.chunked_cross_entropy(jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.ones((4,)))


_MEMORY_SCRIPT = textwrap.dedent(
  """
  import json, jax, jax.numpy as jnp, mixflow_optax as mfo

  def hvp(attention):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, is_causal=True)))
    g = jax.grad(loss, argnums=(0, 1, 2))
    return lambda q, k, v: jax.jvp(g, (q, k, v), (q, k, v))

  naive = lambda *a, **kw: jax.nn.dot_product_attention(*a, **kw, implementation="xla")
  ours = lambda *a, **kw: mfo.nn.dot_product_attention(*a, **kw, block_size=64)
  x = lambda s: jax.ShapeDtypeStruct((1, s, 2, 16), jnp.float32)
  mem = lambda f, s: mfo.compiled_memory(hvp(f), x(s), x(s), x(s)).temp_bytes
  ckpt = lambda *a, **kw: mfo.nn.dot_product_attention(
    *a, **kw, block_size=64, differentiation="checkpoint"
  )
  out = {"naive": mem(naive, 1024), "ours": mem(ours, 1024), "ours_2x": mem(ours, 2048)}
  out["checkpoint_2x"] = mem(ckpt, 2048)
  print(json.dumps(out))
  """
)


class AttentionMemoryTest(helpers.TestCase):
  def test_hvp_memory_is_linear_in_sequence_length_under_default_flags(self):
    # A subprocess without XLA_FLAGS: the suite's fast-compile flags change
    # compiled memory, and the claim is about what users get.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run(
      [sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    scores = 1024 * 1024 * 2 * 4  # the float32 (heads, S, S) scores at S = 1024: 8 MiB
    self.assertGreater(mem["naive"], 4 * scores)
    # O(S * block): a few (heads, S, block) blocks, 1/16 of the scores each ...
    self.assertLess(mem["ours"], scores)
    # ... and twice the tokens need about twice the memory, not four times.
    self.assertLess(mem["ours_2x"], 2.2 * mem["ours"])
    # Causal self-attention: the flash path's block-pair tiles need far less than the
    # (heads, S, block) slabs of the checkpoint path (docs/long_context.md: 10x at 8192 tokens).
    self.assertLess(mem["ours_2x"], 0.5 * mem["checkpoint_2x"])


if __name__ == "__main__":
  absltest.main()
