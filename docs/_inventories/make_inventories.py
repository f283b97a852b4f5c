r"""Writes the Sphinx inventories of JAX, Optax and Flax that ``docs/conf.py`` links against offline.

The documentation build has no network, so ``intersphinx`` cannot download
the projects' ``objects.inv``. This script writes small inventories instead,
from the installed packages, for the names the documentation mentions:

1. it collects every dotted ``jax.*``, ``optax.*`` and ``flax.*`` name in the
   docstrings of ``mixflow_optax`` and in the pages of ``docs/``;
2. it keeps those that resolve to an object of the installed package (so a
   renamed or removed name drops out instead of linking to a missing page),
   and adds the name under which autodoc writes the object in type hints
   (``optax._src.base.GradientTransformation``, ``jaxlib._jax.Array``) as an
   alias of the same page;
3. it maps each to the page the project's documentation gives it (the URL
   patterns below, checked against the projects' ``docs/`` sources: jax at
   its commit of 2026-08-08, optax of 2026-08-07, flax of 2026-07-02).

Run it from the repository root after adding a reference to a new name, and
commit the ``.inv`` files::

  python docs/_inventories/make_inventories.py

Names that the projects do not document on a page of their own are in
``NO_PAGE`` (they stay plain text); a new name on a page of another pattern
needs a rule in ``_jax_uri`` / ``_optax_uri`` / ``FLAX_PAGES``.

The files are in Sphinx's inventory format, version 2: four header lines,
then zlib-compressed lines ``name domain:role priority uri display-name``,
where a ``uri`` ending in ``$`` stands for the URI followed by the name.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import sys
import types
import zlib
from collections.abc import Iterable

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = ("mixflow_optax/**/*.py", "docs/**/*.md", "docs/*.py")
NAME = re.compile(r"\b(?:jax|optax|flax)(?:\.[A-Za-z_][A-Za-z0-9_]*)+")

#: Modules whose members have one page each, ``_autosummary/<name>.html``, in
#: the JAX documentation (``.. autosummary:: :toctree: _autosummary``).
JAX_AUTOSUMMARY_MODULES = (
  "jax",
  "jax.ad_checkpoint",
  "jax.checkpoint_policies",
  "jax.distributed",
  "jax.dtypes",
  "jax.experimental.checkify",
  "jax.extend.core",
  "jax.flatten_util",
  "jax.lax",
  "jax.nn",
  "jax.numpy",
  "jax.random",
  "jax.sharding",
  "jax.tree",
  "jax.tree_util",
  "jax.typing",
)

#: Flax pages: name -> (site, URI). NNX is documented on flax.readthedocs.io,
#: Linen on flax-linen.readthedocs.io.
FLAX_PAGES = {
  "flax.nnx.Optimizer": (
    "flax",
    "api_reference/flax.nnx/training/optimizer.html#flax.nnx.optimizer.Optimizer",
  ),
  "flax.nnx.MultiHeadAttention": ("flax", "api_reference/flax.nnx/nn/attention.html#$"),
  "flax.linen.MultiHeadDotProductAttention": (
    "flax_linen",
    "api_reference/flax.linen/layers.html#$",
  ),
}

#: Optax names documented under another public name (its page is that name's).
OPTAX_DOCUMENTED_AS = {
  "optax.Schedule": "optax.schedules.Schedule",
  "optax.inject_hyperparams": "optax.schedules.inject_hyperparams",
  "optax.l2_loss": "optax.losses.l2_loss",
  "optax.tree.full_like": "optax.tree_utils.tree_full_like",
  "optax.tree.norm": "optax.tree_utils.tree_norm",
  "optax.tree.zeros_like": "optax.tree_utils.tree_zeros_like",
}

#: Names autodoc writes from the type hints of optax's own classes (inherited
#: fields), which the sources do not spell out.
OPTAX_TYPE_HINTS = ("optax.TransformInitFn", "optax.TransformUpdateExtraArgsFn")

#: Standard-library types of the library's type hints (the ``python`` inventory).
PYTHON_PAGES = {
  f"collections.abc.{name}": "library/collections.abc.html#$"
  for name in ("Callable", "Iterable", "Mapping", "Sequence")
}

#: Names the projects do not document on a page of their own.
NO_PAGE = {
  "jax.experimental.shard_alike",
  "jax.sharding.reshard",
  "optax.ScalarOrSchedule",
  "optax.contrib.scale_by_shape",
  "optax.MaskedNode",
  "optax.tree.cast_like",
  "optax.tree.bias_correction",
  "optax.transforms.PartitionState",
  "jax.custom_derivatives",
  "jax.extend.core.Jaxpr",
  "jax.core.Tracer",
  "jax.config.update",
  "jax.inv",
  "jax.dev",
}


def referenced_names(root: pathlib.Path = ROOT) -> set[str]:
  """Every dotted jax/optax/flax name in the sources of the documentation."""
  names = set()
  for pattern in SOURCES:
    for path in root.glob(pattern):
      if "_build" in path.parts or "_autosummary" in path.parts:
        continue
      names.update(NAME.findall(path.read_text(encoding="utf-8")))
  return names


def resolve(name: str) -> object | None:
  """The installed object called ``name``, or ``None``."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return None
    return obj
  return None


def roles(obj: object) -> tuple[str, ...]:
  """The Python-domain object types of ``obj`` (aliases used as types also as classes)."""
  if isinstance(obj, types.ModuleType):
    return ("py:module",)
  if inspect.isclass(obj):
    return ("py:exception",) if issubclass(obj, BaseException) else ("py:class",)
  if callable(obj) and not _is_type_alias(obj):
    return ("py:function",)
  return ("py:data", "py:class")


def _is_type_alias(obj: object) -> bool:
  return type(obj).__module__ in ("typing", "types") or hasattr(obj, "__origin__")


def aliases(name: str, obj: object) -> set[str]:
  """Other names autodoc may write for ``obj`` in type hints (its defining module's)."""
  out = set()
  if inspect.isclass(obj) or inspect.isfunction(obj):
    out.add(f"{obj.__module__}.{obj.__qualname__}")
  try:
    from sphinx.util.typing import stringify_annotation

    out.add(stringify_annotation(obj, "fully-qualified"))
  except Exception:  # noqa: BLE001 - an object sphinx cannot name adds no alias
    pass
  return {a for a in out if a != name and re.fullmatch(r"[\w.]+", a)}


def _jax_uri(name: str, obj: object) -> str | None:
  if isinstance(obj, types.ModuleType):
    return f"{name}.html#module-{name}"
  if name.startswith("jax.errors."):
    return "errors.html#$"
  if name.rsplit(".", 1)[0] in JAX_AUTOSUMMARY_MODULES:
    return f"_autosummary/{name}.html#$"
  return None


def _optax_uri(name: str, obj: object) -> str | None:
  # Every public symbol has a page of its own, api/generated/<name>.html
  # (optax's docs/api/*.rst: ".. autosummary:: :toctree: generated/").
  if isinstance(obj, types.ModuleType):
    return None
  if name in OPTAX_DOCUMENTED_AS:
    page = OPTAX_DOCUMENTED_AS[name]
    return f"api/generated/{page}.html#{page}"
  return f"api/generated/{name}.html#$"


def entries(names: Iterable[str]) -> dict[str, list[tuple[str, str, str]]]:
  """Inventory lines, by inventory: ``(name, role, uri)``."""
  out: dict[str, list[tuple[str, str, str]]] = {
    "jax": [],
    "optax": [],
    "flax": [],
    "flax_linen": [],
    "python": [(name, "py:class", uri) for name, uri in PYTHON_PAGES.items()],
  }
  for name in sorted({*names, *OPTAX_TYPE_HINTS}):
    obj = resolve(name)
    private = any(part.startswith("_") for part in name.split("."))
    if obj is None or private or name in NO_PAGE:
      continue
    package = name.split(".")[0]
    if package == "flax":
      if name not in FLAX_PAGES:
        continue
      inventory, uri = FLAX_PAGES[name]
    else:
      inventory = package
      uri = (_jax_uri if package == "jax" else _optax_uri)(name, obj)
      if uri is None:
        continue
    for role in roles(obj):
      out[inventory].append((name, role, uri))
      target = uri.replace("$", name) if uri.endswith("$") else uri
      for alias in sorted(aliases(name, obj)):
        out[inventory].append((alias, role, target))
  return out


def write(path: pathlib.Path, project: str, version: str, lines: list[tuple[str, str, str]]):
  header = (
    "# Sphinx inventory version 2\n"
    f"# Project: {project}\n"
    f"# Version: {version}\n"
    "# The remainder of this file is compressed using zlib.\n"
  )
  body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(set(lines)))
  path.write_bytes(header.encode() + zlib.compress(body.encode(), 9))


def main() -> int:
  sys.path.insert(0, str(ROOT))
  by_inventory = entries(referenced_names())
  for inventory, lines in by_inventory.items():
    package = sys if inventory == "python" else importlib.import_module(inventory.split("_")[0])
    version = getattr(package, "__version__", f"{sys.version_info[0]}.{sys.version_info[1]}")
    write(HERE / f"{inventory}.inv", inventory, version, lines)
    print(f"{inventory}.inv: {len(lines)} entries")
  return 0


if __name__ == "__main__":
  sys.exit(main())
