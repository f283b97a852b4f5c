r"""The benchmark suite: which configurations to measure, and the memory-budget frontier.

A suite is a list of :class:`Point` s (a task on a model with T inner steps
and some size overrides, measured by a list of methods, timed or
compile-only) grouped into experiments, plus an optional :class:`Frontier`.
The ``"default"`` suite mirrors the paper's benchmarks, scaled to a 2-core
CPU:

- ``tasks``: learning-rate learning, loss weighting and MAML, timed on the
  MLP toy (loss weighting on the ``lm-s`` transformer too), memory on
  ``lm-s``;
- ``variants``: the non-default settings of both the standard baseline and
  MixFlow (and first-order MAML), timed on the MLP toy;
- ``ladder``: the transformer ladder, timed for ``lm-xs`` and ``lm-s`` at
  128-token sequences, memory for ``lm-xs`` ... ``lm-l`` at 1024 tokens;
- ``T``: T in {1, 2, 4, 8} on the MLP toy (timed at 4 and 8) and, memory
  only, on ``lm-s``;
- ``M``: the paper's toy with per-step work size M (batch ``128 M``);
- ``batch``, ``seq``: batch-size and sequence-length sweeps of ``lm-s``
  (compile-only, up to 8192 tokens; timed at 128, and at 1024 in the full
  suite), the latter for the naive model (``lm-s-naive``, compile-only) too;
- ``vocab``: ``lm-s`` with a 32k vocabulary, its logits whole or computed
  over chunks of tokens;
- ``optimizers``: learning-rate learning and MAML with inner Lion and
  Adafactor next to Adam (every other experiment uses Adam), timed on the MLP
  toy, memory on ``lm-s``;
- ``frontier``: for a memory budget (16 GiB by default), the largest model,
  batch, T and sequence length that fit with each method, found by
  compile-only memory analysis (:func:`largest_fitting`): the paper's "how
  big can I go" table.

Every LM point also measures ``"hvp"``, one forward-over-reverse
Hessian-vector product of the inner loss: the floor of an exact meta-gradient.

Every program is compiled once: points shared between experiments are
measured once and tagged with all of them, and the frontier search reuses
every measurement it can. Compile-only programs are compiled with
:data:`~benchmarks.FAST_COMPILE_OPTIONS` (their memory analysis is
the same to within 0.1%); several compile in parallel threads (``jobs``); timing runs only
after all compilation is done, one program at a time.

Adding an experiment
--------------------

One registration: a function of a preset's sizes that returns the
experiment's points, decorated with ``@_experiment("name")``, placed after the
existing ones, before the definition of :data:`EXPERIMENTS` (the order of
registration is the order of the printed tables)::

  @_experiment("depth")
  def _depth(pre: _Preset) -> list[Point]:
    # Deeper MLPs, timed.
    return [Point("loss_weighting", pre.mlp, 4, (("depth", d),)) for d in (2, 4, 8)]

The function leaves :attr:`Point.experiments` empty (:func:`make_suite` tags
each point with the experiment's name). The name is then in
:data:`EXPERIMENTS`, so in every preset (default, full, tiny), in
``python -m benchmarks --experiments``, in :func:`select` and in the printed
tables; a configuration shared with another experiment is measured once.
A point may use the preset's models and sizes (``pre.mlp``, ``pre.lm_timed``
for timed LM points, ``pre.lm_mem`` for compile-only ones), any field of
:class:`~benchmarks.MLPConfig` / :class:`~benchmarks.LMConfig` as a size and
any of :data:`~benchmarks.OPTIMIZERS`; sizes that must differ between the
presets are a new field of ``_Preset`` (a value in each of ``_PRESETS``). A
plot or target of its own goes in ``_report.py``.

References:
  Kemaev et al., `Scalable Meta-Learning via Mixed-Mode Differentiation
  <https://arxiv.org/abs/2505.00793>`_, ICML 2025 (Section 5 and Table 2).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks._bench import (
  CORE_METHODS,
  FAST_COMPILE_OPTIONS,
  METHODS,
  add_ratios,
  check_methods,
  compile_method,
  make_record,
  time_methods,
)
from benchmarks._problems import (
  LM_LADDER,
  TASKS,
  Problem,
  check_optimizer,
  make_problem,
  model_config,
)

__all__ = [
  "EXPERIMENTS",
  "EXPERIMENT_OPTIMIZERS",
  "LM_METHODS",
  "SUITES",
  "Point",
  "Frontier",
  "Suite",
  "make_suite",
  "grid_suite",
  "select",
  "largest_fitting",
  "run_suite",
  "SuiteResult",
]

#: The inner optimizers of the ``optimizers`` experiment. Learning-rate
#: learning and MAML only: Lion's sign step has zero derivative with respect to
#: loss weights, so loss weighting would have a zero meta-gradient.
EXPERIMENT_OPTIMIZERS: tuple[str, ...] = ("adam", "lion", "adafactor")

#: The methods of the LM points: the core ones and the floor of one inner HVP.
LM_METHODS: tuple[str, ...] = (*CORE_METHODS, "hvp")

#: Preset suites.
SUITES: tuple[str, ...] = ("default", "full", "tiny")

Sizes = tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class Point:
  """One configuration of the suite.

  Attributes:
    task: one of :data:`~benchmarks.TASKS`.
    model: a model name (``"lm-s"``, ``"mlp-M16"``, ...).
    T: number of inner steps.
    sizes: size overrides, e.g. ``(("batch", 4), ("seq_len", 128))``.
    methods: methods to measure (``"standard"`` is always added).
    timed: run and time it (else compile-only: memory only).
    experiments: the experiments it belongs to.
    optimizer: the inner optimizer (see :data:`~benchmarks.OPTIMIZERS`).
  """

  task: str
  model: str
  T: int
  sizes: Sizes = ()
  methods: tuple[str, ...] = CORE_METHODS
  timed: bool = True
  experiments: tuple[str, ...] = ()
  optimizer: str = "adam"

  @property
  def key(self) -> tuple[str, str, int, Sizes, str]:
    return (self.task, self.model, self.T, tuple(sorted(self.sizes)), self.optimizer)


@dataclasses.dataclass(frozen=True)
class Frontier:
  """The "how big can I go" search: largest model, batch and T within a memory budget.

  Memory is what a device needs to run the compiled meta-gradient:
  ``total_mib`` = temp + arguments + outputs. Each axis is searched from the
  base configuration, the others held fixed, over a grid.

  Attributes:
    budget_gib: the memory budget.
    task: the task.
    model: the base model.
    T: the base number of inner steps.
    sizes: the base size overrides (batch, sequence length).
    models: the model grid (ascending size).
    batches: the batch grid (ascending).
    Ts: the T grid (ascending).
    seqs: the sequence-length grid (ascending; empty: no sequence axis, as
      for MLP bases).
    methods: the methods compared.
  """

  budget_gib: float = 16.0
  task: str = "loss_weighting"
  model: str = "lm-s"
  T: int = 4
  sizes: Sizes = ()
  models: tuple[str, ...] = tuple(LM_LADDER)
  batches: tuple[int, ...] = tuple(2**i for i in range(13))
  Ts: tuple[int, ...] = tuple(2**i for i in range(14))
  seqs: tuple[int, ...] = ()
  methods: tuple[str, ...] = CORE_METHODS

  def axes(self) -> dict[str, tuple[Any, ...]]:
    axes = {"model": self.models, "batch": self.batches, "T": self.Ts, "seq": self.seqs}
    return {k: v for k, v in axes.items() if v}

  def point(self, axis: str, value: Any) -> Point:
    """The configuration at ``value`` on ``axis`` (the base elsewhere)."""
    model, T, sizes = self.model, self.T, dict(self.sizes)
    if axis == "model":
      model = value
    elif axis == "batch":
      sizes["batch"] = value
    elif axis == "T":
      T = value
    elif axis == "seq":
      sizes["seq_len"] = value
    else:
      raise ValueError(f"unknown frontier axis {axis!r}; choose from {list(self.axes())}.")
    return Point(self.task, model, T, tuple(sorted(sizes.items())), timed=False)


@dataclasses.dataclass(frozen=True)
class Suite:
  """A suite: its points and, optionally, a frontier search.

  Attributes:
    name: the preset's name.
    points: the points of every experiment. A configuration shared by
      several experiments appears once per experiment (with that
      experiment's methods), so that selecting experiments selects methods
      too; :meth:`configurations` merges them, and so does
      :func:`run_suite`, which measures each configuration once.
    frontier: the "how big can I go" search, or ``None``.
    small: the models are the tiny ones of smoke runs and tests.
  """

  name: str
  points: tuple[Point, ...]
  frontier: Frontier | None = None
  small: bool = False

  def configurations(self) -> tuple[Point, ...]:
    """The points merged: one per configuration, methods and experiments united."""
    return _merge(self.points)


def _merge(
  points: Iterable[Point], key: Callable[[Point], tuple] = lambda p: p.key
) -> tuple[Point, ...]:
  """One point per configuration: methods and experiments united, timed if any is."""
  merged: dict[tuple, Point] = {}
  for p in points:
    k = key(p)
    q = merged.get(k)
    if q is None:
      merged[k] = p
      continue
    merged[k] = dataclasses.replace(
      q,
      methods=tuple(dict.fromkeys(q.methods + p.methods)),
      timed=q.timed or p.timed,
      experiments=tuple(dict.fromkeys(q.experiments + p.experiments)),
    )
  return tuple(merged.values())


@dataclasses.dataclass(frozen=True)
class _Preset:
  """The sizes of a preset suite (see :func:`make_suite`)."""

  mlp: str  # The MLP of the tasks, variants and T experiments.
  mlp_Ts: tuple[int, ...]  # Timed T values of the MLP (the rest of 1, 2, 4, 8: compile-only).
  ms_timed: tuple[int, ...]
  ms_compiled: tuple[int, ...]
  lm_timed: Sizes  # Sizes of the timed LM points.
  lm_mem: Sizes  # Sizes of the compile-only LM sweeps (the paper's long sequences).
  ladder_timed: tuple[str, ...]
  ladder_mem: tuple[str, ...]
  lm_tasks_timed: bool  # All tasks on the LM timed (else compile-only at lm_mem).
  lm_Ts: tuple[int, ...]  # T sweep of the LM, at lm_mem.
  batches: tuple[int, ...]  # Batch sweep of the LM, at lm_mem.
  seqs: tuple[int, ...]  # Sequence-length sweep of the LM, at lm_mem's batch.
  naive_seqs: tuple[int, ...]  # The same sweep of the naive LM (XLA attention, no block remat).
  ladder_naive: tuple[str, ...]  # Ladder of the naive LM, at lm_mem (compile-only).
  lm_timed_long: Sizes  # A timed LM point at a long sequence (both variants); () for none.
  vocabs: tuple[tuple[int, int], ...]  # (vocab, loss_chunk) of the vocabulary sweep, at lm_mem.
  frontier_grids: dict[str, tuple[Any, ...]]


_PRESETS = {
  "default": _Preset(
    mlp="mlp-M16",
    mlp_Ts=(4, 8),
    ms_timed=(1, 4, 16),
    ms_compiled=(64, 256),
    # 512 tokens per inner step keeps a timed lm-s meta-gradient near a
    # second on 2 CPU cores; the compile-only sweeps use 1024-token sequences.
    lm_timed=(("batch", 4), ("seq_len", 128)),
    lm_mem=(("batch", 4), ("seq_len", 1024)),
    ladder_timed=("lm-xs", "lm-s"),
    ladder_mem=("lm-xs", "lm-s", "lm-m", "lm-l"),
    lm_tasks_timed=False,
    lm_Ts=(1, 2, 4, 8),
    batches=(1, 4, 16),
    seqs=(128, 512, 1024, 4096, 8192),
    naive_seqs=(1024, 4096),
    ladder_naive=(),
    # Timing 1024-token sequences takes minutes per method on 2 cores: --suite full.
    lm_timed_long=(),
    vocabs=((32768, 0), (32768, 1024)),
    frontier_grids={},
  ),
  "full": _Preset(
    mlp="mlp-M16",
    mlp_Ts=(1, 2, 4, 8),
    ms_timed=(1, 4, 16, 64),
    ms_compiled=(256, 1024),
    lm_timed=(("batch", 4), ("seq_len", 128)),
    lm_mem=(("batch", 4), ("seq_len", 1024)),
    ladder_timed=("lm-xs", "lm-s", "lm-m"),
    ladder_mem=("lm-xs", "lm-s", "lm-m", "lm-l", "lm-xl", "lm-2xl"),
    lm_tasks_timed=True,
    lm_Ts=(1, 2, 4, 6, 8, 16),
    batches=(1, 2, 4, 8, 16, 32),
    seqs=(128, 256, 512, 1024, 2048, 4096, 8192, 16384),
    naive_seqs=(128, 256, 512, 1024, 2048, 4096, 8192),
    ladder_naive=("lm-xs", "lm-s", "lm-m", "lm-l"),
    lm_timed_long=(("batch", 4), ("seq_len", 1024)),
    vocabs=((32768, 0), (32768, 1024), (131072, 1024)),
    frontier_grids={},
  ),
  # Tiny models (see make_problem(small=True)) and fewer points: the default
  # suite's experiments, so that a smoke run exercises every code path
  # (compilation still takes a few minutes on 2 CPU cores).
  "tiny": _Preset(
    mlp="mlp-M4",
    mlp_Ts=(4,),
    ms_timed=(1, 4),
    ms_compiled=(16,),
    lm_timed=(("batch", 2), ("seq_len", 8)),
    lm_mem=(("batch", 2), ("seq_len", 16)),
    ladder_timed=("lm-s",),
    ladder_mem=("lm-s", "lm-m"),
    lm_tasks_timed=False,
    lm_Ts=(2, 4),
    batches=(1, 2),
    seqs=(8, 16),
    naive_seqs=(16,),
    ladder_naive=(),
    lm_timed_long=(),
    vocabs=((64, 8),),
    frontier_grids={
      "models": tuple(LM_LADDER)[:4],
      "batches": (1, 2, 4, 8, 16),
      "Ts": (1, 2, 4, 8, 16),
      "seqs": (8, 16, 32, 64, 128, 256),
    },
  ),
}


# --------------------------------------------------------------- the experiments

_LW, _LM = "loss_weighting", "lm-s"

#: The registered experiments, in registration order: name -> the function
#: that builds its points from a preset's sizes (see "Adding an experiment").
_BUILDERS: dict[str, Callable[[_Preset], Iterable[Point]]] = {}


def _experiment(name: str) -> Callable:
  """Registers the decorated ``build(preset) -> points`` as the experiment ``name``."""

  def register(build: Callable[[_Preset], Iterable[Point]]) -> Callable:
    if name in _BUILDERS or name in ("frontier", "grid"):
      raise ValueError(f"experiment {name!r} is already defined; give it another name.")
    _BUILDERS[name] = build
    return build

  return register


@_experiment("tasks")
def _tasks(pre: _Preset) -> list[Point]:
  """Every task timed on the MLP; on ``lm-s`` loss weighting timed, every task's memory."""
  points = []
  for task in TASKS:
    points.append(Point(task, pre.mlp, 4))
    if task == _LW or pre.lm_tasks_timed:
      points.append(Point(task, _LM, 4, pre.lm_timed))
    if not pre.lm_tasks_timed:
      points.append(Point(task, _LM, 4, pre.lm_mem, timed=False))
  return points


@_experiment("variants")
def _variants(pre: _Preset) -> list[Point]:
  """The non-default settings of the standard baseline and of MixFlow, and first-order MAML."""
  variants = [m for m in METHODS if m not in CORE_METHODS and m not in ("first_order", "hvp")]
  return [
    Point(_LW, pre.mlp, 4, methods=CORE_METHODS + tuple(variants)),
    # First-order MAML: what the exact meta-gradient is usually traded for.
    Point("maml", pre.mlp, 4, methods=(*CORE_METHODS, "first_order")),
  ]


@_experiment("ladder")
def _ladder(pre: _Preset) -> list[Point]:
  """The transformer ladder: timed at short sequences, memory at long ones."""
  mem = {"sizes": pre.lm_mem, "methods": LM_METHODS, "timed": False}
  return [
    *(Point(_LW, model, 4, pre.lm_timed, LM_METHODS) for model in pre.ladder_timed),
    *(Point(_LW, model, 4, **mem) for model in pre.ladder_mem),
    *(Point(_LW, f"{model}-naive", 4, **mem) for model in pre.ladder_naive),
  ]


@_experiment("T")
def _inner_steps(pre: _Preset) -> list[Point]:
  """T in {1, 2, 4, 8} on the MLP, and the LM's memory over ``lm_Ts``."""
  points = [Point(_LW, pre.mlp, T, timed=T in pre.mlp_Ts) for T in (1, 2, 4, 8)]
  points += [Point(_LW, _LM, T, pre.lm_mem, timed=False) for T in pre.lm_Ts]
  # The timed LM at T = 8 too (memory only): the T = 8 target on its sizes.
  points += [Point(_LW, _LM, 4, pre.lm_timed), Point(_LW, _LM, 8, pre.lm_timed, timed=False)]
  return points


@_experiment("M")
def _work_size(pre: _Preset) -> list[Point]:
  """The paper's toy with per-step work size M."""
  return [Point(_LW, f"mlp-M{m}", 4) for m in pre.ms_timed] + [
    Point(_LW, f"mlp-M{m}", 4, timed=False) for m in pre.ms_compiled
  ]


@_experiment("batch")
def _batch(pre: _Preset) -> list[Point]:
  """The LM's memory over batch sizes."""
  base = dict(pre.lm_mem)
  return [Point(_LW, _LM, 4, tuple({**base, "batch": b}.items()), timed=False) for b in pre.batches]


@_experiment("seq")
def _sequence_length(pre: _Preset) -> list[Point]:
  """The LM's (and the naive LM's) sequence-length sweep, timed at the timed LM sizes."""
  base = dict(pre.lm_mem)
  timed_seqs = {tuple(sorted(pre.lm_timed)), tuple(sorted(pre.lm_timed_long))}
  points = []
  for model, seqs in ((_LM, pre.seqs), (f"{_LM}-naive", pre.naive_seqs)):
    for s in seqs:
      sizes = tuple(sorted({**base, "seq_len": s}.items()))
      timed = model == _LM and sizes in timed_seqs
      points.append(Point(_LW, model, 4, sizes, LM_METHODS, timed=timed))
  return points


@_experiment("vocab")
def _vocabulary(pre: _Preset) -> list[Point]:
  """A realistic vocabulary: the B*S*V logits, whole or over chunks of tokens."""
  base = dict(pre.lm_mem)
  return [
    Point(
      _LW, _LM, 4, tuple({**base, "vocab": v, "loss_chunk": c}.items()), LM_METHODS, timed=False
    )
    for v, c in pre.vocabs
  ]


@_experiment("optimizers")
def _inner_optimizers(pre: _Preset) -> list[Point]:
  """Other inner optimizers (the Adam points are shared with the tasks experiment)."""
  points = []
  for opt in EXPERIMENT_OPTIMIZERS:
    for task in ("learning_rate", "maml"):
      points.append(Point(task, pre.mlp, 4, optimizer=opt))
      points.append(Point(task, _LM, 4, pre.lm_mem, timed=False, optimizer=opt))
  return points


#: Experiment names, in the order of the printed tables: the registered ones,
#: then the frontier search.
EXPERIMENTS: tuple[str, ...] = (*_BUILDERS, "frontier")


def make_suite(name: str = "default", *, budget_gib: float = 16.0) -> Suite:
  """A preset suite.

  Args:
    name: ``"default"`` (about 8 minutes on 2 CPU cores), ``"full"`` (larger
      timed models, longer sweeps) or ``"tiny"`` (the default suite's
      experiments on tiny models: a smoke run).
    budget_gib: the frontier's memory budget.

  Returns:
    A :class:`Suite`.

  Examples:
    >>> suite = make_suite("default")
    >>> sorted({e for p in suite.points for e in p.experiments})
    ['M', 'T', 'batch', 'ladder', 'optimizers', 'seq', 'tasks', 'variants', 'vocab']
    >>> configs = suite.configurations()
    >>> sum(p.timed for p in configs), len(configs), suite.frontier.budget_gib
    (12, 39, 16.0)
  """
  _check_suite_name(name)
  pre = _PRESETS[name]
  points = tuple(
    dataclasses.replace(p, experiments=(experiment,))
    for experiment, build in _BUILDERS.items()
    for p in build(pre)
  )
  return Suite(name, points, _preset_frontier(pre, budget_gib), small=name == "tiny")


def _check_suite_name(name: str) -> None:
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; choose from {list(SUITES)}.")


def _preset_frontier(pre: _Preset, budget_gib: float) -> Frontier:
  """The frontier search of a preset: from ``lm-s`` at its memory sizes."""
  grids = {"seqs": tuple(2**i for i in range(7, 18)), **pre.frontier_grids}
  return Frontier(budget_gib=budget_gib, model=_LM, T=4, sizes=pre.lm_mem, **grids)


def grid_suite(
  tasks: Sequence[str] = ("loss_weighting",),
  models: Sequence[str] = ("mlp", "lm"),
  Ts: Sequence[int] = (4,),
  methods: Sequence[str] = METHODS,
  *,
  small: bool = False,
) -> Suite:
  """Every task x model x T, with ``methods``, timed: for configurations of one's own."""
  points = [
    Point(task, model, T, (), tuple(methods), True, ("grid",))
    for task in tasks
    for model in models
    for T in Ts
  ]
  return Suite("grid", tuple(points), None, small)


# ----------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class _Selection:
  """The filters of :func:`select` (``None``: no filter)."""

  tasks: Sequence[str] | None = None
  models: Sequence[str] | None = None
  Ts: Sequence[int] | None = None
  methods: Sequence[str] | None = None
  experiments: Sequence[str] | None = None
  optimizers: Sequence[str] | None = None


def select(
  suite: Suite,
  *,
  tasks: Sequence[str] | None = None,
  models: Sequence[str] | None = None,
  Ts: Sequence[int] | None = None,
  methods: Sequence[str] | None = None,
  experiments: Sequence[str] | None = None,
  compile_only: bool = False,
  sizes: dict[str, dict[str, int]] | None = None,
  optimizers: Sequence[str] | None = None,
) -> Suite:
  """Restricts a suite to some tasks, models (names or families), T values, methods, experiments.

  ``optimizers`` (inner optimizer names) measures every Adam point of the
  suite with each of them instead, and keeps the points of other optimizers
  (the ``optimizers`` experiment) only if listed; the frontier (Adam) is
  kept only if ``"adam"`` is listed.

  ``compile_only`` makes every point compile-only; ``sizes`` (family ->
  field -> value) overrides sizes of every point of that family (points that
  become identical are measured once). The frontier is kept if ``"frontier"`` is
  among ``experiments`` (or they are not given) and its task and model pass
  the filters; its methods are filtered too.
  """
  if methods is not None:
    methods = check_methods(methods)
  _check_optimizers(optimizers)
  sel = _Selection(tasks, models, Ts, methods, experiments, optimizers)
  sizes = sizes or {}
  points = []
  for p in _with_optimizers(suite.points, optimizers):
    p = _selected_point(p, sel)
    if p is not None:
      points.append(_with_sizes(p, sizes, compile_only))
  frontier = _selected_frontier(suite.frontier, sel, sizes)
  return dataclasses.replace(suite, points=tuple(points), frontier=frontier)


def _check_optimizers(optimizers: Sequence[str] | None) -> None:
  for o in optimizers or ():
    check_optimizer(o)


def _matches(model: str, names: Sequence[str]) -> bool:
  return any(model == n or model.split("-")[0] == n for n in names)


def _with_optimizers(points: Iterable[Point], optimizers: Sequence[str] | None) -> list[Point]:
  """Adam points with each of ``optimizers``; other points only if their optimizer is listed."""
  if optimizers is None:
    return list(points)
  out = []
  for p in points:
    if p.optimizer == "adam":
      out += [dataclasses.replace(p, optimizer=o) for o in optimizers]
    elif p.optimizer in optimizers:
      out.append(p)
  return out


def _selected_point(p: Point, sel: _Selection) -> Point | None:
  """``p`` with the selected experiments and methods, or ``None`` if the filters drop it."""
  experiments = _selected_experiments(p, sel.experiments)
  if experiments is None or not _passes_filters(p, sel):
    return None
  methods = _selected_methods(p, sel.methods)
  if methods is None:
    return None
  return dataclasses.replace(p, methods=methods, experiments=experiments)


def _selected_experiments(p: Point, experiments: Sequence[str] | None) -> tuple[str, ...] | None:
  """The point's experiments among ``experiments`` (a grid point keeps its own); ``None``: none."""
  if experiments is None or "grid" in p.experiments:
    return p.experiments
  return tuple(e for e in p.experiments if e in experiments) or None


def _passes_filters(p: Point, sel: _Selection) -> bool:
  """Whether the point's task, model and T pass the filters."""
  return (
    (sel.tasks is None or p.task in sel.tasks)
    and (sel.models is None or _matches(p.model, sel.models))
    and (sel.Ts is None or p.T in sel.Ts)
  )


def _selected_methods(p: Point, methods: Sequence[str] | None) -> tuple[str, ...] | None:
  """The point's methods among ``methods``, the reference first; ``None`` if only it is left."""
  if methods is None:
    return tuple(check_methods(p.methods))
  kept = tuple(check_methods([m for m in methods if m in p.methods or m == "standard"]))
  # Only the reference left: nothing this point was asked to compare.
  return None if len(kept) == 1 else kept


def _with_sizes(p: Point, sizes: dict[str, dict[str, int]], compile_only: bool) -> Point:
  """``p`` with its family's size overrides, and compile-only if asked."""
  family = "lm" if p.model.startswith("lm") else "mlp"
  new_sizes = {**dict(p.sizes), **sizes.get(family, {})}
  return dataclasses.replace(
    p, timed=p.timed and not compile_only, sizes=tuple(sorted(new_sizes.items()))
  )


def _selected_frontier(
  frontier: Frontier | None, sel: _Selection, sizes: dict[str, dict[str, int]]
) -> Frontier | None:
  """The frontier with the selected methods and the LM size overrides, if the filters keep it."""
  if frontier is None or not _keeps_frontier(frontier, sel):
    return None
  if sel.methods is not None:
    frontier = dataclasses.replace(
      frontier, methods=tuple(m for m in frontier.methods if m in sel.methods)
    )
  if "lm" in sizes:
    frontier = dataclasses.replace(
      frontier, sizes=tuple(sorted({**dict(frontier.sizes), **sizes["lm"]}.items()))
    )
  return frontier


def _keeps_frontier(frontier: Frontier, sel: _Selection) -> bool:
  """Whether the frontier (an Adam search of one task and model) passes the filters."""
  return (
    (sel.experiments is None or "frontier" in sel.experiments)
    and (sel.tasks is None or frontier.task in sel.tasks)
    and (sel.models is None or _matches(frontier.model, sel.models))
    and (sel.optimizers is None or "adam" in sel.optimizers)
  )


def largest_fitting(
  xs: Sequence[float],
  measure: Callable[[int], float],
  budget: float,
  known: dict[int, float] | None = None,
  start: int = 0,
) -> tuple[int, dict[int, float]]:
  """The largest grid index whose memory fits the budget, with few measurements.

  Memory is assumed to grow with the grid value (monotone). The search keeps
  the largest index known to fit and the smallest known not to; it guesses
  the next index by a secant through the two measurements nearest the budget
  (memory is close to affine in batch, T and parameter count, so the guess
  is usually right the first time, and the next probe only confirms it),
  and bisects instead after two guesses in a row failed to halve the
  interval. The answer is certified by measurement: the
  index returned fits and the next one (if any) does not.

  Args:
    xs: the grid's numeric values (ascending), used by the secant.
    measure: ``measure(i) -> memory`` of grid index ``i``.
    budget: the budget (same unit as ``measure``).
    known: measurements already made (index -> memory), e.g. by sweeps.
    start: the index to measure first if nothing is known.

  Returns:
    ``(index, measurements)``: the largest fitting index (-1 if none fits) and
    every measurement (index -> memory), the known ones included.

  Examples:
    >>> xs = [1, 2, 4, 8, 16, 32, 64, 128]
    >>> calls = []
    >>> def measure(i):
    ...   calls.append(i)
    ...   return 100 + 10 * xs[i]
    >>> i, seen = largest_fitting(xs, measure, budget=1000)
    >>> xs[i], calls
    (64, [0, 3, 6, 7])
  """
  seen = dict(known or {})
  n = len(xs)
  if not seen:
    seen[start] = measure(start)

  def bounds():
    fit = [i for i, m in seen.items() if m <= budget]
    over = [i for i, m in seen.items() if m > budget]
    return max(fit, default=-1), min(over, default=n)

  stalls = 0
  while True:
    lo, hi = bounds()
    if hi - lo <= 1 or lo >= hi:
      return lo, seen
    i = min(max(_secant_guess(xs, seen, budget, lo, hi), lo + 1), hi - 1)
    if stalls >= 2 and i not in (lo + 1, hi - 1):
      # Guesses keep missing (memory far from affine): bisect the interval.
      i = (lo + hi) // 2
    seen[i] = measure(i)
    new_lo, new_hi = bounds()
    stalls = stalls + 1 if (new_hi - new_lo) > (hi - lo) / 2 else 0


def _secant_guess(
  xs: Sequence[float], seen: dict[int, float], budget: float, lo: int, hi: int
) -> int:
  """The grid index at which the line through the two measurements nearest the budget crosses it."""
  below = sorted(i for i, m in seen.items() if m <= budget)
  above = sorted(i for i, m in seen.items() if m > budget)
  if below and above:
    a, b = below[-1], above[0]
  elif len(below) >= 2:
    a, b = below[-2], below[-1]
  elif len(above) >= 2:
    a, b = above[0], above[1]
  else:  # One measurement: assume memory proportional to the grid value.
    ((i, m),) = seen.items()
    x = xs[i] * budget / max(m, 1e-9)
    return _index_at_most(xs, x)
  xa, xb, ma, mb = xs[a], xs[b], seen[a], seen[b]
  if mb == ma:
    return hi - 1 if mb <= budget else lo + 1
  x = xa + (budget - ma) * (xb - xa) / (mb - ma)
  return _index_at_most(xs, x)


def _index_at_most(xs: Sequence[float], x: float) -> int:
  return max([i for i, v in enumerate(xs) if v <= x * (1 + 1e-9)], default=-1)


# ----------------------------------------------------------------------- running


class _Progress:
  """A thread-safe tqdm bar over programs to compile and configurations to time."""

  def __init__(self, total: int, enabled: bool):
    from tqdm.auto import tqdm

    self._bar = tqdm(total=total, desc="benchmarks", unit="step", disable=not enabled)
    self._lock = threading.Lock()

  def add_total(self, n: int) -> None:
    with self._lock:
      self._bar.total += n
      self._bar.refresh()

  def step(self, text: str, n: int = 1) -> None:
    with self._lock:
      self._bar.set_postfix_str(text, refresh=False)
      self._bar.update(n)

  def say(self, text: str) -> None:
    with self._lock:
      self._bar.set_postfix_str(text)

  def close(self) -> None:
    self._bar.close()


def _label(p: Point, method: str | None = None) -> str:
  sizes = ",".join(f"{k}={v}" for k, v in p.sizes)
  opt = "" if p.optimizer == "adam" else f" {p.optimizer}"
  text = f"{p.task} {p.model}{opt} T={p.T}" + (f" {sizes}" if sizes else "")
  return text + (f" {method}" if method else "")


@dataclasses.dataclass
class SuiteResult:
  """What :func:`run_suite` returns.

  Attributes:
    records: one record per (configuration, method), ratios included.
    frontier: one record per (axis, method) of the frontier search.
    seconds: the wall-clock seconds of the whole run.
    phase_seconds: the seconds of each phase (``compile``, ``time``,
      ``frontier``).
  """

  records: list[dict[str, Any]]
  frontier: list[dict[str, Any]]
  seconds: float
  phase_seconds: dict[str, float]


def run_suite(
  suite: Suite,
  *,
  reps: int = 3,
  seed: int = 0,
  dtype: Any = jnp.float32,
  fast_compile: bool = False,
  jobs: int | None = None,
  progress: bool = True,
  on_phase: Callable[[str, list[dict[str, Any]], list[dict[str, Any]]], None] | None = None,
) -> SuiteResult:
  """Measures a suite: compiles every program, times the timed points, searches the frontier.

  Args:
    suite: the suite (see :func:`make_suite`, :func:`select`).
    reps: timed rounds per timed point.
    seed: PRNG seed of every problem.
    dtype: floating dtype of every problem.
    fast_compile: compile timed programs with
      :data:`~benchmarks.FAST_COMPILE_OPTIONS` too (faster runs,
      unrepresentative timings).
    jobs: programs compiled in parallel threads (default: up to 2, the CPU
      count). Timing never overlaps compilation.
    progress: show a tqdm progress bar.
    on_phase: called with ``(phase, records, frontier)`` after each phase
      (``"compile"``, ``"time"``, ``"frontier"``), e.g. to save partial
      results.

  Returns:
    A :class:`SuiteResult`.
  """
  t_start = time.perf_counter()
  _check_reps(suite.points, reps)
  jobs = jobs or max(1, min(2, os.cpu_count() or 1))
  # Points that name one configuration differently (mlp-M4 and mlp-M1 with
  # batch=512) are measured once.
  points = list(_merge(suite.points, lambda p: _canonical_key(p, suite.small)))
  programs = [(p, m) for p in points for m in check_methods(p.methods)]
  bar = _Progress(_n_steps(points, programs, suite.frontier), progress)
  run = _Measurements(suite.small, seed, dtype, fast_compile, bar)
  clock = _PhaseClock()
  records: list[dict[str, Any]] = []
  frontier_records: list[dict[str, Any]] = []
  try:
    with jax.enable_x64(run.x64):
      run.compile_all(programs, jobs)
      clock.lap("compile")
      if on_phase:
        on_phase("compile", run.records(points, reps), [])
      run.time_all(points, reps)
      records = run.records(points, reps)
      clock.lap("time")
      if on_phase:
        on_phase("time", records, [])
      if suite.frontier is not None and suite.frontier.methods:
        search = _FrontierSearch(run, suite.frontier)
        frontier_records = search.run_all(jobs)
        points = search.tag(points)
        records = run.records(points, reps)
        clock.lap("frontier")
        if on_phase:
          on_phase("frontier", records, frontier_records)
  finally:
    bar.close()
  return SuiteResult(records, frontier_records, time.perf_counter() - t_start, clock.seconds)


def _check_reps(points: Iterable[Point], reps: int) -> None:
  if reps < 1 and any(p.timed for p in points):
    raise ValueError(f"reps must be >= 1, got {reps}.")


def _n_steps(
  points: Sequence[Point], programs: Sequence[tuple[Point, str]], frontier: Frontier | None
) -> int:
  """Steps of the progress bar: programs to compile, points to time, 2 per frontier search."""
  n_searches = 0 if frontier is None else len(frontier.methods) * len(frontier.axes())
  return len(programs) + sum(p.timed for p in points) + 2 * n_searches


class _PhaseClock:
  """Wall-clock seconds of each phase of a run."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._start = time.perf_counter()

  def lap(self, phase: str) -> None:
    now = time.perf_counter()
    self.seconds[phase] = now - self._start
    self._start = now


class _Measurements:
  """The problems, compiled programs and measurements of a run, shared by the compile threads.

  Configurations are identified by :func:`_canonical_key`, so that points that
  name one configuration differently are built, compiled and timed once.
  """

  def __init__(self, small: bool, seed: int, dtype: Any, fast_compile: bool, bar: _Progress):
    self.small, self.bar = small, bar
    self._seed, self._dtype = seed, dtype
    self._timed_options = FAST_COMPILE_OPTIONS if fast_compile else None
    # JAX's x64 switch is thread-local: the compile threads must see the
    # caller's (and float64 problems need it on).
    self.x64 = bool(jax.config.jax_enable_x64) or jnp.dtype(dtype).itemsize == 8
    self.lock = threading.Lock()
    self._problems: dict[tuple, Problem] = {}
    # Memory of every compiled program, by (configuration, method): the
    # frontier search reads it before compiling anything new.
    self._infos: dict[tuple, dict[str, Any]] = {}
    self._executables: dict[tuple, Any] = {}

  def key(self, p: Point) -> tuple:
    return _canonical_key(p, self.small)

  def in_x64(self, fn: Callable) -> Callable:
    """``fn`` run with the run's x64 setting (in whichever thread calls it)."""

    def wrapped(*args):
      with jax.enable_x64(self.x64):
        return fn(*args)

    return wrapped

  def problem(self, p: Point) -> Problem:
    with self.lock:
      if self.key(p) not in self._problems:
        self._problems[self.key(p)] = make_problem(
          p.model,
          p.T,
          task=p.task,
          small=self.small,
          seed=self._seed,
          dtype=self._dtype,
          abstract=not p.timed,
          optimizer=p.optimizer,
          **dict(p.sizes),
        )
      return self._problems[self.key(p)]

  def info(self, p: Point, method: str) -> dict[str, Any] | None:
    """The measurements of ``method`` on ``p`` so far, ``None`` if not compiled yet."""
    with self.lock:
      return self._infos.get((self.key(p), method))

  def compile(self, p: Point, method: str) -> None:
    """Compiles ``method`` on ``p`` and records its memory (and keeps it if ``p`` is timed)."""
    with jax.enable_x64(self.x64):
      prob = self.problem(p)
      options = self._timed_options if p.timed else FAST_COMPILE_OPTIONS
      compiled, info = compile_method(prob, method, options)
    with self.lock:
      self._infos[(self.key(p), method)] = info
      if p.timed:
        self._executables[(self.key(p), method)] = compiled
    self.bar.step(_label(p, method))

  def compile_all(self, programs: Sequence[tuple[Point, str]], jobs: int) -> None:
    with ThreadPoolExecutor(jobs) as pool:
      for f in [pool.submit(self.compile, p, m) for p, m in programs]:
        f.result()

  def time(self, p: Point, reps: int) -> None:
    """Times the methods of ``p`` (interleaved), lowest memory first, and frees their programs."""
    methods = check_methods(p.methods)
    compiled = {m: self._executables.pop((self.key(p), m)) for m in methods}
    order = sorted(methods, key=lambda m: self._infos[(self.key(p), m)]["total_mib"] or 0.0)
    timed = time_methods(
      compiled,
      self._problems[self.key(p)].args,
      reps=reps,
      order=order,
      on_progress=lambda s: self.bar.say(f"{_label(p)}: {s}"),
    )
    for m in methods:
      self._infos[(self.key(p), m)].update(timed[m])
    del compiled
    self.bar.step(_label(p))

  def time_all(self, points: Iterable[Point], reps: int) -> None:
    """Times the timed points, one at a time (after all compilation)."""
    for p in points:
      if p.timed:
        self.time(p, reps)

  def records(self, points: Sequence[Point], reps: int) -> list[dict[str, Any]]:
    """Result records of every measured (point, method), with experiments and ratios."""
    records = []
    for p in points:
      for m in [m for m in METHODS if (self.key(p), m) in self._infos]:
        info = self._infos[(self.key(p), m)]
        rec = make_record(self._problems[self.key(p)], m, info, compile_only=not p.timed, reps=reps)
        rec["experiments"] = list(p.experiments)
        records.append(rec)
    add_ratios(records)
    return records


class _FrontierSearch:
  """The frontier's searches (one per axis and method), reusing every program compiled so far."""

  def __init__(self, run: _Measurements, frontier: Frontier):
    self.run, self.frontier = run, frontier
    # Every configuration the searches measured or read, by key.
    self.probes: dict[tuple, Point] = {}

  def run_all(self, jobs: int) -> list[dict[str, Any]]:
    """The frontier records, the searches run in ``jobs`` threads."""
    search = self.run.in_x64(self.search)
    axes, methods = self.frontier.axes(), self.frontier.methods
    with ThreadPoolExecutor(jobs) as pool:
      futures = [pool.submit(search, axis, m) for axis in axes for m in methods]
      return [f.result() for f in futures]

  def search(self, axis: str, method: str) -> dict[str, Any]:
    """The largest value on ``axis`` that fits the budget with ``method``."""
    frontier, small = self.frontier, self.run.small
    values = frontier.axes()[axis]
    xs = [_axis_x(axis, v, small) for v in values]
    known = self._known(axis, method)
    base = _axis_base(frontier, axis, small)
    base = values.index(base) if base in values else 0
    i, seen = largest_fitting(
      xs,
      lambda j: self._measure(frontier.point(axis, values[j]), method),
      frontier.budget_gib * 1024,
      known,
      start=base,
    )
    self.run.bar.step(f"frontier {axis} {method}", 2)
    return _frontier_record(frontier, axis, method, values, i, seen, small)

  def _probe(self, p: Point) -> None:
    with self.run.lock:
      self.probes.setdefault(self.run.key(p), p)

  def _known(self, axis: str, method: str) -> dict[int, float]:
    """Memory of the grid points on ``axis`` already compiled with ``method``."""
    known = {}
    for i, v in enumerate(self.frontier.axes()[axis]):
      p = self.frontier.point(axis, v)
      info = self.run.info(p, method)
      if info is not None:
        known[i] = info["total_mib"]
        self._probe(p)
    return known

  def _measure(self, p: Point, method: str) -> float:
    """Total memory of ``method`` on ``p``, compiled if not yet."""
    have = self.run.info(p, method) is not None
    self._probe(p)
    if not have:
      self.run.bar.add_total(1)
      self.run.compile(p, method)
    return self.run.info(p, method)["total_mib"]

  def tag(self, points: Sequence[Point]) -> list[Point]:
    """``points`` with the frontier among the experiments of those probed, and the new probes."""
    key = self.run.key
    measured = {key(q) for q in points}
    new = [p for k, p in self.probes.items() if k not in measured]
    return [
      dataclasses.replace(p, experiments=(*p.experiments, "frontier"))
      if key(p) in self.probes
      else p
      for p in points
    ] + [dataclasses.replace(p, experiments=("frontier",), methods=()) for p in new]


def _canonical_key(p: Point, small: bool) -> tuple:
  """What identifies a configuration: task, model family, T, every size of the model, optimizer."""
  family, cfg = model_config(p.model, small=small)
  sizes = tuple(sorted(dataclasses.asdict(dataclasses.replace(cfg, **dict(p.sizes))).items()))
  return (p.task, family, p.T, sizes, p.optimizer)


def _axis_base(frontier: Frontier, axis: str, small: bool) -> Any:
  if axis == "model":
    return frontier.model
  if axis == "T":
    return frontier.T
  cfg = dataclasses.replace(model_config(frontier.model, small=small)[1], **dict(frontier.sizes))
  return cfg.seq_len if axis == "seq" else cfg.batch


def _axis_x(axis: str, value: Any, small: bool) -> float:
  """The numeric value of a grid point for the secant: the parameter count on the model axis."""
  if axis != "model":
    return float(value)
  return float(make_problem(value, 1, small=small, abstract=True).config["n_params"])


def _frontier_record(
  frontier: Frontier,
  axis: str,
  method: str,
  values: Sequence[Any],
  i: int,
  seen: dict[int, float],
  small: bool,
) -> dict[str, Any]:
  largest = None if i < 0 else values[i]
  nxt = i + 1 if i + 1 < len(values) else None
  base = {"model": frontier.model, "T": frontier.T, **dict(frontier.sizes)}
  rec = {
    "axis": axis,
    "method": method,
    "task": frontier.task,
    "budget_gib": frontier.budget_gib,
    "base": base,
    "largest": largest,
    "largest_total_mib": None if i < 0 else seen[i],
    "next": None if nxt is None else values[nxt],
    "next_total_mib": None if nxt is None else seen.get(nxt),
    "grid_max_fits": nxt is None and i >= 0,
    "probes": len(seen),
  }
  if axis == "model" and largest is not None:
    rec["largest_n_params"] = make_problem(largest, 1, small=small, abstract=True).config[
      "n_params"
    ]
  return rec
