"""Activations are batch-sharded: the compiled train step's temporaries per device at one
sample per device match one device with one sample (jova_jax/parallel/rules.py constrain)."""
import jax
import pytest

from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import state as train_state, steps as train_steps
from tests.conftest import load


def _temporaries_mib(axes: dict, devices: int) -> float:
  """Temporaries per device of the trainer's compiled step, tiny config at hidden 128 on a
  17x64x64 video, one sample per device."""
  config = load("tiny")
  config.model.hidden = 128
  config.video.update(frames=17, height=64, width=64)
  config.train.batch_size = devices
  config.mesh.update({**dict(data=1, fsdp=1, context=1, tensor=1), **axes})
  # The same attention on both sides: 'auto' picks the C++ kernel on one CPU device only.
  config.parallel.attention_kernel = "xla"
  mesh = mesh_lib.make_mesh(config, devices=jax.devices()[:devices])
  compiled = train_steps.compile_train_step(train_state.build_program(config, mesh))
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


@pytest.fixture(scope="module")
def one_device_mib():
  return _temporaries_mib(dict(), devices=1)


@pytest.mark.xdist_group("activation_memory")  # one worker compiles the 1-device reference
@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(data=2, fsdp=4),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_temporaries_per_device_match_one_device(one_device_mib, axes):
  # Before batch pinning, fsdp=8 kept 248 MiB against 184 MiB on one device (full-batch activations).
  sharded_mib = _temporaries_mib(axes, devices=8)
  assert sharded_mib <= 1.10 * one_device_mib, (axes, sharded_mib, one_device_mib)
