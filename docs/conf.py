"""Sphinx configuration of the mixflow_optax documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors).

Two kinds of pages are generated here at build time, so that new content is picked up without
editing the site:

- ``tutorials/*.ipynb``: copies of the notebooks in ``colabs/`` (rendered, not executed: the
  test suite executes them);
- ``api/<module>.md``: one reference page per public module that exists, listing its ``__all__``.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

project = "mixflow_optax"
author = "The mixflow_optax authors"
copyright = "2025, the mixflow_optax authors"  # noqa: A001 - Sphinx's name
# The one definition of the version (pyproject.toml reads it too).
release = importlib.import_module("mixflow_optax").__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_nb",
]

# The notebooks are executed by tests/test_colabs.py; the site only renders them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" of NamedTuples as fields, not as second descriptions of the tuple fields.
napoleon_use_ivar = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autosummary_generate = False

html_theme = "furo"
html_title = "mixflow_optax"

exclude_patterns = ["_build", "bench", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header"]

# Public modules documented in the API reference, in this order. A module that cannot be imported
# (not written yet) is left out rather than breaking the build.
API_MODULES = {
  "mixflow_optax": "The differentiation rule, the unrolled loop, the meta-optimizer, memory.",
  "mixflow_optax.transforms": "Reparameterised optax transforms and learned optimizers.",
  "mixflow_optax.nn": "Model building blocks that run under forward-over-reverse.",
}


def _write_if_changed(path: pathlib.Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def _copy_tutorials() -> None:
  out = DOCS / "tutorials"
  for stale in out.glob("*.ipynb"):
    if not (ROOT / "colabs" / stale.name).exists():
      stale.unlink()
  for notebook in sorted((ROOT / "colabs").glob("*.ipynb")):
    target = out / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
      shutil.copyfile(notebook, target)


def _directive(module, name: str) -> str:
  obj = getattr(module, name)
  if inspect.ismodule(obj):
    return ""  # documented on its own page
  if inspect.isclass(obj):
    return f".. autoclass:: {name}\n   :members:\n   :show-inheritance:\n"
  if callable(obj):
    return f".. autofunction:: {name}\n"
  return f".. autodata:: {name}\n   :no-value:\n"


def _api_pages() -> list[str]:
  out = DOCS / "api"
  written = []
  for modname, summary in API_MODULES.items():
    page = out / f"{modname}.md"
    try:
      module = importlib.import_module(modname)
    except ImportError:
      if page.exists():
        page.unlink()
      continue
    names = [n for n in getattr(module, "__all__", []) if not inspect.ismodule(getattr(module, n))]
    body = "\n".join(_directive(module, n) for n in names)
    table = "\n".join(f"   {n}" for n in names)
    _write_if_changed(
      page,
      f"# `{modname}`\n\n{summary}\n\n```{{eval-rst}}\n.. currentmodule:: {modname}\n\n"
      f".. automodule:: {modname}\n   :no-members:\n\n.. autosummary::\n\n{table}\n\n"
      f"{body}```\n",
    )
    written.append(modname)
  for stale in out.glob("*.md"):
    if stale.stem != "index" and stale.stem not in written:
      stale.unlink()
  return written


_copy_tutorials()
_api_pages()
