"""host_memory: entry points re-execute once with mimalloc or the malloc tunables, and they take
effect."""
import os
import subprocess
import sys

import pytest

from jova_jax import host_memory

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_CPU_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                 "glibc.malloc.trim_threshold=4294967295")


def test_environment_adds_the_tunables_once_and_respects_the_user():
  env = host_memory.malloc_environment({"PATH": "/bin"}, cpu_only=False)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host_memory.malloc_environment({"PATH": "/bin"}, cpu_only=True)
  assert env["GLIBC_TUNABLES"] == _CPU_TUNABLES
  env = host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.rtld.x=1"}, cpu_only=False)
  assert env["GLIBC_TUNABLES"] == "glibc.rtld.x=1:glibc.malloc.hugetlb=1"
  for environ in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"JOVA_KEEP_MALLOC": "1"}):
    assert host_memory.malloc_environment(environ, cpu_only=True) is None


def test_environment_preloads_mimalloc_on_cpu_only_hosts_where_installed():
  lib = "/site/cmeel.prefix/lib/libmimalloc.so.3"
  env = host_memory.malloc_environment({"PATH": "/bin"}, cpu_only=True, mimalloc=lib)
  assert env == {"PATH": "/bin", "LD_PRELOAD": lib, "MIMALLOC_PURGE_DELAY": "-1"}
  env = host_memory.malloc_environment({"MIMALLOC_PURGE_DELAY": "10"}, cpu_only=True, mimalloc=lib)
  assert env["MIMALLOC_PURGE_DELAY"] == "10"  # the user's own setting stays
  # Accelerator hosts, and a user who preloads a library of their own: the glibc tunables.
  assert "LD_PRELOAD" not in host_memory.malloc_environment({}, cpu_only=False, mimalloc=lib)
  env = host_memory.malloc_environment({"LD_PRELOAD": "/lib/libjemalloc.so"}, cpu_only=True,
                                       mimalloc=lib)
  assert env["LD_PRELOAD"] == "/lib/libjemalloc.so" and env["GLIBC_TUNABLES"] == _CPU_TUNABLES
  # Already re-executed: nothing more to change.
  assert host_memory.malloc_environment({"LD_PRELOAD": lib}, cpu_only=True, mimalloc=lib) is None
  assert host_memory.allocator({"LD_PRELOAD": lib}) == "mimalloc (MIMALLOC_PURGE_DELAY=unset)"
  assert host_memory.allocator({}) == "glibc, GLIBC_TUNABLES=unset"


def test_cpu_only_host_follows_jax_platforms():
  assert host_memory.cpu_only_host({"JAX_PLATFORMS": "cpu"})
  assert not host_memory.cpu_only_host({"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.cpu_only_host({"JAX_PLATFORMS": "tpu"})


def _python(code: str, **env) -> str:
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "JOVA_KEEP_MALLOC", "LD_PRELOAD")
             and not k.startswith("MIMALLOC_")}
  environ.update(env, PYTHONPATH=_REPO)
  return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                        text=True, check=True, timeout=120).stdout.strip()


_REEXEC = ("import os; from jova_jax import host_memory; print('start', flush=True); "
           "host_memory.use_malloc_tunables(); print(os.environ.get('GLIBC_TUNABLES')); "
           "print(any('libmimalloc' in line for line in open('/proc/self/maps')))")
_MIMALLOC = host_memory.mimalloc_library()


@pytest.mark.skipif(not host_memory.glibc(), reason="glibc tunables only")
def test_a_process_reexecutes_itself_once_with_mimalloc_or_the_tunables():
  # Twice "start": the process ran the code again after the re-exec, then went on; where
  # mimalloc is installed (requirements-nodeps.txt) it is loaded, else the tunables are set.
  lines = _python(_REEXEC, JAX_PLATFORMS="cpu").split("\n")
  assert lines == (["start", "start", "None", "True"] if _MIMALLOC else
                   ["start", "start", _CPU_TUNABLES, "False"])
  assert _python(_REEXEC, JOVA_KEEP_MALLOC="1").split("\n") == ["start", "None", "False"]
  # An accelerator host: the huge-page tunable, no mimalloc.
  lines = _python(_REEXEC, JAX_PLATFORMS="cuda").split("\n")
  assert lines == ["start", "start", "glibc.malloc.hugetlb=1", "False"]


def _thp_off() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" in f.read()
  except OSError:
    return True


# What XLA's CPU runtime does each step: malloc a large buffer, write it, free it (numpy would
# not do: it madvises its own large arrays).
_FAULTS = ("import ctypes, resource\n"
           "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
           "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
           "for _ in range(4):\n"
           "  p = libc.malloc(2**27); ctypes.memset(p, 1, 2**27); libc.free(ctypes.c_void_p(p))\n"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


@pytest.mark.skipif(not host_memory.glibc() or _thp_off(),
                    reason="needs glibc and transparent huge pages (madvise or always)")
def test_huge_page_malloc_cuts_the_page_faults_of_large_buffers():
  plain = int(_python(_FAULTS))
  huge = int(_python(_FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"))
  kept = int(_python(_FAULTS, GLIBC_TUNABLES=_CPU_TUNABLES))  # huge pages, faulted in once
  assert plain > 4 * 2**27 // 4096 // 2, plain  # about one fault per 4 KiB page
  assert huge * 20 < plain and kept * 20 < plain, (huge, kept, plain)
  if _MIMALLOC:  # its memory faulted in once, not each time round
    mimalloc = int(_python(_FAULTS, LD_PRELOAD=_MIMALLOC, MIMALLOC_PURGE_DELAY="-1"))
    assert mimalloc * 4 < plain, (mimalloc, plain)
