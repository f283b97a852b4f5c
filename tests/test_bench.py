"""Tests of the benchmark (mixflow_optax.bench) at tiny sizes.

They run the real benchmark code end to end on tiny models, with XLA's
fast-compile options (compilation, not execution, dominates at this size).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixflow_optax import bench
from mixflow_optax.bench.__main__ import main

FAST = bench.FAST_COMPILE_OPTIONS
KEYS = (
  "task",
  "model",
  "T",
  "method",
  "temp_mib",
  "seconds",
  "compile_s",
  "mem_ratio_vs_standard",
  "mem_ratio_vs_standard_best",
  "time_ratio_vs_standard",
  "time_ratio_vs_standard_best",
  "pct_faster_vs_standard",
  "pct_faster_vs_standard_best",
  "rel_err",
  "meta_grad_max",
)


@pytest.mark.parametrize("model", ["mlp", "lm"])
def test_timed_run(model, tmp_path):
  """Compile + 1 timed rep of every method: well-formed records and outputs."""
  # One run per test (no shared fixture), so that `pytest -n auto` spreads
  # the two models over workers instead of repeating a fixture on each.
  records = bench.run_benchmark(
    {model: (2,)}, reps=1, small=True, out=tmp_path, progress=False, compiler_options=FAST
  )
  assert [r["method"] for r in records] == list(bench.METHODS)
  std = records[0]
  for r in records:
    for key in KEYS:
      assert key in r, key
    assert (r["task"], r["model"], r["T"]) == ("loss_weighting", model, 2)
    assert r["temp_mib"] > 0
    assert math.isfinite(r["seconds"]) and r["seconds"] > 0
    assert r["rel_err"] < 1e-3, (r["method"], r["rel_err"])
    assert r["meta_grad_max"] > 0
    assert r["mem_ratio_vs_standard"] == pytest.approx(std["temp_mib"] / r["temp_mib"])
    assert r["time_ratio_vs_standard"] == pytest.approx(r["seconds"] / std["seconds"])
    assert r["pct_faster_vs_standard"] == pytest.approx(100 * (1 - r["time_ratio_vs_standard"]))
  assert std["rel_err"] == 0.0
  assert records[1]["mem_ratio_vs_standard_best"] == pytest.approx(1.0)
  # Even at tiny size, reverse-over-reverse without remat holds more.
  assert records[2]["method"] == "mixflow" and records[2]["mem_ratio_vs_standard"] > 1

  with open(tmp_path / "results.json") as f:
    assert json.load(f) == json.loads(json.dumps(records))
  assert os.path.getsize(tmp_path / "results.png") > 0
  table = bench.format_table(records)
  assert all(m in table for m in bench.METHODS)
  assert len(table.splitlines()) == 2 + len(records)


def test_compile_only(tmp_path):
  records = bench.run_benchmark(
    {"mlp": (1,)},
    methods=["mixflow", "standard_best"],
    compile_only=True,
    small=True,
    out=tmp_path,
    progress=False,
    compiler_options=FAST,
  )
  # "standard" (the reference) is always added, first.
  assert [r["method"] for r in records] == ["standard", "mixflow", "standard_best"]
  for r in records:
    assert r["seconds"] is None and r["rel_err"] is None
    assert r["time_ratio_vs_standard"] is None and r["pct_faster_vs_standard"] is None
    assert r["temp_mib"] > 0 and r["mem_ratio_vs_standard_best"] > 0
  with open(tmp_path / "results.json") as f:
    assert json.load(f)[0]["seconds"] is None


@pytest.mark.parametrize("model", ["mlp", "lm"])
def test_all_methods_exact_in_float64(model):
  """Every method computes the same meta-gradient: the baselines are exact against mixflow."""
  with jax.enable_x64(True):
    problem = bench.make_problem(model, T=2, small=True, dtype=jnp.float64)
    args = (problem.meta_params, problem.params, problem.inner_batches, problem.outer_batch)
    grads = {}
    for m in bench.METHODS:
      f = bench.make_meta_grad(problem, m).lower(*args).compile(FAST)
      grads[m] = jax.tree.map(np.asarray, f(*args))
  ref = grads["standard"]
  assert ref[0].dtype == np.float64
  assert np.max(np.abs(ref[0])) > 0
  for m, g in grads.items():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
      assert np.all(np.isfinite(a)), m
      err = np.max(np.abs(a - b)) / np.max(np.abs(b))
      assert err < 1e-10, (model, m, err)


def test_cli_smoke(tmp_path, capsys):
  argv = ["--small", "--models", "mlp", "--T", "1", "--reps", "1", "--no-progress"]
  argv += ["--methods", "mixflow", "--fast-compile", "--out", str(tmp_path)]
  argv += ["--size", "mlp.batch=4", "--size", "mlp.depth=2"]
  assert main(argv) == 0
  printed = capsys.readouterr().out
  assert "mixflow" in printed and "standard" in printed
  with open(tmp_path / "results.json") as f:
    records = json.load(f)
  assert [r["method"] for r in records] == ["standard", "mixflow"]
  assert all(r["seconds"] > 0 for r in records)
  assert records[0]["config"]["batch"] == 4 and records[0]["config"]["depth"] == 2


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown model"):
    bench.make_problem("cnn", T=2)
  with pytest.raises(ValueError, match="unknown method"):
    bench.make_meta_grad(bench.make_problem("mlp", T=1, small=True), "reverse")
  with pytest.raises(ValueError, match="even head dimension"):
    bench.LMConfig(d_model=12, n_heads=4)
  for argv in (["--models", "cnn"], ["--size", "lm.width=3"], ["--size", "lm.seq_len"]):
    with pytest.raises(SystemExit):
      main(argv)
