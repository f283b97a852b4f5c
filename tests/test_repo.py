"""Repository invariants: the README's commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md must start with a bash block of set-up commands"
  return [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_starts_with_demo_and_test_commands():
  demo, tests = _readme_commands()[:2]
  assert "mixflow_optax.bench" in demo and "pip install" in demo
  assert "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command():
  tests_cmd = _readme_commands()[1]
  pytest_cmd = tests_cmd[tests_cmd.index("python -m pytest") :]
  ci = (ROOT / ".ci" / "run").read_text()
  ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip().startswith("python -m pytest")]
  assert ci_cmds == [pytest_cmd], (ci_cmds, pytest_cmd)
  assert '-e ".[test]"' in ci and "python3 -m venv" in ci


def test_readme_runnable_example():
  text = (ROOT / "README.md").read_text()
  blocks = [
    b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Runnable example" in b
  ]
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  import jax.numpy as jnp

  leaves = [namespace["meta_grads"]["logits"], namespace["meta_grads"]["log_lr"]]
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert float(jnp.max(jnp.abs(namespace["meta_grads"]["logits"]))) > 0
  # The outer step moved the meta-parameters.
  assert float(namespace["meta"]["log_lr"]) != float(jnp.log(1e-2))
