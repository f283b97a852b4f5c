"""The tutorials in colabs/: stripped, well formed, listed in the README, and executed.

Every ``colabs/*.ipynb`` is picked up by the glob below, so a new tutorial is tested as soon as it
is added. Each one runs top to bottom with nbclient in a fresh IPython kernel, with its small
default ``# @param`` values, in a temporary working directory, under the XLA flags a user gets:
the kernel inherits this process's environment WITHOUT the fast-compile ``XLA_FLAGS`` that the
root conftest.py sets for the rest of the suite (they change compiled memory, and the notebooks
make memory claims), plus:

- ``MPLBACKEND=Agg``: plots are drawn but never shown;
- ``JAX_NUMPY_RANK_PROMOTION=raise``: the notebooks are held to the test suite's hardening;
- the checkout on ``PYTHONPATH``: the code under test is this repository's.

The notebooks ``assert`` their own claims (exactness, memory savings, learned behaviour), so an
executed notebook is a test. Their install cell runs only in Colab (``"google.colab" in
sys.modules``); the execution test checks that it ran and did nothing here.
"""

import json
import os
import pathlib
import re
import time
from unittest import mock

import helpers
import nbformat
from absl.testing import parameterized
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CASES = [(p.stem, p) for p in NOTEBOOKS]

COLAB_URL = "https://colab.research.google.com/github/mixflow-optax/mixflow_optax/blob/main/colabs/"
BADGE = "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
INSTALL = 'pip install -q "mixflow_optax @ git+https://github.com/mixflow-optax/mixflow_optax"'
GUARD = re.compile(r'^if "google\.colab" in sys\.modules:\n\s+%pip install ', re.M)

# Tutorials that must be present; any other notebook in colabs/ is tested too.
REQUIRED = {
  "quickstart.ipynb",
  "hyperparameter_tuning_nnx.ipynb",
  "loss_weighting.ipynb",
  "maml_sinusoid.ipynb",
  "scaling.ipynb",
  "optax_meta_learning.ipynb",
}

# Wall-clock limit for executing a whole notebook, in seconds. With their defaults the notebooks
# take 30 to 120 s each on 2 idle CPU cores under default XLA flags (up to 3x more on a busy
# machine).
DEFAULT_TIMEOUT_S = 420
# Notebooks that compile many programs get more.
TIMEOUT_S = {"scaling.ipynb": 600}

NOTEBOOK_METADATA = {"kernelspec", "language_info"}

_CHECK_FLAGS = (
  "import os\n"
  f"assert not set({sorted(helpers.DEFAULT_XLA_OPTIONS)}) & "
  "{f.split('=')[0].lstrip('-') for f in os.environ.get('XLA_FLAGS', '').split()}"
)


def _code(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _install_cells(nb):
  return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "pip install" in c.source]


class ColabsTest(helpers.TestCase):
  def test_required_tutorials_exist(self):
    missing = REQUIRED - {p.name for p in NOTEBOOKS}
    assert not missing, f"missing tutorials in colabs/: {sorted(missing)}"

  @parameterized.named_parameters(*CASES)
  def test_committed_without_outputs(self, path):
    raw = json.loads(path.read_text())
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
    extra = set(raw["metadata"]) - NOTEBOOK_METADATA
    assert not extra, f"notebook metadata beyond {sorted(NOTEBOOK_METADATA)}: {sorted(extra)}"
    for i, cell in enumerate(raw["cells"]):
      assert cell.get("metadata", {}) == {}, f"cell {i} has metadata {cell['metadata']}"
      if cell["cell_type"] == "code":
        assert cell["outputs"] == [], f"cell {i} has outputs: strip them before committing"
        assert cell["execution_count"] is None, f"cell {i} has an execution count"

  @parameterized.named_parameters(*CASES)
  def test_tutorial_structure(self, path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "start with an H1 title"
    assert BADGE.format(url=COLAB_URL + path.name) in first.source, "Open-in-Colab badge to itself"

    install = _install_cells(nb)
    assert len(install) == 1, "exactly one install cell"
    source = nb.cells[install[0]].source
    assert INSTALL in source and GUARD.search(source), "install only in Colab"

    # One imports cell: top-level imports appear in a single code cell (besides the install cell).
    importing = [
      c
      for c in _code(nb)
      if re.search(r"^(import|from) \w", c.source, re.M) and "pip install" not in c.source
    ]
    assert len(importing) == 1, f"{len(importing)} code cells with top-level imports, expected 1"
    assert "import mixflow_optax as mfo" in importing[0].source
    # The persistent compilation cache is on right after the imports, before anything compiles.
    after = nb.cells[nb.cells.index(importing[0]) + 1]
    assert after.cell_type == "code" and "jax_compilation_cache_dir" in after.source, (
      "the cell after the imports turns on JAX's persistent compilation cache"
    )

    assert any("# @param" in c.source for c in _code(nb)), "a `# @param` cell with small defaults"
    assert any("assert" in c.source for c in _code(nb)), "the notebook checks its claims"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("## Conclusion")

  @parameterized.named_parameters(*CASES)
  def test_listed_in_readme(self, path):
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Tutorials\n(.*?)^## ", readme, flags=re.S | re.M)
    assert match, "README.md needs a '## Tutorials' section"
    assert BADGE.format(url=COLAB_URL + path.name) in match.group(1)

  @parameterized.named_parameters(*CASES)
  def test_executes_top_to_bottom(self, path):
    nb = nbformat.read(path, as_version=4)
    tmp_path = self.create_tempdir().full_path
    pythonpath = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {
      "MPLBACKEND": "Agg",
      "JAX_NUMPY_RANK_PROMOTION": "raise",
      "PYTHONPATH": os.pathsep.join(pythonpath),
      # Default XLA flags, as users run the notebooks (the kernel is started with this environment).
      "XLA_FLAGS": helpers.user_xla_flags(),
    }
    self.enter_context(mock.patch.dict(os.environ, env))
    # Appended to the in-memory copy: the kernel ran with the user's XLA flags, not the suite's.
    nb.cells.append(nbformat.v4.new_code_cell(_CHECK_FLAGS))
    deadline = time.monotonic() + TIMEOUT_S.get(path.name, DEFAULT_TIMEOUT_S)
    client = NotebookClient(
      nb,
      kernel_name="python3",
      # nbclient's limits are per cell: give each cell what is left of the notebook's budget.
      timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
      resources={"metadata": {"path": tmp_path}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    (install,) = _install_cells(nb)
    assert nb.cells[install].execution_count is not None
    assert nb.cells[install].outputs == [], "the install cell must do nothing outside Colab"
