"""Measurements behind docs/long_context.md (run with XLA_FLAGS unset).

Compiled temp memory (compile only) of the forward pass, the gradient and one
forward-over-reverse Hessian-vector product (jax.jvp of jax.grad) of causal
attention, naive XLA vs mfo.nn.dot_product_attention; the chunked LM head and
cross entropy vs the naive one; and CPU time of forward + backward (medians of
interleaved repetitions).

  python -m benchmarks.long_context [memory|loss|time|second] > results.json
"""

import json
import sys

import jax
import jax.numpy as jnp

import mixflow_optax as mfo
from benchmarks._bench import interleaved_medians

BATCH, HEADS, HEAD_DIM = 4, 4, 32


def _attention(name):
  if name == "xla":
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"
    )
  differentiation, block = name.split(":")
  return lambda q, k, v: mfo.nn.dot_product_attention(
    q, k, v, is_causal=True, block_size=int(block), differentiation=differentiation
  )


def _programs(attention):
  loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))
  grad = jax.grad(loss, argnums=(0, 1, 2))
  return {
    "forward": attention,
    "grad": grad,
    "hvp": lambda q, k, v: jax.jvp(grad, (q, k, v), (q, k, v)),
  }


def memory():
  rows = []
  for s in (1024, 4096, 8192):
    x = jax.ShapeDtypeStruct((BATCH, s, HEADS, HEAD_DIM), jnp.float32)
    for name in ("xla", "flash:256", "checkpoint:256", "flash:128", "flash:512"):
      if s != 4096 and name in ("flash:128", "flash:512"):
        continue
      for prog, f in _programs(_attention(name)).items():
        mib = mfo.compiled_memory(f, x, x, x).temp_mib
        rows.append({"seq": s, "attention": name, "program": prog, "temp_mib": round(mib, 1)})
        print(rows[-1], file=sys.stderr, flush=True)
  return rows


def loss():
  rows = []
  batch, seq, d, vocab = 4, 2048, 256, 32768
  h = jax.ShapeDtypeStruct((batch, seq, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  for name in ("naive", "chunked:256", "chunked:1024"):
    if name == "naive":
      f = lambda h, w, y: jnp.mean(
        jax.nn.logsumexp(h @ w, axis=-1) - jnp.take_along_axis(h @ w, y[..., None], -1)[..., 0]
      )
    else:
      chunk = int(name.split(":")[1])
      f = lambda h, w, y, chunk=chunk: jnp.mean(
        mfo.nn.chunked_cross_entropy(h, w, y, chunk_size=chunk)
      )
    grad = jax.grad(f, argnums=(0, 1))
    hvp = lambda h, w, y, grad=grad: jax.jvp(lambda h, w: grad(h, w, y), (h, w), (h, w))
    for prog, g in (("forward", f), ("grad", grad), ("hvp", hvp)):
      mib = mfo.compiled_memory(g, h, w, labels).temp_mib
      rows.append({"loss": name, "program": prog, "temp_mib": round(mib, 1)})
      print(rows[-1], file=sys.stderr, flush=True)
  return rows


def timing(reps=7):
  rows = []
  for s in (1024, 2048):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, s, HEADS, HEAD_DIM)) for kk in keys)
    fns = {}
    for name in ("xla", "flash:256", "checkpoint:256"):
      fns[name] = jax.jit(_programs(_attention(name))["grad"])
      jax.block_until_ready(fns[name](q, k, v))
    medians = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, f in fns.items()}, reps)
    for name, sec in medians.items():
      rows.append({"seq": s, "attention": name, "median_ms": round(1e3 * sec, 1)})
      print(rows[-1], file=sys.stderr, flush=True)
  return rows


def second_order(reps=7):
  """flash vs checkpoint: reverse-over-reverse HVP memory, forward-over-reverse HVP time."""
  rows = []
  for name in ("flash:256", "checkpoint:256"):
    grad = _programs(_attention(name))["grad"]
    dot = lambda q, k, v, grad=grad: sum(jnp.vdot(a, b) for a, b in zip(grad(q, k, v), (q, k, v)))
    reverse_hvp = jax.grad(dot, argnums=(0, 1, 2))
    for s in (1024, 4096):
      x = jax.ShapeDtypeStruct((BATCH, s, HEADS, HEAD_DIM), jnp.float32)
      mib = mfo.compiled_memory(reverse_hvp, x, x, x).temp_mib
      rows.append(
        {"seq": s, "attention": name, "program": "reverse_hvp", "temp_mib": round(mib, 1)}
      )
      print(rows[-1], file=sys.stderr, flush=True)
  for s in (1024, 2048):
    q, k, v = (
      jax.random.normal(kk, (1, s, HEADS, HEAD_DIM))
      for kk in jax.random.split(jax.random.key(0), 3)
    )
    fns = {
      name: jax.jit(_programs(_attention(name))["hvp"]) for name in ("flash:256", "checkpoint:256")
    }
    for f in fns.values():
      jax.block_until_ready(f(q, k, v))
    medians = interleaved_medians({n: (lambda f=f: f(q, k, v)) for n, f in fns.items()}, reps)
    for name, sec in medians.items():
      ms = round(1e3 * sec, 1)
      rows.append({"seq": s, "attention": name, "program": "hvp_time", "median_ms": ms})
      print(rows[-1], file=sys.stderr, flush=True)
  return rows


if __name__ == "__main__":
  what = sys.argv[1] if len(sys.argv) > 1 else "memory"
  print(
    json.dumps({"memory": memory, "loss": loss, "time": timing, "second": second_order}[what]())
  )
