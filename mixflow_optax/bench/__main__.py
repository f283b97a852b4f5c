"""Command line: ``python -m mixflow_optax.bench`` / ``mixflow-bench``.

Examples::

  python -m mixflow_optax.bench                      # mlp T=4, lm T=4,8; 3 reps (~13 min on 2 CPU cores)
  python -m mixflow_optax.bench --small --reps 1     # smoke run, tiny models
  python -m mixflow_optax.bench --models lm --T 8 --compile-only
  python -m mixflow_optax.bench --methods standard,standard_best,mixflow
  python -m mixflow_optax.bench --size lm.seq_len=128 --size mlp.batch=1024
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mixflow_optax.bench._bench import (
  DEFAULT_CONFIGS,
  FAST_COMPILE_OPTIONS,
  METHODS,
  format_table,
  run_benchmark,
)
from mixflow_optax.bench._problems import MODELS


def _csv(kind: type, choices: Sequence[str] | None = None):
  def parse(text: str):
    items = [kind(s.strip()) for s in text.split(",") if s.strip()]
    if not items:
      raise argparse.ArgumentTypeError("expected a comma-separated list")
    if choices is not None:
      bad = [s for s in items if s not in choices]
      if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
    return items

  return parse


def _size(text: str) -> tuple[str, str, int]:
  """Parses ``MODEL.FIELD=INT`` (e.g. ``lm.seq_len=128``)."""
  try:
    key, value = text.split("=")
    model, field = key.split(".")
    value = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected MODEL.FIELD=INT, got {text!r}") from None
  if model not in MODELS:
    raise argparse.ArgumentTypeError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
  fields = [f.name for f in dataclasses.fields(MODELS[model][1])]
  if field not in fields:
    raise argparse.ArgumentTypeError(f"unknown {model} size {field!r}; choose from {fields}")
  return model, field, value


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mixflow-bench",
    description=(
      "Memory and wall-clock of exact meta-gradients (loss weighting through T inner Adam "
      "steps): MixFlow-MG vs the standard jax.grad-through-lax.scan implementations."
    ),
  )
  p.add_argument(
    "--models",
    type=_csv(str, sorted(MODELS)),
    default=list(DEFAULT_CONFIGS),
    help="comma-separated models (default: mlp,lm)",
  )
  p.add_argument(
    "--T",
    type=_csv(int),
    default=None,
    help="comma-separated inner-step counts for every model (default: mlp 4; lm 4,8)",
  )
  p.add_argument(
    "--methods",
    type=_csv(str, METHODS),
    default=list(METHODS),
    help=f"comma-separated methods (default: all: {','.join(METHODS)}); "
    "'standard' is always included as the reference",
  )
  p.add_argument("--reps", type=int, default=3, help="timed interleaved rounds (default: 3)")
  p.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
  p.add_argument(
    "--compile-only",
    action="store_true",
    help="only compile and report XLA temp memory (no runs: seconds are null)",
  )
  p.add_argument("--small", action="store_true", help="tiny model sizes, for a smoke run")
  p.add_argument(
    "--fast-compile",
    action="store_true",
    help="XLA options that compile several times faster but run slower code "
    "(smoke runs: memory is representative, timings are not)",
  )
  p.add_argument(
    "--size",
    type=_size,
    action="append",
    default=[],
    metavar="MODEL.FIELD=INT",
    help="override a model size, e.g. lm.seq_len=128 or mlp.depth=8 (repeatable; "
    "fields of MLPConfig / LMConfig)",
  )
  p.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")
  p.add_argument("--x64", action="store_true", help="run in float64 instead of float32")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``mixflow-bench``; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.reps < 1 and not args.compile_only:
    parser.error("--reps must be >= 1")
  configs = {m: tuple(args.T) if args.T else DEFAULT_CONFIGS[m] for m in args.models}
  sizes: dict[str, dict[str, int]] = {}
  for model, field, value in args.size:
    sizes.setdefault(model, {})[field] = value
  t0 = time.perf_counter()
  with jax.enable_x64(args.x64):
    records = run_benchmark(
      configs,
      args.methods,
      reps=args.reps,
      compile_only=args.compile_only,
      small=args.small,
      out=args.out,
      seed=args.seed,
      dtype=jnp.float64 if args.x64 else jnp.float32,
      progress=not args.no_progress,
      sizes=sizes,
      compiler_options=FAST_COMPILE_OPTIONS if args.fast_compile else None,
    )
  print(format_table(records))
  print(
    f"\n{jax.default_backend()} ({jax.devices()[0].device_kind}); "
    f"total {time.perf_counter() - t0:.1f} s; results in {os.path.join(args.out, 'results.json')}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
