"""Speed of one exact meta-gradient of a transformer LM, side by side with TorchOpt.

The problem: loss weighting (one logit per sequence and inner step) of the
``lm-s`` transformer (d 128, 4 layers, 4 heads, vocabulary 512) at batch 4,
T = 4 inner Adam steps, float32, on the CPU. Each configuration runs in its own
fresh worker process (so that its memory is the resident-set growth of one
meta-gradient, and compile caches of one do not help another); the driver
makes the workers take turns, one meta-gradient each per round, and reports
medians over the rounds and ratios to the PyTorch peer
(``benchmarks/torchopt_peer.py``, TorchOpt's differentiable Adam, started with
``--torch-python``; skipped without it).

JAX configurations (``CONFIGS``):

- ``mixflow``: :func:`mixflow_optax.unroll`, the long-context recipe
  (``mfo.nn.dot_product_attention`` with its backend's block size, per-block
  ``jax.checkpoint``).
- ``mixflow_keep_attn``: the recipe with the per-block checkpoint policy
  ``save_only_these_names(mfo.nn.ATTENTION_RESIDUALS)`` (recomputing a block
  does not run the attention's block loop again).
- ``mixflow_noremat``: the recipe without per-block remat.
- ``mixflow_b64`` / ``mixflow_b256``: the recipe with 64- / 256-key attention
  blocks (the CPU default is 128).
- ``mixflow_xla``: the same meta-gradient, plain ``jax.nn`` attention (XLA),
  no per-block remat.
- ``standard_xla``: the standard implementation as a user writes it (stock
  ``optax.adam``, ``jax.grad`` inside ``lax.scan``, ``jax.grad`` outside) on
  the plain model.
- ``train`` / ``train_xla``: one plain training step (inner gradient and
  Adam update) of the two models: the unit a meta-step's cost is quoted in.

Per configuration: compile seconds (trace + lower + compile, in a fresh
process; and again from the persistent compilation cache when
``--cache-dir`` is given), XLA's compiled temporary memory, the resident-set
growth during the first call, and the median seconds of one call.

  python -m benchmarks.lm_speed --seq 256 1024 --reps 5 \\
      --torch-python .torch-peer-venv/bin/python --out docs/bench/lm_speed.json
  python -m benchmarks.lm_speed --check   # float64 agreement with the peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

#: Worker configurations of the JAX side: (method, model sizes).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
  "mixflow": ("mixflow", {"attn_block": 0}),
  "mixflow_b64": ("mixflow", {"attn_block": 64}),
  "mixflow_b256": ("mixflow", {"attn_block": 256}),
  "mixflow_noremat": ("mixflow", {"attn_block": 0, "block_remat": 0}),
  "mixflow_keep_attn": ("mixflow", {"attn_block": 0, "block_remat": 2}),
  "mixflow_xla": ("mixflow", {"attention": "xla", "block_remat": 0}),
  "standard_xla": ("standard", {"attention": "xla", "block_remat": 0}),
  "train": ("train", {"attn_block": 0}),
  "train_xla": ("train", {"attention": "xla", "block_remat": 0}),
}

#: The benchmark LM: lm-s at batch 4 (sequence length set per run).
BASE_SIZES: dict[str, Any] = {"batch": 4}
T_STEPS = 4


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
  """Samples the resident set size every millisecond while active."""

  def __enter__(self):
    self.base = self.peak = _rss_mib()
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


def make_lm_problem(seq: int, dtype: Any = None, **sizes: Any):
  """The benchmark problem at sequence length ``seq`` (``sizes`` override the LM's)."""
  import jax.numpy as jnp

  from benchmarks._problems import make_problem

  return make_problem(
    "lm-s",
    T_STEPS,
    task="loss_weighting",
    dtype=dtype or jnp.float32,
    seq_len=seq,
    **{**BASE_SIZES, **sizes},
  )


def export_problem(problem, path: str) -> None:
  """Writes what the PyTorch peer needs (parameters, meta-parameters, tokens) to ``path``."""
  params = problem.params
  arrays = {"embed": params["embed"], "norm_final": params["norm_final"], **params["layers"]}
  np.savez(
    path,
    **{k: np.asarray(v) for k, v in arrays.items()},
    meta_params=np.asarray(problem.meta_params),
    inner_tokens=np.asarray(problem.inner_batches["tokens"]),
    outer_tokens=np.asarray(problem.outer_batch["tokens"]),
    n_heads=problem.config["n_heads"],
    learning_rate=problem.learning_rate,
  )


def _train_step(problem):
  """One plain training step: the inner gradient and a stock optax Adam update."""
  import jax
  import optax

  opt = optax.adam(problem.learning_rate)
  batch0 = jax.tree.map(lambda x: x[0], problem.inner_batches)

  @jax.jit
  def step(params, batch):
    grads = jax.grad(problem.outer_loss)(params, batch)
    updates, _ = opt.update(grads, opt.init(params), params)
    return optax.apply_updates(params, updates)

  return step, (problem.params, batch0)


def _jax_program(config: str, seq: int, dtype: Any = None):
  from benchmarks._bench import make_meta_grad

  method, sizes = CONFIGS[config]
  problem = make_lm_problem(seq, dtype, **sizes)
  if method == "train":
    return (*_train_step(problem), problem)
  return make_meta_grad(problem, method), problem.args, problem


def _jax_worker(config: str, seq: int, cache_dir: str | None) -> None:
  import jax

  if cache_dir:
    from benchmarks._bench import enable_compilation_cache

    enable_compilation_cache(cache_dir)
  fn, args, _ = _jax_program(config, seq)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_mib = None if mem is None else mem.temp_size_in_bytes / 2**20
  with _PeakRss() as rss:
    jax.block_until_ready(compiled(*args))
  first = {"compile_s": compile_s, "temp_mib": temp_mib, "peak_rss_mib": rss.peak - rss.base}
  print(json.dumps(first), flush=True)
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "quit":
      break
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class _Worker:
  """A worker process answering one JSON line per command."""

  def __init__(self, argv: list[str], env: dict[str, str] | None = None):
    self.proc = subprocess.Popen(
      argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )

  def ask(self, msg: dict[str, Any] | None = None) -> dict[str, Any]:
    if msg is not None:
      self.proc.stdin.write(json.dumps(msg) + "\n")
      self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")
    return json.loads(line)

  def close(self) -> None:
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait()


def _jax_argv(config: str, seq: int, cache_dir: str | None) -> list[str]:
  argv = [sys.executable, "-m", "benchmarks.lm_speed", "--worker", config, "--seq", str(seq)]
  return argv + (["--cache-dir", cache_dir] if cache_dir else [])


def _torch_worker(python: str, path: str, what: str, threads: int) -> _Worker:
  here = os.path.dirname(os.path.abspath(__file__))
  # OpenMP threads that spin while they wait collapse on a shared machine:
  # they wait passively here, as a job on a busy machine should.
  env = {**os.environ, "PEER_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
  w = _Worker([python, os.path.join(here, "torchopt_peer.py")], env=env)
  w.what = what
  w.info = w.ask({"cmd": "load", "path": path, "dtype": "float32"})
  return w


def measure(
  seq: int,
  configs: list[str],
  reps: int,
  torch_python: str | None,
  cache_dir: str | None,
  torch_threads: int = 2,
  log=print,
) -> list[dict[str, Any]]:
  """One sequence length: every configuration's compile, memory and median time, interleaved."""
  workers: dict[str, _Worker] = {}
  rows: dict[str, dict[str, Any]] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for c in configs:
      workers[c] = _Worker(_jax_argv(c, seq, cache_dir))
      rows[c] = {"system": "jax", "config": c, "seq": seq, **workers[c].ask()}
      log(rows[c])
    if torch_python:
      path = os.path.join(tmp, "problem.npz")
      export_problem(make_lm_problem(seq), path)
      for c, what in (("torchopt", "meta"), ("torch_train", "train")):
        workers[c] = _torch_worker(torch_python, path, what, torch_threads)
        first = workers[c].ask({"cmd": "run", "what": what})
        rows[c] = {"system": "torch", "config": c, "seq": seq, "compile_s": 0.0, **first}
        rows[c]["peak_rss_mib"] = first["peak_rss_mib"]
        rows[c]["versions"] = workers[c].info
        rows[c]["threads"] = torch_threads
        log(rows[c])
    times: dict[str, list[float]] = {c: [] for c in workers}
    for r in range(reps):
      for c, w in workers.items():
        msg = {"cmd": "run"}
        if c in ("torchopt", "torch_train"):
          msg["what"] = w.what
        times[c].append(w.ask(msg)["seconds"])
      log(
        f"seq {seq} round {r + 1}/{reps}: "
        + ", ".join(f"{c} {t[-1]:.2f}s" for c, t in times.items())
      )
    for w in workers.values():
      w.close()
  if cache_dir:
    # The same programs compiled again in fresh processes: now from the cache.
    for c in configs:
      w = _Worker(_jax_argv(c, seq, cache_dir))
      rows[c]["cached_compile_s"] = w.ask()["compile_s"]
      w.close()
  for c in rows:
    rows[c]["median_s"] = statistics.median(times[c])
    rows[c]["times_s"] = times[c]
  peer = rows.get("torchopt", {}).get("median_s")
  for row in rows.values():
    row.pop("seconds", None)
    row["time_vs_torchopt"] = None if not peer else row["median_s"] / peer
    train = rows.get("train" if row["system"] == "jax" else "torch_train", {}).get("median_s")
    row["time_vs_train_step"] = None if not train else row["median_s"] / train
  return list(rows.values())


def check_agreement(torch_python: str, seq: int = 32) -> dict[str, float]:
  """float64 meta-gradients of JAX (mixflow, both attentions) and the peer: relative difference."""
  import jax

  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp

  from benchmarks._bench import make_meta_grad

  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "problem.npz")
    problem = make_lm_problem(seq, jnp.float64, attn_block=16)
    export_problem(problem, path)
    w = _Worker([torch_python, os.path.join(os.path.dirname(__file__), "torchopt_peer.py")])
    w.ask({"cmd": "load", "path": path, "dtype": "float64"})
    w.ask({"cmd": "grad", "path": os.path.join(tmp, "g.npz")})
    w.close()
    ref = np.load(os.path.join(tmp, "g.npz"))["meta_grad"]
    for attention in ("mfo", "xla"):
      sizes = {"attention": attention, "attn_block": 16}
      p = make_lm_problem(seq, jnp.float64, **sizes)
      g = np.asarray(make_meta_grad(p, "mixflow")(*p.args))
      out[attention] = float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))
  return out


def format_table(rows: list[dict[str, Any]]) -> str:
  """The rows as the markdown table of docs/benchmarks.md."""

  def num(x, fmt):
    return "" if x is None else format(x, fmt)

  lines = [
    "| S | configuration | median s | / TorchOpt | / own train step | compile s | cached compile s "
    "| RSS growth MiB | XLA temp MiB |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['seq']} | {r['config']} | {num(r['median_s'], '.2f')} | "
      f"{num(r.get('time_vs_torchopt'), '.2f')} | {num(r.get('time_vs_train_step'), '.1f')} | "
      f"{num(r.get('compile_s') if r['system'] == 'jax' else None, '.0f')} | "
      f"{num(r.get('cached_compile_s'), '.0f')} | {num(r.get('peak_rss_mib'), ',.0f')} | "
      f"{num(r.get('temp_mib'), ',.0f')} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  ap.add_argument("--torch-python", default=None, help="the peer's interpreter (its own venv)")
  ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--cache-dir", default=None, help="persistent compilation cache directory")
  ap.add_argument("--out", default=None, help="write the rows as JSON here")
  ap.add_argument("--table", nargs="+", default=None, help="print result files as markdown")
  ap.add_argument("--check", action="store_true", help="float64 agreement with the peer")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return _jax_worker(args.worker, args.seq[0], args.cache_dir)
  if args.table:
    print(format_table([r for path in args.table for r in json.load(open(path))]))
    return None
  if args.check:
    print(json.dumps(check_agreement(args.torch_python or "python")))
    return None
  log = lambda x: print(x, file=sys.stderr, flush=True)
  rows = []
  for seq in args.seq:
    rows += measure(
      seq, args.configs, args.reps, args.torch_python, args.cache_dir, args.torch_threads, log
    )
  text = json.dumps(rows, indent=1)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return None


if __name__ == "__main__":
  main()
