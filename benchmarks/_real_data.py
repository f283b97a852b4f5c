r"""Shared pieces of the real-data experiments: compute accounting, summaries, tables.

Every real-data experiment compares the library's recommended meta-learning
recipe with the baseline a user would otherwise run (a grid over the learning
rate, each point early-stopped on the validation set) at **equal compute**, over
seeds. Compute is counted in FLOPs from XLA's cost analysis of each compiled
function, times the number of its calls:

.. math::

  C_\text{recipe} = n_\text{meta}\, c_\text{meta step} + n_\text{retrain}\,
  c_\text{train step}, \qquad
  n_\text{baseline steps} = \lfloor C_\text{recipe} / c_\text{train step} \rfloor .

XLA counts the body of a ``while`` loop (``lax.scan``) once, not once per
trip, so a function is analysed with its loops unrolled (``unroll_steps=True``
for the inner loop) or per trip and multiplied: :func:`flops` documents which.
Evaluations on the validation set are cheap next to training and are made on
the same schedule on both sides; they are not counted.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

RESULTS_DIR = pathlib.Path("docs/bench/real_data")


def flops(fn: Callable[..., Any], *args: Any) -> float:
  """FLOPs of one call of ``jax.jit(fn)(*args)`` from XLA's cost analysis.

  The count is exact for straight-line programs; a ``lax.scan`` body is counted
  once, so callers pass functions whose loops are unrolled.
  """
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"])


#: A verdict needs the sign test's p-value at most this (one-sided, ties left out).
SIGNIFICANCE = 0.05


def verdict(recipe: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool) -> str:
  """``"wins"``, ``"loses"`` or ``"ties"``: a better (worse) mean that chance does not explain.

  ``"wins"`` when the recipe's mean is better **and** it is better on so many seeds that a fair
  coin per seed would do as well at most :data:`SIGNIFICANCE` of the time (the one-sided sign
  test of :func:`paired`: 5 of 5 seeds, 9 of 10); ``"loses"`` symmetrically; ``"ties"``
  otherwise, which includes every comparison over fewer than 5 seeds.
  """
  ahead = paired(recipe, baseline, higher_is_better=higher_is_better)
  behind = paired(recipe, baseline, higher_is_better=not higher_is_better)
  if ahead["gain_mean"] > 1e-9 and ahead["sign_p"] <= SIGNIFICANCE:
    return "wins"
  if behind["gain_mean"] > 1e-9 and behind["sign_p"] <= SIGNIFICANCE:
    return "loses"
  return "ties"


def summarise(
  task: str, metric: str, rows: list[dict[str, Any]], *, higher_is_better: bool
) -> dict:
  """Per-seed rows -> the task's summary: means, stds, the verdict and the compute ratio."""
  recipe = [r["recipe"] for r in rows]
  baseline = [r["baseline"] for r in rows]
  return {
    "task": task,
    "metric": metric,
    "higher_is_better": higher_is_better,
    "seeds": [r["seed"] for r in rows],
    "recipe_mean": statistics.fmean(recipe),
    "recipe_std": statistics.pstdev(recipe),
    "baseline_mean": statistics.fmean(baseline),
    "baseline_std": statistics.pstdev(baseline),
    "compute_ratio": max(r["recipe_flops"] / r["baseline_flops"] for r in rows),
    **paired(recipe, baseline, higher_is_better=higher_is_better),
    "verdict": verdict(recipe, baseline, higher_is_better=higher_is_better),
    "rows": rows,
  }


def paired(
  recipe: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool
) -> dict[str, float | int]:
  r"""Paired per-seed comparison: how many seeds the recipe is better on, and the mean gain.

  ``gain_mean`` is the mean of the per-seed differences, signed so that positive favours the
  recipe (recipe - baseline for a score, baseline - recipe for a loss); ``gain_se`` its standard
  error (sample standard deviation / sqrt(seeds); 0 for one seed). ``sign_p`` is the one-sided
  exact sign test: the probability of the recipe being better on at least ``better_seeds`` of
  the seeds that are not tied if each were a fair coin,
  :math:`\sum_{j \ge k} \binom{n}{j} 2^{-n}`.
  """
  sign = 1.0 if higher_is_better else -1.0
  gains = [sign * (r - b) for r, b in zip(recipe, baseline, strict=True)]
  se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else 0.0
  better = sum(g > 0 for g in gains)
  untied = sum(g != 0 for g in gains)
  return {
    "better_seeds": better,
    "gain_mean": statistics.fmean(gains),
    "gain_se": se,
    "sign_p": sum(math.comb(untied, j) for j in range(better, untied + 1)) / 2**untied,
  }


def markdown_row(summary: dict) -> str:
  """One line of the real-data table for ``summary`` (see :func:`summarise`)."""
  hib = summary["higher_is_better"]
  stats = paired(
    [r["recipe"] for r in summary["rows"]],
    [r["baseline"] for r in summary["rows"]],
    higher_is_better=hib,
  )
  n = len(summary["rows"])
  return (
    f"| {summary['task']} | {summary['metric']} ({'higher' if hib else 'lower'} is better) | "
    f"{summary['recipe_mean']:.3f} ± {summary['recipe_std']:.3f} | "
    f"{summary['baseline_mean']:.3f} ± {summary['baseline_std']:.3f} | "
    f"{stats['gain_mean']:+.3f} ± {stats['gain_se']:.3f} | "
    f"{stats['better_seeds']} of {n} | {stats['sign_p']:.3f} | "
    f"{summary['compute_ratio']:.2f} | **{summary['verdict']}** |"
  )


def per_seed_table(summary: dict) -> str:
  """The per-seed values behind one row of the table, as markdown."""
  lines = ["| seed | recipe | tuned baseline |", "|---|---:|---:|"]
  lines += [f"| {r['seed']} | {r['recipe']:.4f} | {r['baseline']:.4f} |" for r in summary["rows"]]
  return "\n".join(lines)


TABLE_HEADER = (
  "| task | metric | recipe (mean ± std) | tuned baseline (mean ± std) "
  "| gain (mean ± s.e.) | recipe better on | sign test p | compute recipe/baseline | verdict |\n"
  "|---|---|---:|---:|---:|---|---:|---:|---|"
)


def write(name: str, summary: dict, out_dir: pathlib.Path = RESULTS_DIR) -> pathlib.Path:
  """Writes ``<out_dir>/<name>.json`` and ``<name>.md``; returns the JSON's path."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(summary, indent=1, default=_jsonable) + "\n")
  (out_dir / f"{name}.md").write_text(
    TABLE_HEADER + "\n" + markdown_row(summary) + "\n\n" + per_seed_table(summary) + "\n"
  )
  return path


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
