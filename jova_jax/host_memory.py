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

JOVA_KEEP_MALLOC=1 runs with the environment as given; a GLIBC_TUNABLES that already sets
glibc.malloc.hugetlb is kept as it is.
"""
from __future__ import annotations

import os
import pkgutil
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
# On CPU-only hosts: serve every request from the one main-arena heap and never give it back.
_KEEP_FREED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
               "glibc.malloc.trim_threshold=4294967295")
OPT_OUT = "JOVA_KEEP_MALLOC"
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


def malloc_environment(environ, cpu_only: bool) -> dict | None:
  """The environment to re-execute with, or None when this one needs no change."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get(OPT_OUT) or HUGE_PAGES in tunables:
    return None
  added = [f"{HUGE_PAGES}=1", *(_KEEP_FREED if cpu_only else ())]
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, *added])))


def use_malloc_tunables() -> None:
  """Re-executes this process with the tunables added (returns only when nothing needs to
  change)."""
  env = malloc_environment(os.environ, cpu_only_host(os.environ))
  if env is None or sys.platform != "linux" or not glibc() or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
