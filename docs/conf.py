"""Sphinx configuration of the mixflow_optax documentation.

Build: ``sphinx-build -n -W --keep-going -b html docs docs/_build/html`` (warnings are errors).

Two kinds of pages are generated here at build time, so that new content is picked up without
editing the site:

- ``tutorials/*.ipynb``: copies of the notebooks in ``colabs/`` (rendered, not executed: the
  test suite executes them);
- ``api/_autosummary/*.rst``: one page per public symbol, from the ``autosummary`` lists of the
  ``api/*.md`` pages, which group the symbols (``tests/test_repo.py`` checks that every name of
  ``__all__`` is on one of them).

Links to JAX, Optax and Flax resolve offline, through the inventories committed in
``_inventories/`` (``_inventories/make_inventories.py`` writes them).
"""

from __future__ import annotations

import importlib
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
  "sphinx.ext.intersphinx",
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
autosummary_generate = True
templates_path = ["_templates"]

# Offline: the inventories are generated from the installed packages and committed.
intersphinx_mapping = {
  "jax": ("https://docs.jax.dev/en/latest/", "_inventories/jax.inv"),
  "optax": ("https://optax.readthedocs.io/en/latest/", "_inventories/optax.inv"),
  "flax": ("https://flax.readthedocs.io/en/latest/", "_inventories/flax.inv"),
  "flax_linen": ("https://flax-linen.readthedocs.io/en/latest/", "_inventories/flax_linen.inv"),
  "python": ("https://docs.python.org/3/", "_inventories/python.inv"),
}
# Keep annotations as written (``jax.typing.ArrayLike``), not expanded into the Union they alias.
autodoc_type_aliases = {
  "jax.typing.ArrayLike": "jax.typing.ArrayLike",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
}
# Names in type hints with no page to link to: the library's private type aliases, and an optax
# alias that optax does not document on a page of its own.
nitpick_ignore = [
  ("py:class", name)
  for name in (
    "Fallback",
    "Hyperparams",
    "MaskOrFn",
    "MetaMode",
    "optax.ScalarOrSchedule",
    # No numpy inventory is committed; numpy's array type stays plain text.
    "numpy.ndarray",
  )
]

html_theme = "furo"
html_title = "mixflow_optax"

exclude_patterns = [
  "_build",
  "bench",
  "Thumbs.db",
  ".DS_Store",
  "**.ipynb_checkpoints",
]
suppress_warnings = ["myst.header"]


def _copy_tutorials() -> None:
  out = DOCS / "tutorials"
  for stale in out.glob("*.ipynb"):
    if not (ROOT / "colabs" / stale.name).exists():
      stale.unlink()
  for notebook in sorted((ROOT / "colabs").glob("*.ipynb")):
    target = out / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
      shutil.copyfile(notebook, target)


def _module_attribute_doc(app, what, name, obj, options, lines) -> None:
  """The ``#:`` comment of a re-exported constant instead of its type's docstring.

  autodoc reads ``#:`` comments in the module that documents the name
  (``mixflow_optax``), not in the private module that defines it; without
  this, ``mixflow_optax.INNER_GRAD_NAME`` would be documented by ``str``'s
  docstring.
  """
  if what != "data" or not name.startswith("mixflow_optax."):
    return
  from sphinx.pycode import ModuleAnalyzer

  attr = name.rsplit(".", 1)[1]
  for modname in sorted(m for m in sys.modules if m.startswith("mixflow_optax")):
    try:
      docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # noqa: BLE001 - modules without source (none expected)
      continue
    if ("", attr) in docs:
      lines[:] = list(docs[("", attr)])
      return


def _union_of_aliases_as_text() -> None:
  """``jax.typing.ArrayLike | None`` in type hints, not ``TypeAliasForwardRef(...) | None``.

  Sphinx (9.0) names a type alias of ``autodoc_type_aliases`` only where it is the whole
  annotation; in a union it prints the placeholder's repr. Writing the union as text instead
  lets the Python domain link each member.
  """
  from sphinx.util import inspect as sphinx_inspect
  from sphinx.util.typing import stringify_annotation

  ref = getattr(sphinx_inspect, "TypeAliasForwardRef", None)
  if ref is None:
    return

  def text(t) -> str:
    if isinstance(t, ref):
      return t.name
    return "None" if t is None or t is type(None) else stringify_annotation(t, "fully-qualified")

  ref.__or__ = lambda self, other: ref(f"{text(self)} | {text(other)}")
  ref.__ror__ = lambda self, other: ref(f"{text(other)} | {text(self)}")


def setup(app) -> dict:
  app.connect("autodoc-process-docstring", _module_attribute_doc)
  return {"parallel_read_safe": True}


_copy_tutorials()
_union_of_aliases_as_text()
