"""Tests run on CPU with 8 fake devices; the flag must be set before jax is imported."""
import glob
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
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


def truncate_array_files(step_dir) -> list[str]:
  """Cuts every array data file of a checkpoint step (Orbax OCDBT: state/ocdbt.process_*/d/*)
  to half its size, as a disk filling up mid-write would; returns their paths."""
  paths = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  assert paths, f"no array files under {step_dir}"
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return paths
