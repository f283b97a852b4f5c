"""Meta-gradients under jax.sharding: 8 simulated CPU devices against one.

The checks live in ``tests/sharding_check.py``, run in a subprocess: this
process's JAX backend already has one device, and the device count is fixed
when the backend starts. The subprocess keeps this process's ``XLA_FLAGS``
(the fast-compile options of the root conftest.py) and adds
``--xla_force_host_platform_device_count=8``.
"""

import json
import os
import pathlib
import subprocess
import sys

CHECK = pathlib.Path(__file__).resolve().parent / "sharding_check.py"
NUM_DEVICES = 8


def _run_check() -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
  proc = subprocess.run(
    [sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600
  )
  try:
    summary = json.loads(proc.stdout)
  except json.JSONDecodeError as err:
    raise AssertionError(
      f"sharding_check.py printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    ) from err
  summary["returncode"] = proc.returncode
  return summary


def test_sharded_meta_gradients_match_single_device_and_memory_falls():
  # One test for the one subprocess, so that `pytest -n auto` does not repeat it per worker.
  summary = _run_check()
  assert summary["failures"] == [], summary["failures"]
  assert summary["returncode"] == 0
  assert summary["devices"] == NUM_DEVICES
  cases = summary["cases"]
  assert set(cases) == {
    "unroll_grad/mixflow",
    "unroll_grad/standard",
    "unroll_forward/mixflow",
    "meta_step/mixflow",
    "meta_step/standard",
    "meta_step/maml",
    "unroll_grad/explicit_axes",
  }
  for name, r in cases.items():
    # float64: the sharded program differs from the single-device one only in
    # the order of its reductions.
    assert r["max_rel_err"] < 1e-10, (name, r["max_rel_err"])
    # Meta-gradients, params_T / opt_state_T and the meta-optimizer state come
    # back with the shardings of the inputs (or of out_shardings, for MAML).
    assert r["sharding_mismatches"] == [], (name, r["sharding_mismatches"])
  for name in (
    "unroll_grad/mixflow",
    "unroll_grad/standard",
    "meta_step/mixflow",
    "meta_step/maml",
  ):
    r = cases[name]
    # Parameters dominate this problem, so sharding them over 8 devices cuts
    # every per-device figure to about 1/8.
    for kind in ("temp", "argument", "output"):
      assert r["memory_ratio"][kind] < 0.5, (name, kind, r["memory_ratio"])
      assert r["memory_per_device"][kind] < r["memory_single"][kind]
    # The inner carries stored for the backward pass stay sharded: one device
    # stores T stacked copies of the 256x256 weight, the mesh none.
    assert r["hlo"]["single_full_stacks"] > 0, (name, r["hlo"])
    assert r["hlo"]["sharded_full_stacks"] == 0, (name, r["hlo"])
  # Static memory (T x (params + Adam's two moments + saved gradients)) is
  # most of the single-device program's temporaries.
  single_temp = cases["unroll_grad/mixflow"]["memory_single"]["temp"]
  assert summary["static_bytes_estimate"] > 0.5 * single_temp
