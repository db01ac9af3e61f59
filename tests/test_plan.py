"""Remat policies keep gradients; per-device state memory shrinks with fsdp; jova_jax.plan's
accounting matches XLA's compiled memory_analysis; the plan CLI runs on the paper-scale config."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.model import sharded, summary
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.tools import plan
from jova_jax.training import objective, state as train_state, steps as train_steps
from tests.conftest import REPO, load

GIB = 2**30


# ============================================================================ remat
def _randomized_params(config):
  """Random values everywhere (adaLN-Zero init would make most gradients trivially zero)."""
  _, abstract, _ = sharded.split_abstract(config)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * 0.05
                                      for k, x in zip(keys, leaves)])


def _grads(config, params, batch):
  graphdef, _, _ = sharded.split_abstract(config)

  def loss(p):
    return objective.training_loss(graphdef, p, batch, jax.random.key(7), config)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_and_unrolling_give_the_same_gradients():
  config = load("tiny")
  config.model.dual_blocks = 2  # a loop of two blocks, so unrolling it changes the program
  params = _randomized_params(config)
  batch = train_state.model_inputs(SyntheticIterator(config, seed=0).batch(0))
  loss_ref, grads_ref = _grads(config, params, batch)
  for policy, unroll in (("full", 1), ("save_dots", 1), ("none", 2)):
    config.model.remat, config.model.scan_unroll = policy, unroll
    loss, grads = _grads(config, params, batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(grads_ref)):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6,
                                 err_msg=f"remat={policy} scan_unroll={unroll} "
                                         f"{jax.tree_util.keystr(path)}")


# ============================================================================ compiled memory
# name -> (mesh axes, train settings)
_MESHES = {"fsdp1": (dict(fsdp=1), {}), "fsdp2": (dict(fsdp=2), {}), "fsdp4": (dict(fsdp=4), {}),
           "fsdp8": (dict(fsdp=8), {}),
           "fsdp2_context2_tensor2": (dict(fsdp=2, context=2, tensor=2), {}),
           "fsdp2_mu_bfloat16": (dict(fsdp=2), dict(mu_dtype="bfloat16"))}
# Buffer sizes are fixed before code generation; skipping LLVM's optimisations halves the compile.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config_on(axes, train=None):
  config = load("tiny")
  config.mesh.update({**dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1), **axes})
  config.train.update(train or {})
  return config


@pytest.fixture(scope="module")
def compiled_state_bytes():
  """mesh name -> (config, mesh shape, per-device bytes of the train-state arguments)."""
  out = {}
  for name, (axes, train) in _MESHES.items():
    config = _config_on(axes, train)
    n = int(np.prod(list(axes.values())))
    mesh = mesh_lib.make_mesh(config, devices=jax.devices()[:n])
    program = train_state.build_program(config, mesh)
    step = jax.jit(train_steps.make_train_step(program),
                   in_shardings=(program.state_shardings, program.batch_sharding),
                   out_shardings=(program.state_shardings, None), donate_argnums=0)
    with jax.set_mesh(mesh):
      lowered = step.lower(program.abstract_state, program.abstract_batch())
    mem = lowered.compile(_FAST_COMPILE).memory_analysis()
    batch = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                for x in program.abstract_batch().values())
    out[name] = (config, dict(mesh.shape), mem.argument_size_in_bytes - batch)
  return out


# One worker compiles the module fixture once for all of these (xdist would run it per worker).
@pytest.mark.xdist_group("plan_compiled")
def test_state_memory_shrinks_like_one_over_fsdp(compiled_state_bytes):
  base = compiled_state_bytes["fsdp1"][2]
  ratios = {n: compiled_state_bytes[f"fsdp{n}"][2] / base for n in (2, 4, 8)}
  print("per-device params+optimizer+EMA bytes vs fsdp=1:",
        {n: f"{r:.4f} (1/n={1 / n:.4f})" for n, r in ratios.items()})
  for n, ratio in ratios.items():
    # Above 1/n only by the few replicated vectors (norm scales, head-sharded biases, null_text).
    assert 1 / n <= ratio <= 1.1 / n, (n, ratio)


@pytest.mark.xdist_group("plan_compiled")
@pytest.mark.parametrize("name", list(_MESHES))
def test_plan_state_bytes_match_compiled(compiled_state_bytes, name):
  config, mesh_shape, compiled = compiled_state_bytes[name]
  rows = plan.state_bytes(config, plan.planned_model(config, mesh_shape), mesh_shape)
  planned = rows["params"] + rows["optimizer (mu+nu)"] + rows["ema"]
  print(f"{name}: plan {planned} B, compiled arguments less batch {compiled} B")
  # The compiled arguments also hold a few int32 scalars (step, nonfinite, optimizer counts).
  assert planned <= compiled <= planned + 64


# ============================================================================ CLI
def test_plan_cli_on_jova_24b():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "jova_jax.plan", "--config=configs/jova_24b.py",
       "--mesh=data=1,fsdp=16,context=4,tensor=1", "--chip=h100", "--batch_size=64",
       "--config.train.grad_accum=4", "--compile=no"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  print(out.stdout)
  rows = {m[1].strip(): float(m[2]) for m in re.finditer(r"^([a-z][a-z +()]+?)\s+([\d.]+)",
                                                         out.stdout, re.M)}
  for name in ("params", "optimizer (mu+nu)", "ema", "gradients", "activations saved",
               "backward working set", "fsdp gather buffers", "total"):
    assert name in rows, (name, out.stdout)
  # Independent figure: nearly every param is split over fsdp x context = 64 devices.
  total = sum(summary.param_table(load("jova_24b")).values())
  assert rows["params"] == pytest.approx(total * 4 / 64 / GIB, rel=0.02)
  assert rows["optimizer (mu+nu)"] == pytest.approx(2 * rows["params"], abs=0.011)
  assert "H100" in out.stdout or "h100" in out.stdout
  assert "step time" in out.stdout and "AOT compile skipped" in out.stdout


def test_dcn_traffic_per_step():
  """Over 2 slices: the data axis all-reduces each device's float32 gradient shard once (ring:
  2 x 1/2 of it); the fsdp axis gathers bf16 params twice and reduce-scatters float32 gradients
  per micro-batch, one shard each over DCN."""
  config = load("jova_24b")
  config.mesh.update(dict(data=1, fsdp=16, context=4, tensor=1, dcn_data=2))
  config.train.grad_accum = 8
  shape = mesh_lib.mesh_shape(config, 128)
  model = plan.planned_model(config, shape)
  _, shard = plan.param_counts(model, shape)
  assert plan.dcn_bytes(config, model, shape) == {"gradient all-reduce": 4 * shard}
  config.mesh.update(dcn_data=1, dcn_fsdp=2)
  shape = mesh_lib.mesh_shape(config, 128)
  model = plan.planned_model(config, shape)
  _, shard = plan.param_counts(model, shape)
  assert plan.dcn_bytes(config, model, shape) == {"fsdp param gathers": 2 * 8 * 2 * shard,
                                           "fsdp gradient reduce-scatters": 8 * 4 * shard}
  config.mesh.dcn_fsdp = 1
  shape = mesh_lib.mesh_shape(config, 64)
  assert plan.dcn_bytes(config, plan.planned_model(config, shape), shape) == {}
