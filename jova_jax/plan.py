"""`python -m jova_jax.plan --config=... --mesh=...`: the planner of jova_jax/tools/plan.py, under
the command the README, the Makefile and docs/scaling.md use. The flags live here (the library
defines none)."""
import importlib.util

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jova_jax import cli
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.tools.plan import (CHIPS, compile_for_tpu, format_memory_analysis, format_plan,
                                 make_plan, resolve_mesh, topology_name)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_MESH = flags.DEFINE_string("mesh", "", "axis=size,... over data,fsdp,context,tensor "
                                "(default: the config's mesh.*)")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count, when an axis is -1.")
_CHIP = flags.DEFINE_enum("chip", "v5p", sorted(CHIPS), "Accelerator to plan for.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default train.batch_size).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_COMPILE = flags.DEFINE_enum("compile", "auto", ["auto", "yes", "no"],
                                 "AOT-compile the train step for a TPU topology (auto: when "
                                 "libtpu is importable and --chip is a TPU).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology of one slice, e.g. "
                                    "v5p:4x4x8 (default: from --chip and the device count); "
                                    "--config.mesh.dcn_data=N compiles for N such slices.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/jova_24b.py")
  if _BATCH_SIZE.value is not None:
    config.train.batch_size = _BATCH_SIZE.value
  try:
    mesh_shape = resolve_mesh(config, _MESH.value, _DEVICES.value)
    plan = make_plan(config, mesh_shape, _CHIP.value, _MFU.value)
  except ValueError as e:  # bad mesh / config: the message names the flag or key
    raise app.UsageError(str(e)) from e
  print(format_plan(plan, config), flush=True)

  is_tpu = CHIPS[_CHIP.value].tpu_generation is not None
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  if _COMPILE.value == "yes" and not (is_tpu and has_libtpu):
    raise app.UsageError(
        f"--compile=yes needs a TPU --chip (got {_CHIP.value}) and an importable libtpu "
        f"(found: {has_libtpu}; pip install --target DIR libtpu, then PYTHONPATH=DIR)")
  if _COMPILE.value == "no" or not (is_tpu and has_libtpu):
    why = ("--compile=no" if _COMPILE.value == "no" else
           f"{_CHIP.value} is not a TPU" if not is_tpu else "libtpu is not installed")
    print(f"AOT compile skipped ({why}): figures above are the analytic accounting only.")
    return
  slices = int(np.prod(list(mesh_lib.dcn_shape(config).values())))
  topology = _TOPOLOGY.value or topology_name(_CHIP.value, plan.devices // slices)
  print(f"compiling the train step for {slices} x {topology} ...", flush=True)
  compiled = compile_for_tpu(config, topology, slices)
  print(format_memory_analysis(compiled.memory_analysis()))


if __name__ == "__main__":
  cli.run(main)
