"""Large host buffers on transparent huge pages: every `python -m` entry point runs with glibc's
`glibc.malloc.hugetlb=1` tunable (cli.run calls `use_huge_page_malloc` first).

Why: XLA's CPU runtime mallocs each execution's temporary buffer, and glibc serves a request
that large (over 32 MiB) with a fresh mmap, returned by munmap when the step ends. The demo's
train step has 437 MiB of temporaries: every step the kernel faulted in and zeroed ~114k pages
of 4 KiB, ~250 ms of kernel time per step on the 2-core CPU, about a third of the step. With
the tunable glibc asks for transparent huge pages (madvise) and the same memory takes ~500
faults (docs/performance.md, third round). glibc reads tunables only when a process starts,
so the entry point re-executes itself once, same pid and command line, with the tunable added.

JOVA_KEEP_MALLOC=1 runs with the environment as given; a GLIBC_TUNABLES that already sets
glibc.malloc.hugetlb is kept as it is.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JOVA_KEEP_MALLOC"


def _glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError):  # not a glibc system (macOS, musl)
    return False


def huge_page_environment(environ) -> dict | None:
  """The environment to re-execute with, or None when this one needs no change."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get(OPT_OUT) or TUNABLE in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, f"{TUNABLE}=1"])))


def use_huge_page_malloc() -> None:
  """Re-executes this process with the tunable set (returns only when nothing needs to change)."""
  env = huge_page_environment(os.environ)
  if env is None or sys.platform != "linux" or not _glibc() or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
