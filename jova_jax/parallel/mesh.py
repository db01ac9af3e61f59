"""Device mesh from config, and jax.distributed start-up for multi-process jobs."""
from __future__ import annotations

import dataclasses
import glob
import os
import urllib.request

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType

from jova_jax.config_lib import ConfigError
from jova_jax.errors import UserError
from jova_jax.parallel.rules import MESH_AXES


DCN_AXES = ("data", "fsdp")  # the axes that may span slices (mesh.dcn_<axis>)


def dcn_shape(config) -> dict[str, int]:
  """Slices (DCN) per mesh axis: config.mesh.dcn_data and dcn_fsdp, 1 for the other axes."""
  return {a: int(config.mesh.get(f"dcn_{a}", 1)) if a in DCN_AXES else 1 for a in MESH_AXES}


def mesh_shape(config, num_devices: int | None = None) -> dict[str, int]:
  """The whole mesh's sizes: config.mesh's per-slice sizes (one may be -1: the rest of a
  slice) times mesh.dcn_* slices, resolved against the device count."""
  n = num_devices or jax.device_count()
  dcn = dcn_shape(config)
  slices = int(np.prod(list(dcn.values())))
  sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"only one mesh axis may be -1, found {fill} (config.mesh)")
  if n % slices:
    raise ConfigError(f"config.mesh.dcn_* = {slices} slices cannot split {n} devices")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if (n // slices) % known:
      raise ConfigError(f"config.mesh {sizes} cannot fill {n // slices} devices per slice: "
                        f"{n // slices} is not divisible by {known}")
    sizes[fill[0]] = n // slices // known
  sizes = {a: s * dcn[a] for a, s in sizes.items()}
  if int(np.prod(list(sizes.values()))) != n:
    raise ConfigError(f"config.mesh {sizes} has {int(np.prod(list(sizes.values())))} devices but "
                     f"there are {n}")
  return sizes


class _InSlice:
  """A device with the slice index of its group (CPU and GPU devices carry none)."""

  def __init__(self, device, slice_index: int):
    self.device, self.slice_index = device, slice_index

  def __getattr__(self, name):
    return getattr(self.device, name)


def make_mesh(config, devices=None, slice_of=None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (jax.make_mesh defaults to Explicit, which the logical rules need not).

  With mesh.dcn_* > 1 the device array comes from mesh_utils.create_hybrid_device_mesh: the
  dcn axes across slices, each slice an ICI mesh of config.mesh's sizes. Slices: slice_of(device)
  if given, else the devices' slice_index (multi-slice TPU), else their process (one per
  slice: multi-node GPU), else contiguous groups of the device list (fake CPU devices).
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes, dcn = mesh_shape(config, len(devices)), dcn_shape(config)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = int(np.prod(list(dcn.values())))
  if slices == 1:
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types,
                         devices=devices)
  if slice_of is None and not hasattr(devices[0], "slice_index"):
    if len({d.process_index for d in devices}) == slices:
      slice_of = lambda d: d.process_index  # noqa: E731
    else:
      slice_of = {d: i * slices // len(devices) for i, d in enumerate(devices)}.get
  grouped = devices if slice_of is None else [_InSlice(d, slice_of(d)) for d in devices]
  array = mesh_utils.create_hybrid_device_mesh(
      [sizes[a] // dcn[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], grouped,
      allow_split_physical_axes=True)
  if slice_of is not None:
    array = np.vectorize(lambda d: d.device, otypes=[object])(array)
  return jax.sharding.Mesh(array, MESH_AXES, axis_types=axis_types)


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here (no-op with one process).

  Uses the coordination service, not a device collective: CPU gloo collectives give up after
  30 s, and processes can drift further apart than that while each compiles the same program.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize created
  distributed.global_state.client.wait_at_barrier(f"jova_{name}", timeout_in_ms=timeout_s * 1000)


# ---------------------------------------------------------------- multi-process start-up
METHODS = ("auto", "tpu", "gke", "slurm", "env", "none")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", METHODS,
    "How the processes of a multi-host job find each other: tpu (TPU VM metadata server), gke "
    "(TPU_WORKER_HOSTNAMES), slurm (SLURM_NTASKS / SLURM_PROCID), env (JOVA_COORDINATOR or "
    "JAX_COORDINATOR_ADDRESS, with the process count and id), none (one process); auto: the "
    "first of env, slurm, gke, tpu that the environment shows.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes the job must have; a start-up that finds another count "
    "fails instead of training alone (default: the count the start-up method reports).")
_ENV_KEYS = (("JOVA_COORDINATOR", "JOVA_NUM_PROCESSES", "JOVA_PROCESS_ID"),
             ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
_WHAT_EACH_NEEDS = {
    "env": "expected JOVA_COORDINATOR or JAX_COORDINATOR_ADDRESS, with the process count and id",
    "slurm": "expected SLURM_NTASKS", "gke": "expected TPU_WORKER_HOSTNAMES",
    "tpu": "expected the TPU metadata server to list worker-network-endpoints"}
_JAX_CLUSTER = {"slurm": "slurm", "gke": "gketpu", "tpu": "gcetpu"}
_started: "Startup | None" = None  # the start-up of this process, once done
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


@dataclasses.dataclass(frozen=True)
class Startup:
  """What the environment says about the job: how it starts and how many processes it has."""
  method: str                  # one of METHODS but auto
  num_processes: int = 1
  process_id: int = 0
  coordinator: str | None = None  # host:port; None: jax's cluster detection finds it
  source: str = ""             # where num_processes came from, for messages


def tpu_metadata(key: str) -> str | None:
  """An attribute of this TPU VM from the GCE metadata server; None off TPU VMs (no query)."""
  if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return None
  request = urllib.request.Request(_METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=5) as answer:
      return answer.read().decode()
  except OSError:
    return None


def _env_startup(env) -> Startup | None:
  for coordinator, count, index in _ENV_KEYS:
    if coordinator in env:
      missing = [k for k in (count, index) if k not in env]
      if missing:
        raise UserError(f"{coordinator} is set but {' and '.join(missing)} not: the env start-up "
                        f"needs {coordinator}, {count} and {index}")
      return Startup("env", int(env[count]), int(env[index]), env[coordinator],
                     f"{count}={env[count]}")
  return None


def _slurm_startup(env) -> Startup | None:
  if "SLURM_NTASKS" not in env:
    return None
  return Startup("slurm", int(env["SLURM_NTASKS"]), int(env.get("SLURM_PROCID", 0)),
                 source=f"SLURM_NTASKS={env['SLURM_NTASKS']}")


def _gke_startup(env) -> Startup | None:
  hosts = env.get("TPU_WORKER_HOSTNAMES")
  if not hosts:
    return None
  slices = int(env.get("MEGASCALE_NUM_SLICES", 1))
  per_slice = len(hosts.split(","))
  index = int(env.get("MEGASCALE_SLICE_ID", 0)) * per_slice + int(env.get("TPU_WORKER_ID", 0))
  return Startup("gke", per_slice * slices, index,
                 source=f"TPU_WORKER_HOSTNAMES lists {per_slice} hosts x {slices} slices")


def _tpu_startup(metadata) -> Startup | None:
  endpoints = metadata("worker-network-endpoints")
  if not endpoints:
    return None
  per_slice = len(endpoints.split(","))
  tpu_env = dict(line.split(":", 1) for line in (metadata("tpu-env") or "").splitlines()
                 if ":" in line)
  slices = int(tpu_env.get("MEGASCALE_NUM_SLICES", "1").strip().strip("'"))
  slice_id = int(tpu_env.get("MEGASCALE_SLICE_ID", "0").strip().strip("'"))
  index = slice_id * per_slice + int(metadata("agent-worker-number") or 0)
  return Startup("tpu", per_slice * slices, index,
                 source=f"the TPU metadata lists {per_slice} workers x {slices} slices")


def detect_startup(method: str = "auto", env=None, metadata=tpu_metadata) -> Startup:
  """The start-up `method` describes (auto: the first of env, slurm, gke, tpu that the
  environment shows, else none). env: the environment (default os.environ); metadata: the TPU
  VM metadata reader (tests fake it)."""
  env = os.environ if env is None else env
  finders = {"env": lambda: _env_startup(env), "slurm": lambda: _slurm_startup(env),
             "gke": lambda: _gke_startup(env), "tpu": lambda: _tpu_startup(metadata)}
  if method == "none":
    return Startup("none")
  if method != "auto":
    found = finders[method]()
    if found is None:
      raise UserError(f"--distributed={method}: the environment shows no {method} job "
                      f"({_WHAT_EACH_NEEDS[method]})")
    return found
  for name in ("env", "slurm", "gke", "tpu"):
    found = finders[name]()
    if found is not None and (found.num_processes > 1 or name == "env"):
      return found
  return Startup("none")


def initialize_distributed(method: str | None = None, num_processes: int | None = None,
                           metadata=tpu_metadata) -> Startup:
  """Starts jax.distributed the way `method` (default: the --distributed flag) says, checks the
  process count against num_processes (default --num_processes, else the count the environment
  shows, even under `none`) and logs the method, process count, local and global devices once."""
  global _started
  if _started is not None:
    return _started
  method = method or (_DISTRIBUTED.value if flags.FLAGS.is_parsed() else "auto")
  if num_processes is None and flags.FLAGS.is_parsed():
    num_processes = _NUM_PROCESSES.value
  startup = detect_startup(method, metadata=metadata)
  shown = detect_startup("auto", metadata=metadata) if method == "none" else startup
  if startup.num_processes > 1 and not jax.distributed.is_initialized():
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if startup.coordinator:
      jax.distributed.initialize(startup.coordinator, startup.num_processes, startup.process_id)
    else:
      jax.distributed.initialize(cluster_detection_method=_JAX_CLUSTER[startup.method])
  expected = num_processes or shown.num_processes
  if jax.process_count() != expected:
    said = f"--num_processes={num_processes}" if num_processes else shown.source
    raise UserError(f"--distributed={method}: expected {expected} processes ({said}), found "
                    f"{jax.process_count()}")
  logging.info("start-up %s: process %d of %d, %d local / %d global devices", startup.method,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  _started = startup
  return startup
