r"""Real-data experiments: does meta-learning beat the tuned baseline at equal compute?

Each task compares the library's recommended recipe with the baseline a user
would otherwise run (a learning-rate grid with early stopping on the same
validation data), given at least the recipe's FLOPs, over 10 seeds, on data
that ships with a pip package or with Python itself (no download):

======================  ===============================================  ==========================
task                    recipe                                           module
======================  ===============================================  ==========================
noisy labels            learned per-example weights, weighted retrain   ``real_data_noisy``
learning rates          learned per-layer learning-rate schedule         ``real_data_lr``
LM learning rate        learned learning rate of a char-level LM         ``real_data_lm``
LM data mixture         learned domain weights of a char-level LM        ``real_data_lm_mixture``
======================  ===============================================  ==========================

``python -m benchmarks.real_data`` runs every task (each writes
``docs/bench/real_data/<name>.json``) and writes the combined table
``docs/bench/real_data/table.md``; ``--table-only`` rebuilds the table from the
JSON files already there; ``--tasks noisy_labels,lr_schedule`` runs some.
The protocol (equal FLOPs, seeds, the verdict rule) is in
:mod:`benchmarks._real_data`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

from benchmarks import _real_data


def _identity(row: dict[str, Any]) -> dict[str, Any]:
  return row


def _lm_row(result: dict[str, Any]) -> dict[str, Any]:
  """``real_data_lm.run``'s result as a table row: the recipe against the better baseline.

  The LM task has two baselines (a constant and a warmup + cosine learning-rate grid); the
  row compares the recipe with the one of lower test loss on that seed, the stricter test.
  """
  best = min(result["baselines"].values(), key=lambda b: b["test_nats"])
  return {
    "seed": result["seed"],
    "recipe": result["recipe"]["test_nats"],
    "baseline": best["test_nats"],
    "recipe_flops": result["recipe"]["flops"],
    "baseline_flops": best["flops"],
  }


def _mixture_row(result: dict[str, Any]) -> dict[str, Any]:
  """``real_data_lm_mixture.run``'s result as a row, against the stronger of two baselines.

  The grid splits the budget into short runs; training ONCE on the natural mixture at the
  recipe's own a-priori rate for the recipe's retrain steps costs less than the recipe and
  isolates what the learned mixture adds. The row compares with the better of the two.
  """
  grid, single = result["baseline"], result["natural_same_steps"]
  return {**result, "baseline": min(grid, single)}


class Task(NamedTuple):
  module: str  # benchmarks.<module>, with run(seed, *, quick) -> dict
  title: str
  metric: str
  higher_is_better: bool
  row: Callable[[dict[str, Any]], dict[str, Any]] = _identity  # run's result -> table row
  seeds: tuple[int, ...] = tuple(range(10))  # default seeds


TASKS: dict[str, Task] = {
  "noisy_labels": Task(
    "real_data_noisy", "noisy labels (digits, 40% flipped)", "test accuracy", True
  ),
  "lr_schedule": Task(
    "real_data_lr", "learning-rate schedule (digits)", "test NLL, nats (mean of 3 retrains)", False
  ),
  "lm": Task(
    "real_data_lm",
    "LM learning rate (CPython source)",
    "test nats/char",
    False,
    _lm_row,
  ),
  "lm_mixture": Task(
    "real_data_lm_mixture",
    "LM data mixture (CPython source)",
    "test nats/char",
    False,
    _mixture_row,
  ),
}


def run_task(name: str, seeds: list[int], *, quick: bool = False) -> dict:
  """Runs ``name`` over ``seeds``; writes and returns its summary (:func:`_real_data.summarise`)."""
  task = TASKS[name]
  module = importlib.import_module(f"benchmarks.{task.module}")
  rows = []
  for seed in seeds:
    row = task.row(module.run(seed, quick=quick))
    print(
      f"{name}, seed {seed}: recipe {row['recipe']:.4f}, baseline {row['baseline']:.4f}", flush=True
    )
    rows.append(row)
  summary = _real_data.summarise(
    task.title, task.metric, rows, higher_is_better=task.higher_is_better
  )
  if not quick:  # next to a task module's own per-seed file, if it writes one
    _real_data.write(name if task.row is _identity else f"{name}_summary", summary)
  return summary


#: Pages that show the table between ``TABLE_MARKERS`` (rewritten by every run).
PAGES_WITH_TABLE = (pathlib.Path("README.md"), pathlib.Path("docs/real_data.md"))
TABLE_MARKERS = ("<!-- real-data table -->\n", "<!-- end real-data table -->")


def fill_table(page: str, text: str) -> str:
  """``page`` with the text between its real-data table markers replaced by ``text``."""
  start, end = TABLE_MARKERS
  i, j = page.find(start), page.find(end)
  if i < 0 or j < i:
    raise ValueError(f"the page has no {start.strip()} ... {end} markers")
  return page[: i + len(start)] + text.rstrip("\n") + "\n" + page[j:]


def table(names: list[str]) -> str:
  """The combined markdown table of the tasks whose results are in ``RESULTS_DIR``."""
  lines = [_real_data.TABLE_HEADER]
  for name in names:
    path = _real_data.RESULTS_DIR / f"{name}_summary.json"
    if not path.exists():
      path = _real_data.RESULTS_DIR / f"{name}.json"
    if not path.exists():
      continue
    saved = json.loads(path.read_text())
    if "rows" not in saved:  # a task module's own file (per-seed results): summarise it
      task = TASKS[name]
      rows = [task.row(r) for r in saved["results"]]
      saved = _real_data.summarise(
        task.title, task.metric, rows, higher_is_better=task.higher_is_better
      )
    lines.append(_real_data.markdown_row(saved))
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--tasks", default=",".join(TASKS), help="comma-separated, of " + ",".join(TASKS)
  )
  parser.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=None,
    help="default: each task's own (0-9)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="smoke run: small budgets, nothing written"
  )
  parser.add_argument(
    "--table-only", action="store_true", help="rebuild the table from the JSON files"
  )
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    parser.error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
  if not args.table_only:
    for name in names:
      seeds = list(TASKS[name].seeds) if args.seeds is None else args.seeds
      summary = run_task(name, seeds, quick=args.quick)
      print(_real_data.TABLE_HEADER + "\n" + _real_data.markdown_row(summary), flush=True)
  if args.quick:
    return ""
  text = table(list(TASKS))
  _real_data.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (_real_data.RESULTS_DIR / "table.md").write_text(text)
  for page in PAGES_WITH_TABLE:
    if page.exists():
      page.write_text(fill_table(page.read_text(), text))
  print(text)
  return text


if __name__ == "__main__":
  main()
