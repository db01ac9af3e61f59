"""Builds and registers this folder's C++ XLA FFI kernels: each is compiled on first use with the
system's C++ compiler, cached per source, headers, jaxlib, compiler, flags and CPU, and loaded once
per process. Where a kernel cannot be built its caller keeps XLA's version, with a warning that
says why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from absl import logging

HERE = pathlib.Path(__file__).parent
BASE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
LANES = 16  # kLanes in matmul_tiles.h: the floats of one vector the kernels' tiles work in


def one_cpu_device(dtype) -> bool:
  """Whether the program being traced is where this folder's kernels apply: a CPU backend, float32
  compute, one device (no mesh or a mesh of one). Several CPU devices are the test suite's fake
  devices, whose programs keep XLA's ops: an FFI call has no partitioning rule."""
  mesh = jax.sharding.get_abstract_mesh()
  return (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
          and (mesh.empty or mesh.size == 1))


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("JOVA_JAX_CACHE_DIR",
                                     pathlib.Path.home() / ".cache" / "jova_jax")) / "kernels"


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _cpu_flags() -> str:
  """What -march=native compiles for: a library built on one CPU must not load on another."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return ""


def build(source: pathlib.Path, flags: tuple[str, ...]) -> pathlib.Path:
  """The compiled library of `source` (a .cc in this folder), built once per key."""
  import jaxlib
  version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True,
                           check=True).stdout
  headers = [h.read_text() for h in sorted(HERE.glob("*.h"))]
  key = hashlib.sha256("\0".join([source.read_text(), *headers, jaxlib.__version__, version,
                                  " ".join(flags), platform.machine(), _cpu_flags()]).encode())
  target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target, then renamed: concurrent builders (test workers) never see half a file.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    done = subprocess.run([_compiler(), *flags, "-I", jax.ffi.include_dir(), "-I", str(HERE),
                           str(source), "-o", str(built)], capture_output=True, text=True)
    if done.returncode != 0:
      last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise RuntimeError(f"{_compiler()} {source.name} exited {done.returncode}: {last}")
    os.replace(built, target)
  logging.info("built %s", target)
  return target


def load(source: pathlib.Path, flags: tuple[str, ...], targets: dict[str, str], *, what: str,
         fallback: str) -> bool:
  """Builds `source` and registers its FFI targets (XLA name -> C symbol) for the CPU; False, with
  a warning naming `what` failed and `fallback`, what the caller uses instead, where it cannot."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build(source, flags)))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    logging.warning("%s unavailable, using %s: %s", what, fallback, e)
    return False
  for name, symbol in targets.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True
