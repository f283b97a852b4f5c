"""Tests of the benchmark suite (``benchmarks/``, outside the installed package) at tiny sizes.

They run the real benchmark code end to end on tiny models, with XLA's
fast-compile options (compilation, not execution, dominates at this size).
Nothing here is timed: the tests check that every method computes the same
meta-gradient, that records are well formed and that the frontier search and
the outputs are right.
"""

import contextlib
import doctest
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

# The benchmark lives at the repository root, next to tests/ (not in the package).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import benchmarks as bench  # noqa: E402
from benchmarks import _bench, _problems, _report, _suite  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402

FAST = bench.FAST_COMPILE_OPTIONS
KEYS = (
  "task",
  "model",
  "family",
  "T",
  "optimizer",
  "method",
  "batch",
  "seq_len",
  "n_params",
  "compile_only",
  "temp_mib",
  "arg_mib",
  "out_mib",
  "total_mib",
  "peak_mib",
  "seconds",
  "compile_s",
  "mem_ratio_vs_standard",
  "mem_ratio_vs_standard_best",
  "total_ratio_vs_standard",
  "time_ratio_vs_standard",
  "time_ratio_vs_standard_best",
  "pct_faster_vs_standard",
  "pct_faster_vs_standard_best",
  "rel_err",
  "meta_grad_norm",
  "mem_vs_hvp",
  "vocab",
  "attention",
  "block_remat",
  "naive",
  "dtype",
  "backend",
  "config",
  "experiments",
)


class _approx:
  """``x == _approx(y)``: equal to a relative tolerance (a failure prints both)."""

  def __init__(self, value, rel=1e-6):
    self.value, self.rel = value, rel

  def __eq__(self, other):
    return math.isclose(other, self.value, rel_tol=self.rel, abs_tol=1e-12)

  def __repr__(self):
    return f"{self.value} +- {self.rel:g} rel"


def _check_record(r, *, compile_only):
  for key in KEYS:
    assert key in r, key
  assert r["compile_only"] is compile_only
  # First-order loss weighting has an identically zero meta-gradient, which
  # XLA folds to a constant: no temporaries, no arguments used.
  folded = (r["method"], r["task"]) == ("first_order", "loss_weighting")
  if not folded:
    assert r["temp_mib"] > 0 and r["arg_mib"] > 0 and r["out_mib"] > 0
  assert r["total_mib"] == _approx(r["temp_mib"] + r["arg_mib"] + r["out_mib"], rel=0.01)
  assert r["peak_mib"] is None  # CPU: no allocator statistics.
  if compile_only:
    assert r["seconds"] is None and r["rel_err"] is None and r["time_ratio_vs_standard"] is None
  else:
    assert math.isfinite(r["seconds"]) and r["seconds"] > 0
    assert r["meta_grad_norm"] > 0 or folded
  # Ratios against the reference of the same configuration (which frontier
  # probes of other methods may not have measured).
  if r["experiments"] != ["frontier"] and not folded:
    assert r["mem_ratio_vs_standard"] > 0


def _by(records, **match):
  return [r for r in records if all(r[k] == v for k, v in match.items())]


class ExactTest(helpers.F64TestCase):
  """Every method computes the same meta-gradient (float64)."""

  def test_every_task_and_method_is_exact_in_float64(self):
    """The baselines and MixFlow compute one meta-gradient: a benchmark of wrong baselines is void.

    Every method on loss weighting; the core methods and first-order on the
    other tasks (the variants differ from them only in checkpointing, which is
    task-independent).
    """
    core = (*bench.CORE_METHODS, "first_order")
    suite = bench.Suite(
      "test",
      (
        bench.Point("loss_weighting", "mlp", 2, (), bench.METHODS, True, ("grid",)),
        bench.Point("learning_rate", "mlp", 2, (), core, True, ("grid",)),
        bench.Point("maml", "mlp", 2, (), core, True, ("grid",)),
      ),
      small=True,
    )
    result = bench.run_suite(suite, reps=1, dtype=jnp.float64, fast_compile=True, progress=False)
    records = result.records
    assert len(records) == len(bench.METHODS) + 2 * len(core)
    for r in records:
      _check_record(r, compile_only=False)
      assert r["dtype"] == "float64" and r["experiments"] == ["grid"]
      if r["method"] == "hvp":
        assert r["rel_err"] is None  # The floor of one inner HVP: not a meta-gradient.
      elif r["method"] != "first_order":
        assert r["rel_err"] < 1e-10, (r["task"], r["method"], r["rel_err"])
    # First-order drops the second-order terms: an approximation, and for loss
    # weights (which act only through the inner gradient) no signal at all.
    fo = {r["task"]: r for r in _by(records, method="first_order")}
    assert fo["maml"]["rel_err"] > 1e-4 and fo["learning_rate"]["rel_err"] > 1e-4
    assert fo["loss_weighting"]["meta_grad_norm"] == 0.0
    for r in records:
      std = _by(records, task=r["task"], method="standard")[0]
      best = _by(records, task=r["task"], method="standard_best")[0]
      assert r["time_ratio_vs_standard"] == _approx(r["seconds"] / std["seconds"])
      if r["temp_mib"] == 0:
        assert r["mem_ratio_vs_standard"] is None  # Folded to a constant (see above).
        continue
      assert r["mem_ratio_vs_standard"] == _approx(std["temp_mib"] / r["temp_mib"])
      assert r["mem_ratio_vs_standard_best"] == _approx(best["temp_mib"] / r["temp_mib"])
      assert r["pct_faster_vs_standard"] == _approx(100 * (1 - r["time_ratio_vs_standard"]))
    # Even at tiny size, reverse-over-reverse without remat holds more.
    for task in bench.TASKS:
      assert _by(records, task=task, method="mixflow")[0]["mem_ratio_vs_standard"] > 1

  def test_other_inner_optimizers_are_exact_in_float64(self):
    """With inner Lion and Adafactor too, every method computes the standard meta-gradient.

    Learning-rate learning with every exact method, MAML with the core ones
    (the variants differ only in checkpointing, which is task-independent);
    not loss weighting: Lion's sign has zero derivative with respect to loss
    weights. Adafactor's MLP is 128 wide, so that its second moments are
    factored (``min_dim_size_to_factor=128``).
    """
    exact = tuple(m for m in bench.METHODS if m not in ("first_order", "hvp"))
    wide = (("width", 128),)
    points = [
      bench.Point(task, "mlp", 2, sizes, methods, True, ("grid",), opt)
      for opt, sizes in (("lion", ()), ("adafactor", wide))
      for task, methods in (("learning_rate", exact), ("maml", bench.CORE_METHODS))
    ]
    suite = bench.Suite("test", tuple(points), small=True)
    result = bench.run_suite(suite, reps=1, dtype=jnp.float64, fast_compile=True, progress=False)
    records = result.records
    assert len(records) == 2 * (len(exact) + len(bench.CORE_METHODS))
    for r in records:
      _check_record(r, compile_only=False)
      assert r["optimizer"] in ("lion", "adafactor") and r["meta_grad_norm"] > 0
      assert r["rel_err"] < 1e-10, (r["optimizer"], r["task"], r["method"], r["rel_err"])
    # The optimizer is the one named: its learning-rate meta-gradient is not Adam's.
    p = bench.make_problem("mlp", 2, task="learning_rate", small=True, dtype=jnp.float64)
    adam = float(jnp.abs(bench.make_meta_grad(p, "standard")(*p.args)["log_lr"]))
    for opt in ("lion", "adafactor"):
      rec = _by(records, optimizer=opt, task="learning_rate", method="standard")[0]
      if opt == "adafactor":
        assert rec["config"]["width"] == 128
      assert not math.isclose(rec["meta_grad_norm"], adam, rel_tol=1e-3), opt
    with self.assertRaisesRegex(ValueError, "unknown inner optimizer"):
      bench.make_problem("mlp", 2, small=True, optimizer="adamax_typo")

  def test_hvp_is_one_hessian_vector_product(self):
    """The "hvp" floor: d/de of the inner gradient (parameters and loss weights) along theta."""
    p = bench.make_problem("mlp", 2, small=True, seed=2, dtype=jnp.float64)
    hvp = bench.make_meta_grad(p, "hvp")(*p.args)
    batch = jax.tree.map(lambda x: x[0], p.inner_batches)

    def grad_at(eps):
      params = jax.tree.map(lambda x: (1 + eps) * x, p.params)  # The tangent is theta itself.
      return jax.grad(p.inner_loss, argnums=(0, 1))(params, p.meta_params, batch)

    eps = 1e-6
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad_at(eps), grad_at(-eps))
    chex.assert_trees_all_close(hvp, fd, rtol=1e-6, atol=1e-10)
    # The mixed term (loss weights) is part of it: nonzero.
    self.assertGreater(float(jnp.max(jnp.abs(hvp[1]))), 0.0)

  def test_lm_variants_compute_one_model(self):
    """Block remat, the attention and the chunked loss change the memory, not the model."""

    def loss_and_grad(**sizes):
      p = bench.make_problem("lm", 1, small=True, seed=1, dtype=jnp.float64, **sizes)
      return jax.jit(jax.value_and_grad(p.outer_loss))(p.params, p.outer_batch)

    want = loss_and_grad(block_remat=0, attn_block=8)  # One key block, no remat.
    for sizes, tol in (
      ({}, 1e-10),
      ({"loss_chunk": 3}, 1e-10),  # Chunks that do not divide the 16 tokens.
      ({"block_remat": 2}, 1e-10),  # Remat keeping the attention's residuals.
      # jax.nn.dot_product_attention's XLA path takes its softmax in float32.
      ({"attention": "xla"}, 1e-5),
      (bench.NAIVE, 1e-5),
    ):
      chex.assert_trees_all_close(loss_and_grad(**sizes), want, rtol=tol, atol=tol * 1e-2)


class BenchTest(helpers.TestCase):
  """Problems, suites, the frontier search and the command line at tiny sizes."""

  def test_lm_is_exact_in_float64(self):
    # run_suite turns x64 on for a float64 run, in every compile thread.
    # The default LM: per-block remat and mfo.nn attention (over two key blocks here).
    suite = bench.grid_suite(["loss_weighting"], ["lm"], [2], bench.LM_METHODS, small=True)
    records = bench.run_suite(
      suite, reps=1, dtype=jnp.float64, fast_compile=True, progress=False
    ).records
    assert [r["method"] for r in records] == list(bench.LM_METHODS)
    hvp = _by(records, method="hvp")[0]
    for r in records:
      _check_record(r, compile_only=False)
      assert (r["family"], r["model"], r["seq_len"]) == ("lm", "lm-s", 8)
      assert (r["attention"], r["block_remat"], r["naive"]) == ("mfo", 1, False)
      assert r["mem_vs_hvp"] == _approx(r["temp_mib"] / hvp["temp_mib"])
      if r["method"] == "hvp":
        assert r["rel_err"] is None  # Not a meta-gradient.
      else:
        assert r["rel_err"] < 1e-10, (r["method"], r["rel_err"])

  def test_fast_compile_keeps_the_memory_analysis(self):
    """Compile-only points use FAST_COMPILE_OPTIONS: their memory must be what optimised code needs."""
    # Explicit options, since tests run with fast-compile XLA_FLAGS (conftest.py).
    optimised = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}
    for model, method in (("mlp", "standard"), ("lm", "mixflow")):
      p = bench.make_problem(model, 2, small=True, abstract=True)
      fast = bench.compile_method(p, method, FAST)[1]["temp_mib"]
      slow = bench.compile_method(p, method, optimised)[1]["temp_mib"]
      assert fast == _approx(slow, rel=0.01), (model, fast, slow)

  def test_problems(self):
    p = bench.make_problem("lm-m", 3, task="learning_rate", abstract=True, batch=2)
    assert p.meta_params["log_lr"].shape == () and p.params["embed"].shape == (512, 256)
    assert p.inner_batches["tokens"].shape == (3, 2, 257)
    assert p.config["n_params"] == 4852992 and p.hyperparams_fn is not None
    # The realistic LM by default; the naive one and the 32k vocabulary by name.
    names = {
      bench.make_problem(m, 1, abstract=True, **sizes).model: bench.model_config(m)[1]
      for m, sizes in (("lm", {}), ("lm-s-naive", {}), ("lm-m", {"attention": "xla"}))
    }
    assert [(n, c.attention, c.block_remat) for n, c in names.items()] == [
      ("lm-s", "mfo", 1),
      ("lm-s-naive", "xla", 0),
      ("lm-m-xla", "mfo", 1),  # The name says what the sizes changed.
    ]
    p = bench.make_problem("lm", 1, abstract=True, vocab=32768, loss_chunk=1024)
    assert p.model == "lm-s-v32k-chunked" and p.params["embed"].shape == (32768, 128)
    p = bench.make_problem("mlp-M2", 2, task="maml", small=True)
    assert p.params is None and p.meta_params["hidden"]["w"].shape == (3, 8, 8)
    assert p.inner_batches["x"].shape == (2, 8, 8) and p.model == "mlp-M2"
    p = bench.make_problem("mlp-M2", 2)
    assert p.config["batch"] == 256 and p.meta_params.shape == (2, 256)
    # Seeded: the same arrays twice.
    a = bench.make_problem("lm", 2, small=True, seed=3)
    b = bench.make_problem("lm", 2, small=True, seed=3)
    np.testing.assert_array_equal(a.inner_batches["tokens"], b.inner_batches["tokens"])
    # The ladder grows; its tiny version too.
    sizes = [bench.make_problem(m, 1, abstract=True).config["n_params"] for m in bench.LM_LADDER]
    tiny = [
      bench.make_problem(m, 1, abstract=True, small=True).config["n_params"]
      for m in bench.LM_LADDER
    ]
    assert sizes == sorted(sizes) and tiny == sorted(tiny) and len(set(tiny)) == len(tiny)

  def test_largest_fitting(self):
    xs = [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def run(mem, budget, known=None, start=0):
      calls = []

      def measure(i):
        calls.append(i)
        return mem(xs[i])

      i, seen = bench.largest_fitting(xs, measure, budget, known, start)
      return i, seen, calls

    affine = lambda x: 100 + 10 * x
    for budget in (50, 110, 115, 120, 500, 1000, 2660, 3000):
      i, seen, calls = run(affine, budget)
      want = max([j for j, x in enumerate(xs) if affine(x) <= budget], default=-1)
      assert i == want, budget
      # Certified by measurement: i fits and i + 1 does not.
      assert i < 0 or seen[i] <= budget
      assert i + 1 == len(xs) or seen[i + 1] > budget
      assert len(calls) <= 4, (budget, calls)
    # From one measurement, memory proportional to x is a first guess; then the
    # secant lands on an affine model at once, and the next probe confirms it.
    assert run(affine, 1000)[2] == [0, 3, 6, 7]
    # Known measurements are not repeated.
    i, seen, calls = run(affine, 1000, known={0: affine(1), 6: affine(64), 7: affine(128)})
    assert (i, calls) == (6, [])
    # Strongly nonlinear growth still converges (bisection safeguards).
    i, _, calls = run(lambda x: x**3, 5000, start=4)
    assert xs[i] == 16 and len(calls) <= 5

  def test_compile_only_and_frontier_search(self):
    """The frontier search on the tiny MLP, with a budget that cuts every axis."""
    tmp_path = self.enter_context(tempfile.TemporaryDirectory())
    frontier = bench.Frontier(
      budget_gib=0.25 / 1024,  # 0.25 MiB
      model="mlp-M4",
      T=2,
      models=("mlp-M1", "mlp-M4", "mlp-M16", "mlp-M64"),
      batches=(4, 8, 16, 32, 64, 128),
      Ts=(1, 2, 4, 8, 16, 32),
    )
    point = bench.Point("maml", "mlp-M4", 2, (), bench.CORE_METHODS, False, ("tasks",))
    suite = bench.Suite("test", (point,), frontier, small=True)
    result = bench.run_suite(suite, progress=False)
    for r in result.records:
      _check_record(r, compile_only=True)
    assert _by(result.records, task="maml")[0]["experiments"] == ["tasks"]
    probes = _by(result.records, task="loss_weighting")
    assert probes and all(r["experiments"] == ["frontier"] for r in probes)
    # The small MLP's model axis is its batch (M = batch / 4): shared probes
    # are compiled once.
    assert len({(r["batch"], r["T"], r["method"]) for r in probes}) == len(probes)
    memory = {(r["batch"], r["T"], r["method"]): r["total_mib"] for r in probes}

    def at(axis, value, method):
      batch = {"model": 4 * int(str(value)[5:]) if axis == "model" else 16, "batch": value}
      return memory[(batch.get(axis, 16), value if axis == "T" else 2, method)]

    assert len(result.frontier) == 3 * len(bench.CORE_METHODS)
    largest = {}
    for f in result.frontier:
      assert f["budget_gib"] == frontier.budget_gib and f["task"] == "loss_weighting"
      grid = frontier.axes()[f["axis"]]
      # Certified by the records: the answer fits, the next grid value does not.
      if f["largest"] is not None:
        assert at(f["axis"], f["largest"], f["method"]) == f["largest_total_mib"] <= 0.25
      if f["next"] is not None:
        assert at(f["axis"], f["next"], f["method"]) == f["next_total_mib"] > 0.25
      assert f["grid_max_fits"] == (f["largest"] == grid[-1])
      largest[(f["axis"], f["method"])] = -1 if f["largest"] is None else grid.index(f["largest"])
    for axis in frontier.axes():
      assert largest[(axis, "mixflow")] >= largest[(axis, "standard_best")]
      assert largest[(axis, "standard_best")] >= largest[(axis, "standard")]
    assert largest[("T", "mixflow")] > largest[("T", "standard")]
    assert largest[("batch", "mixflow")] > largest[("batch", "standard")]
    table = bench.format_frontier(result.frontier)
    assert all(axis in table for axis in frontier.axes()) and "mixflow" in table
    paths = bench.plot_results(result.records, tmp_path, result.frontier)
    assert [os.path.basename(p) for p in paths] == ["frontier.png"]
    assert os.path.getsize(paths[0]) > 0

  def test_cli(self):
    out = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory())) / "out"
    argv = ["--suite", "tiny", "--experiments", "T,M", "--T", "4", "--models", "mlp"]
    argv += ["--reps", "1", "--fast-compile", "--no-progress", "--out", str(out)]
    # The persistent cache is process-global once used: off here, tested in a subprocess below.
    argv += ["--compilation-cache", "none"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
      self.assertEqual(main(argv), 0)
    printed = stdout.getvalue()
    assert "== T ==" in printed and "== M ==" in printed and "targets" in printed
    with open(out / "results.json") as f:
      records = json.load(f)
    configs = {(r["model"], r["T"], r["compile_only"]) for r in records}
    # M=16 is compile-only in the tiny suite, as the largest M's are in the default one.
    assert configs == {("mlp-M4", 4, False), ("mlp-M1", 4, False), ("mlp-M16", 4, True)}
    for r in records:
      _check_record(r, compile_only=r["compile_only"])
    assert {tuple(r["experiments"]) for r in records} == {("T", "M"), ("M",)}
    with open(out / "run.json") as f:
      run = json.load(f)
    assert run["phase"] == "done" and run["suite"] == "tiny" and run["seconds"] > 0
    assert run["compilation_cache"] is None
    assert "persistent compilation cache: " not in printed

    not_measured = [t["met"] is None for t in run["targets"]]
    assert not_measured == [False, True, False, False, True, True, True]
    with open(out / "table.txt") as f:
      assert f.read().strip() in printed
    with open(out / "summary.md") as f:
      summary = f.read()
    assert "**Timed configurations**" in summary and "**Memory only (compile-only)**" in summary
    assert summary.count("| loss_weighting | mlp-M") == 3  # One row per configuration.
    # Timed rows end with the three methods' compile seconds, next to time and memory.
    timed_rows = summary.split("**Memory only")[0].splitlines()
    compile_cells = [r.rsplit("|", 2)[1] for r in timed_rows if "| mlp-M" in r]
    assert compile_cells and all(
      re.fullmatch(r" \d+\.\d / \d+\.\d / \d+\.\d ", c) for c in compile_cells
    )
    for name in ("memory_vs_T.png", "m_sweep.png", "time_ratios.png"):
      assert os.path.getsize(out / name) > 0, name

  def test_compilation_cache_is_written(self):
    # In a subprocess: JAX initialises its persistent cache once per process.
    cache = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory())) / "cache"
    code = (
      "import jax, jax.numpy as jnp\n"
      "from benchmarks._bench import enable_compilation_cache\n"
      f"enable_compilation_cache({str(cache)!r}, min_compile_secs=0.0)\n"
      "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {
      **os.environ,
      "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert any(cache.iterdir()), "no compiled program was written to the cache"

  def test_suites(self):
    default = bench.make_suite("default")
    pts = default.configurations()
    exps = {e for p in pts for e in p.experiments}
    assert exps == set(bench.EXPERIMENTS) - {"frontier"}
    # Every point is one configuration (shared ones are merged), measured by
    # at least the three methods of the targets.
    assert len({p.key for p in pts}) == len(pts)
    assert all(set(bench.CORE_METHODS) <= set(p.methods) for p in pts)

    def where(exp, **match):
      return [
        p for p in pts if exp in p.experiments and all(getattr(p, k) == v for k, v in match.items())
      ]

    assert {p.task for p in where("tasks", timed=True)} == set(bench.TASKS)
    # The LM ladder: at least three sizes, timed at the small end, compile-only at the top.
    ladder = where("ladder")
    assert len({p.model for p in ladder}) >= 3
    assert ladder[0].timed and not ladder[-1].timed and ladder[-1].model == "lm-l"
    mlp_T = where("T", model="mlp-M16")
    assert {p.T for p in mlp_T} == {1, 2, 4, 8} and {4, 8} <= {p.T for p in mlp_T if p.timed}
    assert {p.T for p in where("T", model="lm-s")} == {1, 2, 4, 8}
    assert {p.model for p in where("M", timed=True)} == {"mlp-M1", "mlp-M4", "mlp-M16"}
    assert len(where("M", timed=False)) == 2
    assert where("batch", timed=True) == [] and len(where("batch")) == 3
    assert [(p.model, p.sizes) for p in where("seq", timed=True)] == [
      ("lm-s", (("batch", 4), ("seq_len", 128)))
    ]
    # The full suite also times the 1024-token base of the sweeps.
    full = [p for p in bench.make_suite("full").configurations() if "seq" in p.experiments]
    assert (("batch", 4), ("seq_len", 1024)) in [p.sizes for p in full if p.timed]
    seqs = {p.model: [] for p in where("seq")}
    for p in where("seq"):
      seqs[p.model].append(dict(p.sizes)["seq_len"])
      # Every LM sweep point records the floor of one inner HVP too.
      assert "hvp" in p.methods
    assert max(seqs["lm-s"]) == 8192 and {1024, 4096} <= set(seqs["lm-s-naive"])
    assert [dict(p.sizes)["vocab"] for p in where("vocab")] == [32768, 32768]
    assert {dict(p.sizes)["loss_chunk"] > 0 for p in where("vocab")} == {False, True}
    # Other inner optimizers: Adam's points are shared with the tasks experiment.
    opts = where("optimizers")
    assert {(p.task, p.optimizer) for p in opts} == {
      (t, o) for t in ("learning_rate", "maml") for o in bench.EXPERIMENT_OPTIMIZERS
    }
    assert {p.model for p in opts if p.timed} == {"mlp-M16"}
    assert {p.model for p in opts if not p.timed} == {"lm-s"}
    assert all("tasks" in p.experiments for p in opts if p.optimizer == "adam")
    sel = bench.select(default, experiments=["tasks"], models=["mlp"], optimizers=["lion"])
    assert {(p.task, p.optimizer) for p in sel.configurations()} == {
      (t, "lion") for t in bench.TASKS
    }
    assert sel.frontier is None  # The frontier searches with Adam.
    sel = bench.select(default, experiments=["optimizers"], optimizers=["adam", "adafactor"])
    assert {p.optimizer for p in sel.points} == {"adam", "adafactor"}
    assert default.frontier.budget_gib == 16.0 and default.frontier.model == "lm-s"
    assert set(default.frontier.axes()) == {"model", "batch", "T", "seq"}
    assert default.frontier.seqs[0] <= 1024 and default.frontier.seqs[-1] >= 65536

    sel = bench.select(default, tasks=["loss_weighting"], models=["lm-xs"], compile_only=True)
    assert [(p.model, p.sizes[1][1], p.timed) for p in sel.configurations()] == [
      ("lm-xs", 128, False),
      ("lm-xs", 1024, False),
    ]
    assert sel.frontier is None
    sel = bench.select(default, experiments=["frontier"], methods=["mixflow"])
    assert sel.points == () and sel.frontier.methods == ("standard", "mixflow")
    sel = bench.select(default, models=["mlp"], experiments=["T"], sizes={"mlp": {"depth": 2}})
    assert {p.T for p in sel.points} == {1, 2, 4, 8} and all(
      p.sizes == (("depth", 2),) for p in sel.points
    )
    sel = bench.select(default, methods=["mixflow_noremat"])
    assert [(p.model, p.T, p.methods) for p in sel.configurations()] == [
      ("mlp-M16", 4, ("standard", "mixflow_noremat"))
    ]
    # Selecting experiments selects their methods: T has no variants.
    sel = bench.select(default, models=["mlp-M16"], experiments=["T"], Ts=[4])
    assert [p.methods for p in sel.configurations()] == [bench.CORE_METHODS]
    assert bench.select(default, Ts=[8], methods=["mixflow_noremat"]).points == ()
    tiny = bench.make_suite("tiny", budget_gib=0.5)
    assert {e for p in tiny.points for e in p.experiments} == exps and tiny.small
    assert tiny.frontier.budget_gib == 0.5

  def test_an_experiment_is_one_registration(self):
    # What the docstring of benchmarks/_suite.py says adding an experiment takes.
    try:

      @_suite._experiment("depth")
      def _depth(pre):
        return [bench.Point("loss_weighting", pre.mlp, 4, (("depth", d),)) for d in (2, 4)]

      for name in bench.SUITES:
        points = [p for p in bench.make_suite(name).points if "depth" in p.experiments]
        assert [p.sizes for p in points] == [(("depth", 2),), (("depth", 4),)], name
        assert all(p.experiments == ("depth",) for p in points)
      sel = bench.select(bench.make_suite("tiny"), experiments=["depth"], methods=["mixflow"])
      assert [p.model for p in sel.points] == ["mlp-M4", "mlp-M4"] and sel.frontier is None
      with self.assertRaisesRegex(ValueError, "already defined"):
        _suite._experiment("tasks")(_depth)
    finally:
      _suite._BUILDERS.pop("depth", None)
    assert bench.EXPERIMENTS == (*_suite._BUILDERS, "frontier")

  def test_doctests(self):
    # pytest collects the package's doctests; the benchmark's are run here.
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for module in (_bench, _problems, _report, _suite):
      result = doctest.testmod(module, optionflags=flags)
      self.assertEqual(result.failed, 0, module.__name__)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "unknown model"):
      bench.make_problem("cnn", T=2)
    with self.assertRaisesRegex(ValueError, "unknown task"):
      bench.make_problem("mlp", T=2, task="distillation")
    with self.assertRaisesRegex(ValueError, "unknown mlp sizes"):
      bench.make_problem("mlp", T=2, seq_len=3)
    with self.assertRaisesRegex(ValueError, "unknown method"):
      bench.make_meta_grad(bench.make_problem("mlp", T=1, small=True), "reverse")
    with self.assertRaisesRegex(ValueError, "unknown attention"):
      bench.LMConfig(attention="flash")
    with self.assertRaisesRegex(ValueError, "even head dimension"):
      bench.LMConfig(d_model=12, n_heads=4)
    with self.assertRaisesRegex(ValueError, "unknown suite"):
      bench.make_suite("huge")
    for argv in (
      ["--models", "cnn"],
      ["--size", "lm.width=3"],
      ["--size", "lm.seq_len"],
      ["--size", "lm.attention=flash"],
      ["--size", "lm.batch=four"],
      ["--tasks", "distillation"],
      ["--experiments", "ladder,speed"],
      ["--optimizers", "adam,sgdd"],
      ["--models", "lm", "--tasks", "maml", "--T", "8"],  # nothing left
    ):
      with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(argv)


if __name__ == "__main__":
  absltest.main()
