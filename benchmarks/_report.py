"""Tables, JSON and plots of benchmark results."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks._bench import BEST_STANDARD, CORE_METHODS, REFERENCE

__all__ = [
  "format_table",
  "format_frontier",
  "check_targets",
  "format_targets",
  "format_markdown",
  "save_results",
  "plot_results",
]

_METHOD_STYLE = {
  "standard": ("tab:gray", "o", "-"),
  "standard_best": ("black", "s", "--"),
  "mixflow": ("tab:blue", "D", "-"),
  "mixflow_noremat": ("tab:cyan", "^", ":"),
  "mixflow_remat_nosave": ("tab:purple", "v", ":"),
  "standard_remat_nosave": ("tab:brown", "x", ":"),
  "first_order": ("tab:orange", "*", ":"),
  "hvp": ("tab:green", "P", "-."),
}

#: The methods drawn in the memory plots.
_PLOTTED = (*CORE_METHODS, "hvp")


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
  return "-" if x is None else format(x, spec) + suffix


def _optimizer(r: dict[str, Any]) -> str:
  return r.get("optimizer", "adam")


def _any_other_optimizer(records: Iterable[dict[str, Any]]) -> bool:
  """Whether some record's inner optimizer is not Adam (then the tables name it)."""
  return any(_optimizer(r) != "adam" for r in records)


def _columns(optimizer: bool = False) -> list[tuple[str, int, Any]]:
  opt = [("optimizer", 9, _optimizer)] if optimizer else []
  return [
    ("task", 14, lambda r: r["task"]),
    ("model", 8, lambda r: r["model"]),
    *opt,
    ("T", 3, lambda r: str(r["T"])),
    ("batch", 5, lambda r: str(r["batch"])),
    ("seq", 5, lambda r: _fmt(r.get("seq_len"), "d")),
    ("method", 21, lambda r: r["method"]),
    ("temp MiB", 10, lambda r: _fmt(r["temp_mib"], ".1f")),
    ("total MiB", 10, lambda r: _fmt(r["total_mib"], ".1f")),
    ("peak MiB", 8, lambda r: _fmt(r.get("peak_mib"), ".1f")),
    ("median s", 9, lambda r: _fmt(r["seconds"], ".4f")),
    ("mem/std", 8, lambda r: _fmt(r["mem_ratio_vs_standard"], ".2f", "x")),
    ("mem/best", 8, lambda r: _fmt(r["mem_ratio_vs_standard_best"], ".2f", "x")),
    ("/hvp", 6, lambda r: _fmt(r.get("mem_vs_hvp"), ".2f", "x")),
    ("t/std", 6, lambda r: _fmt(r["time_ratio_vs_standard"], ".2f")),
    ("t/best", 6, lambda r: _fmt(r["time_ratio_vs_standard_best"], ".2f")),
    ("rel err", 8, lambda r: _fmt(r["rel_err"], ".1e")),
  ]


def format_table(records: Iterable[dict[str, Any]]) -> str:
  """A fixed-width text table of benchmark records (one row per configuration and method).

  Memory ratios are ``reference / method`` on the compiled temp memory (> 1:
  the method uses less); time ratios are ``method / reference`` (< 1:
  faster). ``-`` marks what was not measured (compile-only: no time; a CPU:
  no runtime peak). An ``optimizer`` column names the inner optimizer when
  some record's is not Adam.
  """
  records = list(records)
  cols = _columns(_any_other_optimizer(records))
  lines = [" ".join(f"{name:>{w}}" for name, w, _ in cols)]
  lines.append(" ".join("-" * w for _, w, _ in cols))
  for r in records:
    lines.append(" ".join(f"{get(r):>{w}}" for _, w, get in cols))
  return "\n".join(lines)


def _count(n: int) -> str:
  """A parameter count: 850, 1.2k, 0.85M, 25M, 0.57B."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale / 10 and unit != "k" or n >= scale:
      x = n / scale
      return f"{x:.2g}{unit}" if x < 10 else f"{x:.0f}{unit}"
  return str(n)


def _frontier_value(rec: dict[str, Any]) -> str:
  if rec["largest"] is None:
    return "none fits"
  text = str(rec["largest"])
  if rec["axis"] == "model":
    text += f" ({_count(rec['largest_n_params'])})"
  return text + ("+" if rec["grid_max_fits"] else "")


def format_frontier(frontier: Sequence[dict[str, Any]]) -> str:
  """The "how big can I go" table: per axis, the largest value that fits with each method.

  ``+`` marks a grid's last value (larger ones were not tried).
  """
  if not frontier:
    return ""
  methods = list(dict.fromkeys(r["method"] for r in frontier))
  axes = list(dict.fromkeys(r["axis"] for r in frontier))
  base = frontier[0]["base"]
  budget = frontier[0]["budget_gib"]
  head = (
    f"Largest configuration whose compiled memory (temp + arguments + outputs) fits "
    f"{budget:g} GiB, one axis at a time from {frontier[0]['task']} on "
    + ", ".join(f"{k}={v}" for k, v in base.items())
  )
  width = 18
  lines = [head, f"{'axis':>6} " + " ".join(f"{m:>{width}}" for m in methods)]
  lines.append(" ".join(["-" * 6] + ["-" * width] * len(methods)))
  by = {(r["axis"], r["method"]): r for r in frontier}
  for axis in axes:
    cells = [_frontier_value(by[(axis, m)]) if (axis, m) in by else "-" for m in methods]
    lines.append(f"{axis:>6} " + " ".join(f"{c:>{width}}" for c in cells))
  return "\n".join(lines)


def _median(xs: list[float]) -> float | None:
  return statistics.median(xs) if xs else None


def _where(r: dict[str, Any]) -> str:
  seq = "" if r.get("seq_len") is None else f" seq {r['seq_len']}"
  opt = "" if _optimizer(r) == "adam" else f" {_optimizer(r)}"
  return f"{r['task']} {r['model']}{opt} T={r['T']} batch {r['batch']}{seq}"


def check_targets(
  records: Sequence[dict[str, Any]], frontier: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
  """The README's targets for ``"mixflow"`` (the library defaults), measured.

  The targets are claims about the inner-Adam benchmarks: records of other
  inner optimizers (the ``optimizers`` experiment, ``--optimizers``) are
  reported in their tables but not counted here. With inner Lion, for
  instance, the sign step has zero derivative, the meta-gradient has no
  second-order term, and every method compiles to the same memory.

  - less temp memory than ``standard_best`` in every configuration;
  - at least 10x less temp memory than ``standard`` at T = 8 on the LM family;
  - at least 25% faster than ``standard`` at the median over timed
    configurations (time ratio <= 0.75);
  - faster than ``standard_best`` at the median (time ratio < 1);
  - long context (``lm-s``, batch 4, T = 4, 4096 tokens, per-block remat and
    the memory-efficient attention): at most 0.3x the temp memory of
    ``standard_best`` and at most 1.25x that of one inner HVP;
  - a largest sequence length within the frontier's budget at least 4x
    ``standard_best``'s.

  Returns:
    One dict per target: ``target``, ``value`` (the worst case or the
    median), ``met`` (``None`` where nothing measured it) and ``detail``
    (what the value is, and where the worst case is).
  """
  mix = [r for r in records if r["method"] == "mixflow" and _optimizer(r) == "adam"]

  def worst(recs, key):
    recs = [r for r in recs if r[key] is not None]
    return (min(recs, key=lambda r: r[key]), len(recs)) if recs else (None, 0)

  best_r, n_best = worst(mix, "mem_ratio_vs_standard_best")
  lm8_r, n_lm8 = worst(
    [r for r in mix if r["family"] == "lm" and r["T"] == 8], "mem_ratio_vs_standard"
  )
  t_std = [r["time_ratio_vs_standard"] for r in mix if r["time_ratio_vs_standard"] is not None]
  t_best = [r["time_ratio_vs_standard_best"] for r in mix if r["time_ratio_vs_standard_best"]]
  med_std, med_best = _median(t_std), _median(t_best)
  v_best = None if best_r is None else best_r["mem_ratio_vs_standard_best"]
  v_lm8 = None if lm8_r is None else lm8_r["mem_ratio_vs_standard"]

  def met(ok: bool, value: Any) -> bool | None:
    return None if value is None else bool(ok)

  long = [
    r
    for r in mix
    if (r["model"], r["seq_len"], r["batch"], r["T"]) == ("lm-s", 4096, 4, 4)
    and r["task"] == "loss_weighting"
  ]
  long_r = long[0] if long else None
  v_long = None
  if long_r is not None and long_r["mem_ratio_vs_standard_best"]:
    v_long = 1.0 / long_r["mem_ratio_vs_standard_best"]
  v_hvp = None if long_r is None else long_r.get("mem_vs_hvp")
  seq = {r["method"]: r["largest"] for r in frontier if r["axis"] == "seq"}
  v_seq = None
  if seq.get("mixflow") and seq.get(BEST_STANDARD):
    v_seq = seq["mixflow"] / seq[BEST_STANDARD]

  return [
    {
      "target": "less memory than standard_best in every configuration",
      "value": v_best,
      "met": met(v_best is not None and v_best > 1, v_best),
      "detail": f"smallest standard_best/mixflow temp ratio over {n_best} configurations"
      + ("" if best_r is None else f", at {_where(best_r)}"),
    },
    {
      "target": ">= 10x less memory than standard at T=8 on the LM family",
      "value": v_lm8,
      "met": met(v_lm8 is not None and v_lm8 >= 10, v_lm8),
      "detail": f"smallest standard/mixflow temp ratio over {n_lm8} LM configurations at T=8"
      + ("" if lm8_r is None else f", at {_where(lm8_r)}"),
    },
    {
      "target": ">= 25% faster than standard at the median",
      "value": med_std,
      "met": met(med_std is not None and med_std <= 0.75, med_std),
      "detail": f"median mixflow/standard time ratio over {len(t_std)} timed configurations",
    },
    {
      "target": "faster than standard_best at the median",
      "value": med_best,
      "met": met(med_best is not None and med_best < 1, med_best),
      "detail": f"median mixflow/standard_best time ratio over {len(t_best)} timed configurations",
    },
    {
      "target": "<= 0.3x standard_best's memory at 4096 tokens",
      "value": v_long,
      "met": met(v_long is not None and v_long <= 0.3, v_long),
      "detail": "mixflow/standard_best temp ratio, loss_weighting lm-s T=4 batch 4 seq 4096",
    },
    {
      "target": "<= 1.25x one inner HVP's memory at 4096 tokens",
      "value": v_hvp,
      "met": met(v_hvp is not None and v_hvp <= 1.25, v_hvp),
      "detail": "mixflow/hvp temp ratio, loss_weighting lm-s T=4 batch 4 seq 4096",
    },
    {
      "target": ">= 4x standard_best's largest sequence length within the budget",
      "value": v_seq,
      "met": met(v_seq is not None and v_seq >= 4, v_seq),
      "detail": "largest mixflow / largest standard_best sequence length (frontier)"
      + ("" if v_seq is None else f": {seq['mixflow']} vs {seq[BEST_STANDARD]}"),
    },
  ]


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
  """The targets as text lines: met / NOT met, the value and what it is."""
  lines = []
  for t in targets:
    status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    value = _fmt(t["value"], ".4f")
    lines.append(f"[{status:>12}] {t['target']}: {value} ({t['detail']})")
  return "\n".join(lines)


def _config_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
  """Records grouped by configuration (method -> record), in order of appearance."""
  from benchmarks._bench import config_key

  groups: dict[tuple, dict[str, dict[str, Any]]] = {}
  for r in records:
    groups.setdefault(config_key(r), {})[r["method"]] = r
  return list(groups.values())


def _mib(x: float | None) -> str:
  if x is None:
    return "-"
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_markdown(
  records: Sequence[dict[str, Any]],
  frontier: Sequence[dict[str, Any]] = (),
  targets: Sequence[dict[str, Any]] = (),
) -> str:
  """The results as Markdown tables (what the README shows).

  One row per configuration: compiled temp memory of the three core methods
  and MixFlow's ratios, then (timed configurations) median seconds, time
  ratios and compile seconds (trace, lower and compile, XLA's default
  options); the other methods in a table of their own; the frontier; the
  targets. An ``optimizer`` column names the inner optimizer when some
  record's is not Adam.
  """
  core = [g for g in _config_rows(records) if all(m in g for m in CORE_METHODS)]
  with_opt = _any_other_optimizer(records)
  head = "| experiments | task | model |" + (" optimizer |" if with_opt else "")
  head += " T | batch | seq | params |"
  n_left = head.count("|") - 1  # Left-aligned columns: the configuration.
  mem = (
    " standard MiB | standard_best MiB | mixflow MiB | one HVP MiB | mixflow vs standard "
    "| vs standard_best | mixflow / HVP |"
  )
  timed_cols = (
    " standard s | standard_best s | mixflow s | mixflow time vs standard | vs standard_best |"
    " compile s (standard / standard_best / mixflow) |"
  )

  def config(g):
    r = g["mixflow"]
    seq = "-" if r.get("seq_len") is None else str(r["seq_len"])
    exps = ", ".join(e for e in r.get("experiments", ()) if e != "frontier") or "frontier"
    opt = f" {_optimizer(r)} |" if with_opt else ""
    return (
      f"| {exps} | {r['task']} | {r['model']} |{opt} {r['T']} | {r['batch']} | {seq} | "
      f"{_count(r['n_params'])} |"
    )

  def memory(g):
    r = g["mixflow"]
    cells = [_mib(g[m]["temp_mib"]) for m in CORE_METHODS]
    cells += [_mib(g["hvp"]["temp_mib"]) if "hvp" in g else "-"]
    cells += [_fmt(r["mem_ratio_vs_standard"], ".2f", "x less")]
    cells += [_fmt(r["mem_ratio_vs_standard_best"], ".2f", "x less")]
    cells += [_fmt(r.get("mem_vs_hvp"), ".2f", "x")]
    return " " + " | ".join(cells) + " |"

  def timing(g):
    r = g["mixflow"]
    cells = [_fmt(g[m]["seconds"], ".3f") for m in CORE_METHODS]
    cells += [
      _fmt(r["time_ratio_vs_standard"], ".2f"),
      _fmt(r["time_ratio_vs_standard_best"], ".2f"),
      " / ".join(_fmt(g[m].get("compile_s"), ".1f") for m in CORE_METHODS),
    ]
    return " " + " | ".join(cells) + " |"

  def sep(line):
    return "|" + "|".join("---" if i < n_left else "---:" for i in range(line.count("|") - 1)) + "|"

  parts = []
  timed = [g for g in core if g["mixflow"]["seconds"] is not None]
  if timed:
    line = head + mem + timed_cols
    rows = [config(g) + memory(g) + timing(g) for g in timed]
    parts.append("**Timed configurations**\n\n" + "\n".join([line, sep(line), *rows]))
  compiled = [
    g
    for g in core
    if g["mixflow"]["seconds"] is None and g["mixflow"].get("experiments") != ["frontier"]
  ]
  if compiled:
    line = head + mem
    rows = [config(g) + memory(g) for g in compiled]
    parts.append("**Memory only (compile-only)**\n\n" + "\n".join([line, sep(line), *rows]))
  others = [
    (g, m)
    for g in _config_rows(records)
    for m in g
    if m not in (*CORE_METHODS, "hvp") and "standard" in g
  ]
  if others:
    line = (
      "| task | model |"
      + (" optimizer |" if with_opt else "")
      + " T | method | temp MiB | vs standard | vs standard_best | median s | "
      "time vs standard | vs standard_best | rel err |"
    )
    rows = []
    for g, m in others:
      r = g[m]
      opt = f" {_optimizer(r)} |" if with_opt else ""
      rows.append(
        f"| {r['task']} | {r['model']} |{opt} {r['T']} | {m} | {_mib(r['temp_mib'])} | "
        f"{_fmt(r['mem_ratio_vs_standard'], '.2f', 'x less')} | "
        f"{_fmt(r['mem_ratio_vs_standard_best'], '.2f', 'x less')} | "
        f"{_fmt(r['seconds'], '.3f')} | {_fmt(r['time_ratio_vs_standard'], '.2f')} | "
        f"{_fmt(r['time_ratio_vs_standard_best'], '.2f')} | {_fmt(r['rel_err'], '.1e')} |"
      )
    sep_line = "|---|---|---|---|" + "---|" * with_opt + "---:|" * 7
    parts.append("**Other methods**\n\n" + "\n".join([line, sep_line, *rows]))
  if frontier:
    methods = list(dict.fromkeys(r["method"] for r in frontier))
    by = {(r["axis"], r["method"]): r for r in frontier}
    line = "| largest ... | " + " | ".join(methods) + " |"
    rows = []
    for axis in dict.fromkeys(r["axis"] for r in frontier):
      cells = [_frontier_value(by[(axis, m)]) if (axis, m) in by else "-" for m in methods]
      rows.append(f"| {axis} | " + " | ".join(cells) + " |")
    f0 = frontier[0]
    base = ", ".join(f"{k} {v}" for k, v in f0["base"].items())
    parts.append(
      f"**Within {f0['budget_gib']:g} GiB** (compiled temp + arguments + outputs; one axis at a "
      f"time from {f0['task']}, {base})\n\n"
      + "\n".join([line, "|---|" + "---:|" * len(methods), *rows])
    )
  if targets:
    rows = []
    for t in targets:
      status = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
      rows.append(f"| {t['target']} | {_fmt(t['value'], '.4f')} | {status} | {t['detail']} |")
    parts.append(
      "**Targets** (mixflow = library defaults)\n\n"
      + "\n".join(["| target | value | | what |", "|---|---:|---|---|", *rows])
    )
  return "\n\n".join(parts) + "\n"


def save_results(
  records: Sequence[dict[str, Any]],
  out: str | os.PathLike,
  frontier: Sequence[dict[str, Any]] | None = None,
  meta: dict[str, Any] | None = None,
) -> str:
  """Writes ``<out>/results.json`` (``frontier.json``, ``run.json`` if given); returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(list(records), f, indent=1)
  if frontier is not None:
    with open(os.path.join(out, "frontier.json"), "w") as f:
      json.dump(list(frontier), f, indent=1)
  if meta is not None:
    with open(os.path.join(out, "run.json"), "w") as f:
      json.dump(meta, f, indent=1)
  return path


# ------------------------------------------------------------------------- plots


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt


def _in(records, experiment, **match):
  return [
    r
    for r in records
    if experiment in r.get("experiments", ()) and all(r[k] == v for k, v in match.items())
  ]


def _lines(ax, recs, x_key, y_key, methods=_PLOTTED, label_suffix=""):
  drawn = False
  for m in methods:
    pts = sorted((r[x_key], r[y_key]) for r in recs if r["method"] == m and r[y_key] is not None)
    if not pts:
      continue
    color, marker, style = _METHOD_STYLE.get(m, ("tab:red", ".", "-"))
    ax.plot(*zip(*pts), marker=marker, linestyle=style, color=color, label=m + label_suffix)
    drawn = True
  return drawn


def _save(fig, out, name, plt) -> str:
  fig.tight_layout()
  path = os.path.join(out, name)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _groups(recs, keys):
  """Records grouped by the values of ``keys``, in order of appearance."""
  groups: dict[tuple, list] = {}
  for r in recs:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return list(groups.values())


def _sizes(r) -> str:
  seq = "" if r.get("seq_len") is None else f", seq {r['seq_len']}"
  return f"batch {r['batch']}{seq}"


def _plot_memory_vs_T(records, out, plt):
  groups = _groups(_in(records, "T"), ("model", "batch", "seq_len"))
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, sub in zip(axes[0], groups):
    _lines(ax, sub, "T", "temp_mib")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("inner steps T")
    ax.set_ylabel("compiled temp memory (MiB)")
    ax.set_title(f"{sub[0]['model']}, {_sizes(sub[0])}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"memory vs T ({groups[0][0]['task']})")
  return _save(fig, out, "memory_vs_T.png", plt)


def _plot_memory_vs_model(records, out, plt):
  groups = _groups(_in(records, "ladder"), ("T", "batch", "seq_len", "naive"))
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
  for ax, recs in zip(axes[0], groups):
    _lines(ax, recs, "n_params", "total_mib")
    for r in recs:
      if r["method"] == REFERENCE:
        ax.annotate(r["model"], (r["n_params"], r["total_mib"]), fontsize=8,
                    textcoords="offset points", xytext=(-10, 6))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner model parameters")
    ax.set_ylabel("compiled total memory (MiB)")
    timed = "timed" if not recs[0]["compile_only"] else "compile-only"
    naive = ", naive model" if recs[0]["naive"] else ""
    ax.set_title(f"LM ladder{naive}, T={recs[0]['T']}, {_sizes(recs[0])} ({timed})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out, "memory_vs_model.png", plt)


def _plot_batch_seq(records, out, plt):
  panels = []
  if _in(records, "batch"):
    panels.append(("batch", "batch", _in(records, "batch")))
  seq = _in(records, "seq")
  for naive in (False, True):
    recs = [r for r in seq if r["naive"] == naive]
    if recs:
      panels.append(("seq", "seq_len", recs))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
  for ax, (exp, key, recs) in zip(axes[0], panels):
    _lines(ax, recs, key, "temp_mib")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)" if key == "batch" else "sequence length")
    ax.set_ylabel("compiled temp memory (MiB)")
    fixed = f"seq {recs[0]['seq_len']}" if key == "batch" else f"batch {recs[0]['batch']}"
    ax.set_title(f"{recs[0]['model']}, T={recs[0]['T']}, {fixed}: memory vs {exp}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  return _save(fig, out, "memory_vs_batch_seq.png", plt)


def _plot_m_sweep(records, out, plt):
  recs = [r for r in _in(records, "M") if r["method"] == "mixflow"]
  if not recs:
    return None
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for ref, color in ((REFERENCE, "tab:gray"), (BEST_STANDARD, "black")):
    pts = sorted((r["M"], r[f"mem_ratio_vs_{ref}"]) for r in recs if r[f"mem_ratio_vs_{ref}"])
    if pts:
      a.plot(*zip(*pts), marker="o", color=color, label=f"{ref} / mixflow")
    pts = sorted((r["M"], r[f"time_ratio_vs_{ref}"]) for r in recs if r[f"time_ratio_vs_{ref}"])
    if pts:
      b.plot(*zip(*pts), marker="o", color=color, label=f"mixflow / {ref}")
  a.set_ylabel("temp memory ratio (x less with mixflow)")
  b.set_ylabel("time ratio (< 1: mixflow faster)")
  b.axhline(1.0, color="red", lw=0.8)
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-step work size M (batch = 128 M)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  a.set_title(f"MLP toy, T={recs[0]['T']}: memory saving grows with M")
  b.set_title("time (timed M only)")
  return _save(fig, out, "m_sweep.png", plt)


def _plot_time_ratios(records, out, plt):
  recs = [r for r in records if r["method"] == "mixflow" and r["time_ratio_vs_standard"]]
  if not recs:
    return None
  labels = [
    f"{r['task']} {r['model']}"
    + ("" if _optimizer(r) == "adam" else f" {_optimizer(r)}")
    + f" T={r['T']}"
    for r in recs
  ]
  fig, ax = plt.subplots(figsize=(10, 0.32 * len(recs) + 1.4))
  y = list(range(len(recs)))
  ax.barh([i - 0.2 for i in y], [r["time_ratio_vs_standard"] for r in recs], height=0.4,
          color="tab:gray", label="mixflow / standard")  # fmt: skip
  ax.barh([i + 0.2 for i in y], [r["time_ratio_vs_standard_best"] or 0 for r in recs],
          height=0.4, color="black", label="mixflow / standard_best")  # fmt: skip
  ax.axvline(1.0, color="red", lw=0.8)
  ax.axvline(0.75, color="red", lw=0.8, ls="--", label="25% faster")
  ax.set_yticks(y, labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("time ratio (< 1: mixflow faster)")
  ax.set_title("median wall-clock of the meta-gradient: mixflow vs the baselines", fontsize=10)
  worst = max(max(r["time_ratio_vs_standard"], r["time_ratio_vs_standard_best"] or 0) for r in recs)
  ax.set_xlim(0, max(1.25, worst) * 1.05)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
  return _save(fig, out, "time_ratios.png", plt)


def _plot_frontier(frontier, out, plt):
  if not frontier:
    return None
  axes_names = list(dict.fromkeys(r["axis"] for r in frontier))
  methods = list(dict.fromkeys(r["method"] for r in frontier))
  fig, axes = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 4), squeeze=False)
  for ax, axis in zip(axes[0], axes_names):
    recs = {r["method"]: r for r in frontier if r["axis"] == axis}
    vals, names = [], []
    for m in methods:
      r = recs.get(m)
      if r is None or r["largest"] is None:
        vals.append(0)
      elif axis == "model":
        vals.append(r["largest_n_params"])
      else:
        vals.append(r["largest"])
      names.append(m)
    colors = [_METHOD_STYLE.get(m, ("tab:red",))[0] for m in names]
    bars = ax.bar(names, vals, color=colors)
    for bar_, m in zip(bars, names):
      r = recs.get(m)
      text = "-" if r is None else _frontier_value(r)
      ax.annotate(text, (bar_.get_x() + bar_.get_width() / 2, bar_.get_height()), ha="center",
                  va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("parameters" if axis == "model" else axis)
    ax.margins(y=0.12)
    ax.set_title(f"largest {axis} within {frontier[0]['budget_gib']:g} GiB")
    ax.tick_params(axis="x", labelsize=8)
  return _save(fig, out, "frontier.png", plt)


def plot_results(
  records: Sequence[dict[str, Any]],
  out: str | os.PathLike,
  frontier: Sequence[dict[str, Any]] = (),
) -> list[str]:
  """Writes the plots (PNG, matplotlib's Agg backend) into ``out``; returns their paths.

  ``memory_vs_T.png``, ``memory_vs_model.png``, ``memory_vs_batch_seq.png``,
  ``m_sweep.png``, ``time_ratios.png`` and ``frontier.png``, each only if
  its experiment was run. Returns ``[]`` (without failing) if matplotlib is
  not installed.
  """
  plt = _pyplot()
  if plt is None:
    return []
  os.makedirs(out, exist_ok=True)
  paths = [
    _plot_memory_vs_T(records, out, plt),
    _plot_memory_vs_model(records, out, plt),
    _plot_batch_seq(records, out, plt),
    _plot_m_sweep(records, out, plt),
    _plot_time_ratios(records, out, plt),
    _plot_frontier(frontier, out, plt),
  ]
  return [p for p in paths if p is not None]
