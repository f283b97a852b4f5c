"""Two JAX processes on loopback, against one process: the multi-host path for real.

``tests/multiprocess_worker.py`` runs ``examples/distributed_meta_learning.py``
in each of two processes with two CPU devices each (``jax.distributed`` on a
loopback coordinator, gloo collectives): batches handed over per process
(``jax.make_array_from_process_local_data``), parameters and every state
FSDP-sharded over the four devices of both processes, three meta-optimizer
steps, then the exact meta-gradients at the final state. This process runs the
same example on one device meanwhile; the results must agree in float64.

Every wait has a deadline: the coordinator join and the heartbeat of
``jax.distributed`` have short timeouts, the harness polls both processes and,
as soon as one exits with an error or the deadline passes, kills the other and
fails with both logs.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import chex
import helpers
import multiprocess_worker
import numpy as np
from absl.testing import absltest

WORKER = pathlib.Path(multiprocess_worker.__file__).resolve()
ROOT = WORKER.parents[1]
# Tiny on purpose: 4 devices split the width, the batch and the parameters.
EXAMPLE_ARGV = ("--steps", "3", "--T", "3", "--batch", "8", "--width", "32", "--depth", "2")
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
DEADLINE = 240.0  # seconds; a normal run takes ~20 s
# float64, relative to each leaf's largest entry (measured: 8e-16; the reduction order differs).
RTOL = 1e-12


class ProcessFailure(AssertionError):
  """A worker process exited with an error or missed the deadline."""


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(
  out: pathlib.Path,
  *,
  extra_args: Sequence[Sequence[str]] = ((), ()),
  deadline: float = DEADLINE,
) -> None:
  """Starts the workers and waits for all of them; kills the rest when one fails."""
  port = _free_port()
  env = dict(os.environ)
  # The workers import this checkout's mixflow_optax, not an installed copy.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  logs, procs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = tempfile.TemporaryFile(mode="w+")
      cmd = [
        sys.executable,
        str(WORKER),
        f"--process-id={i}",
        f"--num-processes={NUM_PROCESSES}",
        f"--port={port}",
        f"--local-devices={LOCAL_DEVICES}",
        f"--out={out}",
        *extra_args[i],
        "--",
        *EXAMPLE_ARGV,
      ]
      logs.append(log)
      procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    end = time.monotonic() + deadline
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed or time.monotonic() > end:
        reason = (
          f"process {failed[0]} exited with status {codes[failed[0]]}"
          if failed
          else f"no result after {deadline:.0f} s"
        )
        raise ProcessFailure(f"{reason}; exit statuses {codes}.{_tails(logs)}")
      if all(c == 0 for c in codes):
        return
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for log in logs:
      log.close()


def _tails(logs: Sequence, lines: int = 15) -> str:
  out = []
  for i, log in enumerate(logs):
    log.seek(0)
    text = [line for line in log.read().splitlines() if not line.startswith("[Gloo]")]
    out.append(f"\n--- process {i} ---\n" + "\n".join(text[-lines:]))
  return "".join(out)


class MultiProcessTest(helpers.F64TestCase):
  def test_two_processes_match_one(self):
    out = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory())) / "result.npz"
    # The workers run in the background while this process computes the reference.
    errors = []

    def target():
      try:
        run_processes(out)
      except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
        errors.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    try:
      reference = multiprocess_worker.run_example(EXAMPLE_ARGV, grad_seed=1)
    finally:
      thread.join(DEADLINE + 60)
    if errors:
      raise errors[0]
    self.assertFalse(thread.is_alive(), "the harness did not return")

    got = dict(np.load(out))
    self.assertEqual(int(got.pop("processes")), NUM_PROCESSES)
    self.assertEqual(int(got.pop("devices")), NUM_PROCESSES * LOCAL_DEVICES)
    sharded_memory = {k: int(got.pop(k)) for k in list(got) if k.startswith("memory/")}
    want = multiprocess_worker.flatten(
      {"state": reference["state"], "meta_grads": reference["meta_grads"]}
    )
    self.assertEqual(sorted(got), sorted(want))
    for key, value in want.items():
      value = np.asarray(value)
      scale = max(float(np.max(np.abs(value))), 1e-300) if value.size else 1.0
      chex.assert_trees_all_close(got[key], value, rtol=0, atol=RTOL * scale, custom_message=key)
    # The meta-optimizer took three steps, and the meta-gradients are not trivial.
    self.assertEqual(int(got["['state'].count"]), 3)
    self.assertGreater(float(np.max(np.abs(got["['meta_grads'][0]['layer1']['w']"]))), 0.0)
    # Each device holds a quarter of the parameters and of the states.
    single = reference["memory"]["single"]
    self.assertLess(sharded_memory["memory/argument_bytes"], 0.5 * single.argument_bytes)

  def test_a_dead_process_fails_the_run_quickly(self):
    out = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory())) / "result.npz"
    start = time.monotonic()
    with self.assertRaisesRegex(ProcessFailure, "process 1 exited with status 3"):
      run_processes(out, extra_args=((), ("--exit-after-init",)), deadline=120.0)
    # Process 0 waits for its peer at the first collective; the harness kills it.
    self.assertLess(time.monotonic() - start, 60.0)
    self.assertFalse(out.exists())


if __name__ == "__main__":
  absltest.main()
