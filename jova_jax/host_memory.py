"""Large host buffers on transparent huge pages, and on CPU-only hosts kept between steps: every
`python -m` entry point runs with glibc malloc tunables (cli.run calls `use_malloc_tunables`
first).

Why: XLA's CPU runtime mallocs each execution's temporary buffer, and glibc serves a request
that large (over 32 MiB) with a fresh mmap, returned by munmap when the step ends. The demo's
train step has 437 MiB of temporaries: every step the kernel faulted in and zeroed ~114k pages
of 4 KiB, ~250 ms of kernel time per step on the 2-core CPU, about a third of the step. With
the tunable glibc asks for transparent huge pages (madvise) and the same memory takes ~500
faults (docs/performance.md, third round). Zeroing those huge pages every step still cost up to
~1.5 s of kernel time in some steps (often when torch shared the process). On a host with no
accelerator plugin, where XLA's temporaries are the big buffers, malloc also keeps freed memory
for the next step: one arena (thread arenas mmap large requests whatever the limit), no mmap,
no trimming. Not on accelerator hosts: there host buffers (checkpoints) should go back to the
system. glibc reads tunables only when a process starts, so the entry point re-executes itself
once, same pid and command line, with the tunables added.

On CPU-only hosts with mimalloc installed (requirements-nodeps.txt: cmeel-mimalloc), the process
runs on mimalloc instead (LD_PRELOAD), told to keep what is freed (MIMALLOC_PURGE_DELAY=-1).
With the glibc tunables every request comes from one arena's bins: XLA's fusions and matmuls
malloc scratch buffers on both threads each step, and glibc's search through those bins took
3.7% of the step's CPU time. The demo train step is 0.85-0.94x as long on mimalloc
(docs/performance.md, twelfth round). Where mimalloc is missing, the glibc tunables above.

JOVA_KEEP_MALLOC=1 runs with the environment as given; a GLIBC_TUNABLES that already sets
glibc.malloc.hugetlb, or an LD_PRELOAD that already names mimalloc, is kept as it is.
"""
from __future__ import annotations

import importlib.metadata
import os
import pkgutil
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
# On CPU-only hosts: serve every request from the one main-arena heap and never give it back.
_KEEP_FREED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
               "glibc.malloc.trim_threshold=4294967295")
OPT_OUT = "JOVA_KEEP_MALLOC"
_MIMALLOC_PACKAGE = "cmeel-mimalloc"
_MIMALLOC_LIBRARY = "cmeel.prefix/lib/libmimalloc.so.3"
# Freed memory stays with the process, as _KEEP_FREED has glibc do: no page faults next step.
_MIMALLOC_OPTIONS = (("MIMALLOC_PURGE_DELAY", "-1"),)
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda", "jax_rocm")


def cpu_only_host(environ) -> bool:
  """JAX will run on the CPU: JAX_PLATFORMS says only cpu, or no TPU/GPU plugin is installed."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  return not any(m.name.startswith(_ACCELERATOR_PLUGINS) for m in pkgutil.iter_modules())


def glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError):  # not a glibc system (macOS, musl)
    return False


def mimalloc_library() -> str | None:
  """Path of the installed cmeel-mimalloc's shared library, or None."""
  try:
    distribution = importlib.metadata.distribution(_MIMALLOC_PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    return None
  path = distribution.locate_file(_MIMALLOC_LIBRARY)
  return str(path) if os.path.isfile(path) else None


def _preloads_mimalloc(environ) -> bool:
  return "mimalloc" in environ.get("LD_PRELOAD", "")


def malloc_environment(environ, cpu_only: bool, mimalloc: str | None = None) -> dict | None:
  """The environment to re-execute with, or None when this one needs no change. `mimalloc`: the
  library to preload on a CPU-only host, where installed."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  preloaded = environ.get("LD_PRELOAD", "")
  if environ.get(OPT_OUT) or HUGE_PAGES in tunables or _preloads_mimalloc(environ):
    return None
  if cpu_only and mimalloc and not preloaded:  # a library the user preloads may be their allocator
    return dict(environ, LD_PRELOAD=mimalloc,
                **{name: value for name, value in _MIMALLOC_OPTIONS if name not in environ})
  added = [f"{HUGE_PAGES}=1", *(_KEEP_FREED if cpu_only else ())]
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, *added])))


def allocator(environ) -> str:
  """How this process allocates, for benchmark reports."""
  if _preloads_mimalloc(environ):
    return "mimalloc (" + ", ".join(f"{name}={environ.get(name, 'unset')}"
                                    for name, _ in _MIMALLOC_OPTIONS) + ")"
  return f"glibc, GLIBC_TUNABLES={environ.get('GLIBC_TUNABLES', 'unset')}"


def use_malloc_tunables() -> None:
  """Re-executes this process with mimalloc or the glibc tunables (returns only when nothing
  needs to change)."""
  cpu_only = cpu_only_host(os.environ)
  env = malloc_environment(os.environ, cpu_only, mimalloc_library() if cpu_only else None)
  if env is None or sys.platform != "linux" or not glibc() or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
