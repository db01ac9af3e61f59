"""Device mesh from config, and jax.distributed start-up for multi-process jobs."""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType

from jova_jax.config_lib import ConfigError
from jova_jax.parallel.rules import MESH_AXES


def mesh_shape(config, num_devices: int | None = None) -> dict[str, int]:
  """Resolves the config's mesh sizes (one may be -1) against the device count."""
  n = num_devices or jax.device_count()
  sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
  sizes["data"] *= int(config.mesh.get("dcn_data", 1))
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"only one mesh axis may be -1, found {fill} (config.mesh)")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if n % known:
      raise ConfigError(f"config.mesh {sizes} cannot fill {n} devices: {n} is not divisible by "
                        f"{known}")
    sizes[fill[0]] = n // known
  if int(np.prod(list(sizes.values()))) != n:
    raise ConfigError(f"config.mesh {sizes} has {int(np.prod(list(sizes.values())))} devices but "
                     f"there are {n}")
  return sizes


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (jax.make_mesh defaults to Explicit, which the logical rules need not)."""
  devices = devices if devices is not None else jax.devices()
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op with one process).

  Uses the coordination service, not a device collective: CPU gloo collectives give up after
  30 s, and processes can drift further apart than that while each compiles the same program.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize created
  distributed.global_state.client.wait_at_barrier(f"jova_{name}", timeout_in_ms=timeout_s * 1000)


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when the environment says the job has several processes.

  Explicit: JOVA_COORDINATOR (host:port), JOVA_NUM_PROCESSES, JOVA_PROCESS_ID.
  SLURM (SLURM_NTASKS > 1) and TPU pods (several TPU_WORKER_HOSTNAMES) are auto-detected by
  jax.distributed.initialize() itself.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if "JOVA_COORDINATOR" in env:
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(env["JOVA_COORDINATOR"], int(env["JOVA_NUM_PROCESSES"]),
                               int(env["JOVA_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
