"""Tests run on CPU with 8 fake devices; the flag must be set before jax is imported."""
import glob
import os
import subprocess
import sys
import tempfile

FAKE_DEVICES = 8
# XLA CPU aborts the process when a collective's threads have not all met within its timeout.
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={FAKE_DEVICES}",
    PATIENT_COLLECTIVES]))
# XLA CPU runs the fake devices' programs on one thread pool of max(cores, devices) threads. A
# collective blocks its thread until every device arrives, and independent collectives (an
# all-to-all beside a while loop that permutes) may start in different orders on different
# devices: with one thread per device, every thread can end up waiting on a device that waits
# for it. That deadlock hung a context-parallel test in CI, with two collectives in flight per
# device. Two threads per device and one spare let each device start its other collective. Not
# more: idle pool threads spin, and at 4 per device the multi-device tests ran 5x slower on 2
# cores (docs/design.md). Read when jax's CPU client starts, so set here (and in the launcher,
# launch/local_multiprocess.sh, for its processes).
os.environ.setdefault("PJRT_NPROC", str(max(2 * FAKE_DEVICES + 1, os.cpu_count() or 1)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests (and the training subprocesses they start) compile the same tiny programs many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jova_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
  return REPO


def load(name):
  """Loads configs/<name>.py."""
  from jova_jax import config_lib
  return config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"))


def assert_falls_back_without_a_compiler(code: str, tmp_path, printed: str, warning: str) -> None:
  """Runs `code` in a fresh Python where the C++ compiler is missing and no kernel is cached
  (kernels/cpu_build.py): it must print `printed` and warn `warning`, naming the compiler."""
  env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), JOVA_JAX_CACHE_DIR=str(tmp_path),
             PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert printed in done.stdout, done.stderr
  assert warning in done.stderr
  assert "no-such-c++" in done.stderr


def truncate_array_files(step_dir) -> list[str]:
  """Cuts every array data file of a checkpoint step (Orbax OCDBT: state/ocdbt.process_*/d/*)
  to half its size, as a disk filling up mid-write would; returns their paths."""
  paths = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  assert paths, f"no array files under {step_dir}"
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return paths


def two_processes(cmd, port: int, devices: int = 2,
                  keys=("JOVA_COORDINATOR", "JOVA_NUM_PROCESSES", "JOVA_PROCESS_ID")):
  """Starts cmd as processes 0 and 1 of one job (env start-up through `keys`: coordinator,
  count, id; `devices` CPU devices each); returns the Popen objects (stdout has stderr too)."""
  coordinator, count, index = keys
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOVA_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                        "TPU_WORKER_HOSTNAMES")}
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                             + PATIENT_COLLECTIVES,
                coordinator: f"127.0.0.1:{port}", count: "2", index: str(pid)})
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs
