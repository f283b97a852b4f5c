"""Repository invariants: the README's commands are the ones CI runs, its code runs, and the
documentation's code blocks run as they stand or say what they assume."""

import pathlib
import re

import helpers
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Pages whose ```python blocks are executed, in order, one namespace per page. A block that
# starts with "# Assumes" depends on names it does not define and is only compiled.
DOC_PAGES = [
  "docs/index.md",
  "docs/when_mixflow_helps.md",
  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "guide").glob("*.md")),
]


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md must start with a bash block of set-up commands"
  return [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]


# The public modules, each with the API-reference pages that list its names.
API_MODULES = ("mixflow_optax", "mixflow_optax.transforms", "mixflow_optax.nn")


def _api_reference():
  """``{module: {name: [page, ...]}}`` of the autosummary lists of docs/api/*.md."""
  listed = {m: {} for m in API_MODULES}
  for page in sorted((ROOT / "docs" / "api").glob("*.md")):
    module, in_list = None, False
    for line in page.read_text().splitlines():
      if m := re.match(r"\.\. currentmodule:: (\S+)", line.strip()):
        module = m.group(1)
      elif re.match(r"\.\. autosummary::", line.strip()):
        in_list = True
      elif in_list and re.fullmatch(r"   \w+", line):
        listed.setdefault(module, {}).setdefault(line.strip(), []).append(page.name)
      elif in_list and not line.strip().startswith(":") and line.strip():
        in_list = False
  return listed


def _pages_of(listed, module):
  """The pages that list names of ``module``, with their titles."""
  pages = sorted({p for ps in listed.get(module, {}).values() for p in ps})
  titles = {p: (ROOT / "docs" / "api" / p).read_text().splitlines()[0].lstrip("# ") for p in pages}
  return ", ".join(f"{p} ({titles[p]})" for p in pages)


def _documented_args(doc):
  """The argument names of the ``Args:`` section of a Google-style docstring."""
  section = re.search(r"^Args:\n((?:(?: {2}.*)?\n)*)", doc + "\n", flags=re.M)
  return set(re.findall(r"^ {2}\*{0,2}(\w+):", section.group(1), flags=re.M)) if section else set()


def _python_blocks(path):
  return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), flags=re.S)


class RepoTest(helpers.TestCase):
  def test_api_reference_lists_every_public_name_once(self):
    import importlib
    import inspect

    listed = _api_reference()
    for modname in API_MODULES:
      module = importlib.import_module(modname)
      public = {n for n in module.__all__ if not inspect.ismodule(getattr(module, n))}
      for name in sorted(public - set(listed[modname])):
        self.fail(
          f"{modname}.{name} is in __all__ but not in the API reference: add it to the "
          f"autosummary list (after '.. currentmodule:: {modname}') of the page of its group "
          f"in docs/api/: {_pages_of(listed, modname)} (or a new page, added to the toctree of "
          "docs/api/index.md)."
        )
      for name, pages in sorted(listed[modname].items()):
        self.assertIn(name, public, f"{modname}.{name} is in {pages} but not in __all__")
        self.assertLen(pages, 1, f"{modname}.{name} is listed more than once: {pages}")
    self.assertEqual(set(listed), set(API_MODULES), "docs/api/ documents an unknown module")

  def test_public_functions_document_every_argument(self):
    import importlib
    import inspect

    for modname in API_MODULES:
      module = importlib.import_module(modname)
      for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or not callable(obj):
          continue
        args = set(inspect.signature(obj).parameters)
        missing = sorted(args - _documented_args(inspect.getdoc(obj) or ""))
        self.assertEqual(missing, [], f"{modname}.{name}: no Args: entry for {missing}")

  def test_docs_inventories_cover_the_referenced_names(self):
    import importlib.util
    import zlib

    path = ROOT / "docs" / "_inventories" / "make_inventories.py"
    spec = importlib.util.spec_from_file_location("make_inventories", path)
    make_inventories = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_inventories)
    committed = set()
    for inv in path.parent.glob("*.inv"):
      body = zlib.decompress(inv.read_bytes().split(b"\n", 4)[4]).decode()
      committed |= {tuple(line.split(" ")[:2]) for line in body.splitlines()}
    referenced = make_inventories.referenced_names()
    for inventory, lines in make_inventories.entries(referenced).items():
      public = {(name, role) for name, role, _ in lines if name in referenced}
      missing = sorted(public - committed)
      self.assertEqual(
        missing, [], f"run python docs/_inventories/make_inventories.py and commit {inventory}.inv"
      )

  def test_readme_starts_with_benchmark_and_test_commands(self):
    demo, tests = _readme_commands()[:2]
    self.assertIn("python -m benchmarks", demo)
    self.assertIn('pip install -e ".[bench]"', demo)
    self.assertIn("python -m pytest", tests)
    self.assertIn('pip install -e ".[test]"', tests)

  def test_ci_runs_the_readme_test_command(self):
    tests_cmd = _readme_commands()[1]
    pytest_cmd = tests_cmd[tests_cmd.index("python -m pytest") :]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip().startswith("python -m pytest")]
    self.assertEqual(ci_cmds, [pytest_cmd])
    self.assertIn('-e ".[test]"', ci)
    self.assertIn("python3 -m venv", ci)

  def test_ci_checks_format_lint_and_docs(self):
    ci = (ROOT / ".ci" / "run").read_text()
    self.assertIn("ruff format --check .", ci)
    self.assertIn("ruff check .", ci)
    self.assertRegex(ci, r"sphinx-build -n -W --keep-going .*docs docs/_build/html")

  def test_runtime_dependencies_are_what_the_library_imports(self):
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.S | re.M).group(1)
    names = sorted(re.findall(r'"([A-Za-z0-9_.-]+)', deps))
    self.assertEqual(names, ["jax", "numpy", "optax"])
    self.assertNotIn("[project.scripts]", text)

  def test_version_is_written_once(self):
    # mixflow_optax.__version__ is the only definition; the package metadata reads it.
    text = (ROOT / "pyproject.toml").read_text()
    self.assertRegex(text, r'(?m)^dynamic = \[.*"version".*\]')
    self.assertRegex(text, r'(?m)^version = \{ attr = "mixflow_optax.__version__" \}')
    self.assertNotRegex(text, r'(?m)^version = "')
    init = (ROOT / "mixflow_optax" / "__init__.py").read_text()
    self.assertRegex(init, r'(?m)^__version__ = "[0-9][^"]*"$')

  def test_fast_compile_flags_are_restorable(self):
    # helpers.DEFAULT_XLA_OPTIONS must undo every flag the root conftest.py sets for speed.
    conftest = (ROOT / "conftest.py").read_text()
    flags = dict(re.findall(r"--(xla_\w+)=(\w+)", conftest))
    self.assertTrue(flags)
    self.assertEqual(set(flags), set(helpers.DEFAULT_XLA_OPTIONS))

  def test_user_xla_flags_drop_only_the_fast_compile_flags(self):
    flags = "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
    flags += " --xla_backend_optimization_level=0"
    self.assertEqual(helpers.user_xla_flags(flags), "--xla_force_host_platform_device_count=8")
    self.assertEqual(helpers.user_xla_flags(""), "")

  def test_readme_runnable_example(self):
    blocks = [b for b in _python_blocks("README.md") if "Runnable example" in b]
    self.assertLen(blocks, 1)
    self.assertLessEqual(len(blocks[0].strip().splitlines()), 30)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    leaves = [namespace["meta_grads"]["logits"], namespace["meta_grads"]["log_lr"]]
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(x))) for x in leaves))
    self.assertGreater(float(jnp.max(jnp.abs(namespace["meta_grads"]["logits"]))), 0)
    # The outer step moved the meta-parameters.
    self.assertNotEqual(float(namespace["meta"]["log_lr"]), float(jnp.log(1e-2)))

  def test_readme_python_blocks_run_or_state_assumptions(self):
    for block in _python_blocks("README.md"):
      self.assertTrue("Runnable example" in block or block.startswith("# Assumes"), block[:80])

  def test_documentation_code_blocks(self):
    for page in DOC_PAGES:
      namespace = {}
      for i, block in enumerate(_python_blocks(page)):
        with self.subTest(page=page, block=i):
          code = compile(block, f"{page} block {i}", "exec")
          if not block.startswith("# Assumes"):
            exec(code, namespace)  # noqa: S102
