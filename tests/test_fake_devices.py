"""The fake CPU devices' thread pool has two threads per device and a spare (conftest.py sets
PJRT_NPROC): with one thread per device, collectives that start in different orders on different
devices deadlock."""
import os

import jax
import pytest

from tests.conftest import FAKE_DEVICES


def _threads_named(name: str) -> int:
  count = 0
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/comm") as f:
      count += f.read().strip() == name
  return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_xla_cpu_pool_outnumbers_the_fake_devices():
  assert len(jax.devices()) == FAKE_DEVICES
  jax.numpy.ones(1).block_until_ready()  # the client and its pool exist from here on
  # XLA names its intra-op pool's threads tf_XLAEigen; if a jax release stops reading PJRT_NPROC
  # the pool falls back to one thread per device and this fails before a test hangs.
  assert _threads_named("tf_XLAEigen") > 2 * FAKE_DEVICES, (
      f"PJRT_NPROC={os.environ.get('PJRT_NPROC')!r}: XLA's CPU pool has "
      f"{_threads_named('tf_XLAEigen')} threads for {FAKE_DEVICES} fake devices")
