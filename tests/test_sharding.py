"""Meta-gradients under jax.sharding: 8 simulated CPU devices against one.

The checks live in ``tests/sharding_check.py``, run in a subprocess: this
process's JAX backend already has one device, and the device count is fixed
when the backend starts. The subprocess keeps this process's ``XLA_FLAGS``
(the fast-compile options of the root conftest.py), adds
``--xla_force_host_platform_device_count=8`` and imports this checkout's
``mixflow_optax`` (the repository root first on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import helpers
from absl.testing import absltest

CHECK = pathlib.Path(__file__).resolve().parent / "sharding_check.py"
ROOT = CHECK.parents[1]
NUM_DEVICES = 8


def _run_check() -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
  # The subprocess imports this checkout's mixflow_optax, not an installed copy.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
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


class ShardingTest(helpers.TestCase):
  def test_sharded_meta_gradients_match_single_device_and_memory_falls(self):
    # One test for the one subprocess, so that `pytest -n auto` does not repeat it per worker.
    summary = _run_check()
    self.assertEqual(summary["failures"], [])
    self.assertEqual(summary["returncode"], 0)
    self.assertEqual(summary["devices"], NUM_DEVICES)
    cases = summary["cases"]
    self.assertEqual(
      set(cases),
      {
        "unroll_grad/mixflow",
        "unroll_grad/standard",
        "unroll_forward/mixflow",
        "meta_step/mixflow",
        "meta_step/standard",
        "meta_step/maml",
        "unroll_grad/explicit_axes",
      },
    )
    for name, r in cases.items():
      with self.subTest(name):
        # float64: the sharded program differs from the single-device one only in
        # the order of its reductions.
        self.assertLess(r["max_rel_err"], 1e-10)
        # Meta-gradients, params_T / opt_state_T and the meta-optimizer state
        # come back with the shardings of the inputs, with no out_shardings.
        self.assertEqual(r["sharding_mismatches"], [])
    for name in (
      "unroll_grad/mixflow",
      "unroll_grad/standard",
      "meta_step/mixflow",
      "meta_step/maml",
    ):
      with self.subTest(name):
        r = cases[name]
        # Parameters dominate this problem, so sharding them over 8 devices cuts
        # every per-device figure to about 1/8.
        for kind in ("temp", "argument", "output"):
          self.assertLess(r["memory_ratio"][kind], 0.5, (kind, r["memory_ratio"]))
          self.assertLess(r["memory_per_device"][kind], r["memory_single"][kind])
        # The inner carries stored for the backward pass stay sharded: one device
        # stores T stacked copies of the 256x256 weight, the mesh none.
        self.assertGreater(r["hlo"]["single_full_stacks"], 0, r["hlo"])
        self.assertEqual(r["hlo"]["sharded_full_stacks"], 0, r["hlo"])
    # MAML re-initialises the inner optimizer state at every step. Jitted
    # without out_shardings, the state still follows the parameters' sharding:
    # the natural code needs no more output memory than the one that pins
    # every output's sharding.
    maml = cases["meta_step/maml"]
    self.assertEqual(maml["natural_changed_leaves"], 0)
    self.assertLess(
      maml["memory_per_device"]["output"],
      1.05 * maml["with_out_shardings"]["memory_per_device"]["output"],
    )
    # Static memory (T x (params + Adam's two moments + saved gradients)) is
    # most of the single-device program's temporaries.
    single_temp = cases["unroll_grad/mixflow"]["memory_single"]["temp"]
    self.assertGreater(summary["static_bytes_estimate"], 0.5 * single_temp)


if __name__ == "__main__":
  absltest.main()
