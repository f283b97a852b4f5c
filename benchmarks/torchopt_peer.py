"""The PyTorch peer of the LM speed comparison: TorchOpt's differentiable Adam.

The same meta-learning problem as ``benchmarks/lm_speed.py`` (loss weighting of
a pre-RMSNorm RoPE transformer LM with tied embeddings, T inner Adam steps,
per-sequence loss weights ``sigmoid(eta[t])``), written as a TorchOpt user
writes it: ``torch.autograd.grad(..., create_graph=True)`` inside the loop,
TorchOpt's functional ``adam`` with ``inplace=False``, one backward pass of the
outer loss (reverse-over-reverse). Attention is
``scaled_dot_product_attention`` with the MATH backend forced: on a CPU the
default picks a flash kernel that has no double backward.

This file needs ``torch`` and ``torchopt``, which are NOT project dependencies:
run it with the interpreter of its own virtual environment (made by
``benchmarks/make_torch_peer_env.sh``). ``benchmarks/lm_speed.py`` starts it as a
worker process and talks to it over stdin/stdout (one JSON object a line):

  {"cmd": "load", "path": "problem.npz", "dtype": "float32"}  -> {"ok": ...}
  {"cmd": "run"}       -> {"seconds": ..., "peak_rss_mib": ...}
  {"cmd": "grad", "path": "out.npz"}  -> writes the meta-gradient
  {"cmd": "quit"}

The problem (initial parameters, token ids, sizes) comes from the JAX side in
an ``.npz``, so both frameworks start from the same numbers and the float64
meta-gradients can be compared.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchopt
from torch.nn.attention import SDPBackend, sdpa_kernel

_PARAM_NAMES = (
  "embed",
  "norm_attn",
  "wq",
  "wk",
  "wv",
  "wo",
  "norm_ff",
  "w_in",
  "w_out",
  "norm_final",
)


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
  """Samples the resident set size every millisecond while active."""

  def __enter__(self):
    self.base = _rss_mib()
    self.peak = self.base
    self._stop = False

    def poll():
      while not self._stop:
        self.peak = max(self.peak, _rss_mib())
        time.sleep(0.001)

    self._thread = threading.Thread(target=poll, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()
    self.peak = max(self.peak, _rss_mib())


def _rms_norm(x, scale):
  return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6) * scale


def _rope(x):
  """``x``: (B, S, H, Dh), rotating feature pairs (i, i + Dh/2) as the JAX model does."""
  _, s, _, dh = x.shape
  half = dh // 2
  freqs = 1.0 / (10000.0 ** (torch.arange(half, dtype=x.dtype) / half))
  angles = torch.arange(s, dtype=x.dtype)[:, None] * freqs[None, :]
  cos, sin = torch.cos(angles)[None, :, None, :], torch.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _per_sequence_ce(params, tokens, n_heads):
  """Token-mean next-token cross-entropy of each sequence, shape (B,)."""
  embed, norm_attn, wq, wk, wv, wo, norm_ff, w_in, w_out, norm_final = params
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  b, s = inputs.shape
  d = embed.shape[1]
  dh = d // n_heads
  x = embed[inputs]
  for i in range(wq.shape[0]):
    h = _rms_norm(x, norm_attn[i])
    q = _rope((h @ wq[i]).view(b, s, n_heads, dh)).transpose(1, 2)
    k = _rope((h @ wk[i]).view(b, s, n_heads, dh)).transpose(1, 2)
    v = (h @ wv[i]).view(b, s, n_heads, dh).transpose(1, 2)
    with sdpa_kernel(SDPBackend.MATH):
      out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + out.transpose(1, 2).reshape(b, s, d) @ wo[i]
    h = _rms_norm(x, norm_ff[i])
    x = x + F.gelu(h @ w_in[i], approximate="tanh") @ w_out[i]
  logits = _rms_norm(x, norm_final) @ embed.T
  nll = -torch.gather(F.log_softmax(logits, dim=-1), -1, targets[..., None])[..., 0]
  return nll.mean(dim=-1)


class Problem:
  """The loss-weighting problem loaded from the JAX side's ``.npz``."""

  def __init__(self, path: str, dtype: str):
    data = np.load(path)
    self.dtype = getattr(torch, dtype)
    torch.set_default_dtype(self.dtype)  # TorchOpt's bias correction follows it.
    self.params = tuple(torch.tensor(data[n], dtype=self.dtype) for n in _PARAM_NAMES)
    self.eta = torch.tensor(data["meta_params"], dtype=self.dtype)
    self.inner_tokens = torch.tensor(data["inner_tokens"], dtype=torch.long)
    self.outer_tokens = torch.tensor(data["outer_tokens"], dtype=torch.long)
    self.n_heads = int(data["n_heads"])
    self.lr = float(data["learning_rate"])

  def meta_grad(self) -> torch.Tensor:
    eta = self.eta.detach().requires_grad_()
    params = tuple(p.detach().requires_grad_() for p in self.params)
    opt = torchopt.adam(lr=self.lr)
    state = opt.init(params)
    for t in range(self.inner_tokens.shape[0]):
      ce = _per_sequence_ce(params, self.inner_tokens[t], self.n_heads)
      loss = torch.mean(torch.sigmoid(eta[t]) * ce)
      grads = torch.autograd.grad(loss, params, create_graph=True)
      updates, state = opt.update(grads, state, inplace=False)
      params = torchopt.apply_updates(params, updates, inplace=False)
    outer = _per_sequence_ce(params, self.outer_tokens, self.n_heads).mean()
    (g,) = torch.autograd.grad(outer, eta)
    return g

  def train_step(self) -> torch.Tensor:
    """One plain training step (gradient + Adam update), the unit a meta-step is compared with."""
    params = tuple(p.detach().requires_grad_() for p in self.params)
    opt = torchopt.adam(lr=self.lr)
    state = opt.init(params)
    ce = _per_sequence_ce(params, self.inner_tokens[0], self.n_heads)
    grads = torch.autograd.grad(ce.mean(), params)
    updates, state = opt.update(grads, state, inplace=False)
    return torchopt.apply_updates(params, updates, inplace=False)[0]


def _timed(fn):
  with _PeakRss() as rss:
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
  del out
  return {"seconds": seconds, "peak_rss_mib": rss.peak - rss.base}


def main() -> None:
  torch.set_num_threads(int(os.environ.get("PEER_THREADS", "2")))
  problem = None
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg["cmd"]
    if cmd == "quit":
      break
    if cmd == "load":
      problem = Problem(msg["path"], msg.get("dtype", "float32"))
      reply = {"ok": True, "torch": torch.__version__, "torchopt": torchopt.__version__}
    elif cmd == "run":
      reply = _timed(problem.meta_grad if msg.get("what", "meta") == "meta" else problem.train_step)
    elif cmd == "grad":
      np.savez(msg["path"], meta_grad=problem.meta_grad().detach().numpy())
      reply = {"ok": True}
    else:
      reply = {"error": f"unknown command {cmd!r}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
