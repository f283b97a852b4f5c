"""Command line: ``python -m benchmarks`` (from the repository root).

Examples::

  python -m benchmarks                       # the default suite (~8 min on 2 CPU cores)
  python -m benchmarks --suite tiny          # smoke run of every experiment, tiny models
  python -m benchmarks --experiments tasks,T --reps 5
  python -m benchmarks --experiments frontier --budget-gib 40
  python -m benchmarks --experiments optimizers   # inner Lion and Adafactor next to Adam
  python -m benchmarks --experiments tasks --optimizers adam,lion
  python -m benchmarks --models lm --T 8 --compile-only
  python -m benchmarks --suite grid --tasks maml --models lm-m --T 2,4 --compile-only
  python -m benchmarks --suite full --size lm.seq_len=256
  python -m benchmarks --experiments seq --size lm.attention=xla   # realistic remat, XLA attention
  python -m benchmarks --real-data           # then the real-data experiments and their table
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks._bench import DEFAULT_COMPILATION_CACHE, METHODS, enable_compilation_cache
from benchmarks._problems import ATTENTIONS, MODELS, OPTIMIZERS, TASKS, model_config
from benchmarks._report import (
  check_targets,
  format_frontier,
  format_markdown,
  format_table,
  format_targets,
  plot_results,
  save_results,
)
from benchmarks._suite import (
  EXPERIMENTS,
  SUITES,
  Suite,
  SuiteResult,
  grid_suite,
  make_suite,
  run_suite,
  select,
)


def _csv(kind: type, choices: Sequence[str] | None = None, check=None):
  def parse(text: str):
    items = [kind(s.strip()) for s in text.split(",") if s.strip()]
    if not items:
      raise argparse.ArgumentTypeError("expected a comma-separated list")
    if choices is not None:
      bad = [s for s in items if s not in choices]
      if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
    for s in items:
      if check is not None:
        try:
          check(s)
        except ValueError as e:
          raise argparse.ArgumentTypeError(str(e)) from None
    return items

  return parse


def _size(text: str) -> tuple[str, str, int | str]:
  """Parses ``FAMILY.FIELD=VALUE`` (e.g. ``lm.seq_len=128``, ``lm.attention=xla``)."""
  import dataclasses

  try:
    key, value = text.split("=")
    family, field = key.split(".")
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected FAMILY.FIELD=VALUE, got {text!r}") from None
  if (family, field) == ("lm", "attention"):
    if value not in ATTENTIONS:
      raise argparse.ArgumentTypeError(f"unknown attention {value!r}; choose from {ATTENTIONS}")
    return family, field, value
  try:
    value = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer in {text!r}") from None
  if family not in MODELS:
    raise argparse.ArgumentTypeError(
      f"unknown model family {family!r}; choose from {sorted(MODELS)}"
    )
  fields = [f.name for f in dataclasses.fields(MODELS[family][1])]
  if field not in fields:
    raise argparse.ArgumentTypeError(f"unknown {family} size {field!r}; choose from {fields}")
  return family, field, value


def _model_name(name: str) -> None:
  if name not in MODELS:
    model_config(name)  # Raises ValueError with the valid names.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m benchmarks",
    description=(
      "Memory and wall-clock of exact meta-gradients through T inner optimizer steps "
      "(Adam unless --optimizers or the optimizers experiment says otherwise) "
      "(learning-rate learning, loss weighting, MAML): MixFlow-MG vs the standard "
      "jax.grad-through-lax.scan implementations, on an MLP toy and a RoPE transformer "
      "ladder, with a memory-budget frontier."
    ),
  )
  p.add_argument(
    "--suite",
    choices=(*SUITES, "grid"),
    default="default",
    help="preset: default (~8 min on 2 CPU cores), full (larger timed models, longer sweeps), "
    "tiny (a smoke run of every experiment on tiny models); "
    "grid: every --tasks x --models x --T with --methods, timed",
  )
  p.add_argument(
    "--experiments",
    type=_csv(str, EXPERIMENTS),
    default=None,
    help=f"run only these experiments of the suite ({','.join(EXPERIMENTS)})",
  )
  p.add_argument(
    "--tasks",
    type=_csv(str, TASKS),
    default=None,
    help=f"only these tasks ({','.join(TASKS)}); grid default: loss_weighting",
  )
  p.add_argument(
    "--models",
    type=_csv(str, check=_model_name),
    default=None,
    help="only these models: families (mlp, lm) or names (mlp-M16, lm-xs, lm-s, lm-m, lm-l, "
    "lm-xl, lm-2xl, lm-3xl; lm-s-naive etc.: XLA attention, no per-block remat); "
    "grid default: mlp,lm",
  )
  p.add_argument(
    "--T",
    type=_csv(int),
    default=None,
    help="only these inner-step counts; grid default: 4",
  )
  p.add_argument(
    "--methods",
    type=_csv(str, METHODS),
    default=None,
    help=f"only these methods ({','.join(METHODS)}); 'standard' is always included as "
    "the reference; grid default: all",
  )
  p.add_argument(
    "--optimizers",
    type=_csv(str, OPTIMIZERS),
    default=None,
    help=f"inner optimizers ({','.join(OPTIMIZERS)}): every Adam configuration of the suite is "
    "measured with each of them instead (the optimizers experiment: only the listed ones); "
    "default: adam, and lion, adafactor in the optimizers experiment",
  )
  p.add_argument("--reps", type=int, default=3, help="timed interleaved rounds (default: 3)")
  p.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="only compile and report memory (no runs: seconds are null)",
  )
  p.add_argument(
    "--budget-gib",
    type=float,
    default=16.0,
    help="memory budget of the frontier search (default: 16)",
  )
  p.add_argument("--small", action="store_true", help="tiny model sizes (same as --suite tiny)")
  p.add_argument(
    "--fast-compile",
    action="store_true",
    help="compile timed programs with XLA options that compile several times faster but run "
    "slower code (smoke runs: memory is the same, timings are not representative); "
    "compile-only programs always use them",
  )
  p.add_argument(
    "--size",
    type=_size,
    action="append",
    default=[],
    metavar="FAMILY.FIELD=VALUE",
    help="override a size of every model of a family, e.g. lm.seq_len=512, mlp.depth=16, "
    "lm.attention=xla, lm.block_remat=0, lm.vocab=32768 with lm.loss_chunk=1024 "
    "(repeatable; fields of MLPConfig / LMConfig)",
  )
  p.add_argument(
    "--jobs",
    type=int,
    default=None,
    help="programs compiled in parallel (default: up to 2); timing never overlaps compiling",
  )
  p.add_argument(
    "--compilation-cache",
    default=DEFAULT_COMPILATION_CACHE,
    metavar="DIR",
    help="JAX's persistent compilation cache: a repeat run loads the programs compiled before "
    "instead of compiling them (its compile times are then load times); 'none' turns it off "
    f"(default: {DEFAULT_COMPILATION_CACHE})",
  )
  p.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
  p.add_argument("--x64", action="store_true", help="run in float64 instead of float32")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  p.add_argument(
    "--real-data",
    action="store_true",
    help="afterwards, run the real-data experiments (python -m benchmarks.real_data: each "
    "recipe against the tuned baseline at equal compute, 10 seeds; about an hour on 2 idle CPU "
    "cores) "
    "and write their table",
  )
  return p


def _experiment_tables(records, experiments: Sequence[str]) -> str:
  parts = []
  for exp in (*experiments, "grid"):
    recs = [r for r in records if exp in r.get("experiments", ())]
    if recs:
      parts.append(f"== {exp} ==\n{format_table(recs)}")
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m benchmarks``; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  _check_args(parser, args)
  suite = _selected_suite(parser, args)
  t0 = time.perf_counter()
  cache = args.compilation_cache
  cache = None if cache.lower() in ("", "none") else enable_compilation_cache(cache)
  meta = _run_metadata(args, argv, suite)
  meta["compilation_cache"] = cache

  def save(phase, records, frontier):
    # Partial results survive an interrupted or failed run.
    save_results(records, args.out, frontier, {**meta, "phase": phase})

  with jax.enable_x64(args.x64):
    result = run_suite(
      suite,
      reps=args.reps,
      seed=args.seed,
      dtype=jnp.float64 if args.x64 else jnp.float32,
      fast_compile=args.fast_compile,
      jobs=args.jobs,
      progress=not args.no_progress,
      on_phase=save,
    )
  meta["seconds"] = round(time.perf_counter() - t0, 1)
  meta["phase_seconds"] = {k: round(v, 1) for k, v in result.phase_seconds.items()}
  meta["phase"] = "done"
  meta["targets"] = check_targets(result.records, result.frontier)
  save_results(result.records, args.out, result.frontier, meta)
  text = _summary_text(result, meta, suite.name)
  plots = _write_reports(result, meta, text, args.out)
  print(text)
  print(
    f"results in {os.path.join(args.out, 'results.json')}; table.txt, summary.md, "
    f"frontier.json, run.json and {len(plots)} plots in {args.out}"
  )
  if args.real_data:
    from benchmarks import real_data

    real_data.main([])
  return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.reps < 1 and not args.compile_only:
    parser.error("--reps must be >= 1")


def _size_overrides(args: argparse.Namespace) -> dict[str, dict[str, int]]:
  """``--size`` as family -> field -> value."""
  sizes: dict[str, dict[str, int]] = {}
  for family, field, value in args.size:
    sizes.setdefault(family, {})[field] = value
  return sizes


def _selected_suite(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Suite:
  """The suite the arguments ask for: a preset or the grid, restricted by the filters."""
  sizes = _size_overrides(args)
  if args.suite == "grid":
    suite = grid_suite(
      args.tasks or ("loss_weighting",),
      args.models or ("mlp", "lm"),
      args.T or (4,),
      args.methods or METHODS,
      small=args.small,
    )
    suite = select(suite, compile_only=args.compile_only, sizes=sizes, optimizers=args.optimizers)
  else:
    name = "tiny" if args.small else args.suite
    suite = make_suite(name, budget_gib=args.budget_gib)
    suite = select(
      suite,
      tasks=args.tasks,
      models=args.models,
      Ts=args.T,
      methods=args.methods,
      experiments=args.experiments,
      compile_only=args.compile_only,
      sizes=sizes,
      optimizers=args.optimizers,
    )
  if not suite.points and suite.frontier is None:
    parser.error(
      "no configuration of the suite is left after --tasks/--models/--T/--methods/--optimizers"
    )
  return suite


def _run_metadata(
  args: argparse.Namespace, argv: Sequence[str] | None, suite: Suite
) -> dict[str, object]:
  """What the run was: command, suite, software, machine, dtype."""
  return {
    "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
    "suite": suite.name,
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device": jax.devices()[0].device_kind,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "python": platform.python_version(),
    "dtype": "float64" if args.x64 else "float32",
    "reps": args.reps,
  }


def _summary_text(result: SuiteResult, meta: dict[str, Any], suite_name: str) -> str:
  """The printed tables: experiments, frontier, targets, and a line about the run."""
  text = _experiment_tables(result.records, EXPERIMENTS)
  if result.frontier:
    text += "\n\n== frontier ==\n" + format_frontier(result.frontier)
  text += "\n\n== targets (mixflow = library defaults) ==\n" + format_targets(meta["targets"])
  text += (
    f"\n\n{meta['backend']} ({meta['device']}, {meta['cpu_count']} cores), JAX {meta['jax']}, "
    f"{meta['dtype']}; suite {suite_name}; total {meta['seconds']:.0f} s ("
    + ", ".join(f"{k} {v:.0f} s" for k, v in meta["phase_seconds"].items())
    + ")"
  )
  if meta.get("compilation_cache"):
    text += (
      f"\npersistent compilation cache: {meta['compilation_cache']} (compile times of programs "
      "compiled by an earlier run are load times; --compilation-cache none for cold compiles)"
    )
  return text


def _write_reports(result: SuiteResult, meta: dict[str, Any], text: str, out: str) -> list[str]:
  """Writes table.txt, summary.md and the plots to ``out``; returns the plots' paths."""
  with open(os.path.join(out, "table.txt"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(format_markdown(result.records, result.frontier, meta["targets"]))
  return plot_results(result.records, out, result.frontier)


if __name__ == "__main__":
  sys.exit(main())
