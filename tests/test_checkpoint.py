"""Checkpointer, load_params and PreemptionWatcher on 8 fake CPU devices, tiny arrays."""
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jova_jax.parallel import mesh as mesh_lib, rules
from jova_jax.training import checkpoint, finetune
from tests.conftest import REPO, load, truncate_array_files

# name -> (shape, logical axes)
PARAMS = {
    "embed": ((16, 8), ("embed", None)),
    "mlp/kernel": ((8, 32), ("embed", "mlp")),
    "mlp/bias": ((32,), ("mlp",)),
    "attn/qkv": ((8, 4, 2), ("embed", "heads", "kv")),
}


def _mesh(**axes):
  config = load("tiny")
  config.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1))
  config.mesh.update(axes)
  return mesh_lib.make_mesh(config)


def _param_shardings(mesh):
  return finetune.unflatten({k: rules.sharding(mesh, names) for k, (_, names) in PARAMS.items()})


def _numpy_state(seed):
  """The reference values, built with numpy only."""
  rng = np.random.default_rng(seed)
  params = finetune.unflatten({k: rng.standard_normal(shape).astype(np.float32)
                  for k, (shape, _) in PARAMS.items()})
  return params, np.int32(seed), np.array([seed, 7], np.uint32)


def _train_state(mesh, seed):
  """{"params", "opt_state" (optax namedtuples), "ema", "step", "rng"} sharded on `mesh`."""
  params_np, step, rng = _numpy_state(seed)
  params = jax.tree.map(jax.device_put, params_np, _param_shardings(mesh))
  opt_state = jax.jit(optax.adamw(1e-3).init)(params)
  ema = jax.tree.map(lambda x: x * 0.5, params)
  return {"params": params, "opt_state": opt_state, "ema": ema,
          "step": jnp.asarray(step), "rng": jnp.asarray(rng)}


def _abstract(mesh):
  """The trainer's restore target: shapes and dtypes, shardings from the rules table."""
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        _numpy_state(0)[0], _param_shardings(mesh))
  replicated = rules.sharding(mesh, None)
  adam, *rest = jax.eval_shape(optax.adamw(1e-3).init, params)
  copy = lambda tree: jax.tree.map(lambda x: x, tree)  # noqa: E731  (own containers)
  adam = adam._replace(count=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                       mu=copy(params), nu=copy(params))
  return {"params": params, "opt_state": (adam, *rest), "ema": copy(params),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
          "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}


def _assert_state_equal(restored, seed):
  params, step, rng = _numpy_state(seed)
  for got, want in ((restored["params"], params), (restored["ema"],
                                                   jax.tree.map(lambda x: x * 0.5, params))):
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w), got, want)
  assert int(restored["step"]) == step
  np.testing.assert_array_equal(np.asarray(restored["rng"]), rng)


def test_restore_onto_another_mesh(tmp_path):
  source = _mesh(fsdp=8)
  with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=2,
                               async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, _train_state(source, 3), data_state=None, config=load("tiny"))

  target_mesh = _mesh(data=2, fsdp=2, tensor=2)
  abstract = _abstract(target_mesh)
  with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=2) as ckpt:
    state, data_state, _ = ckpt.restore(abstract)
  _assert_state_equal(state, 3)
  assert data_state is None
  assert isinstance(state["opt_state"][0], optax.ScaleByAdamState)
  np.testing.assert_array_equal(np.asarray(state["opt_state"][0].count), 0)
  # Every array carries the target sharding (on the new mesh), not the saved one.
  jax.tree.map(lambda got, want: (assert_sharding(got, want.sharding)), state, abstract)
  kernel = state["params"]["mlp"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(("fsdp", "context"), "tensor")
  assert kernel.addressable_shards[0].data.shape == (4, 16)  # 8/2 rows, 32/2 columns


def test_a_run_resumed_with_another_mu_dtype_restores_its_moments_cast(tmp_path, caplog):
  """train.mu_dtype changed between runs: float32 first moments come back rounded to bfloat16,
  and bfloat16 ones widened exactly, with a warning; every other leaf as saved."""
  mesh = _mesh(fsdp=8)
  state = _train_state(mesh, 3)
  adam = state["opt_state"][0]
  state["opt_state"] = (adam._replace(mu=jax.tree.map(lambda p: p / 3, state["params"])),
                        *state["opt_state"][1:])
  with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=2,
                               async_save=False) as ckpt:
    ckpt.save(3, state, data_state=None, config=load("tiny"))
  for dtype in (jnp.bfloat16, jnp.float32):
    abstract = _abstract(mesh)
    target = abstract["opt_state"][0]
    abstract["opt_state"] = (target._replace(mu=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), target.mu)),
        *abstract["opt_state"][1:])
    caplog.clear()
    with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=2) as ckpt:
      restored, _, _ = ckpt.restore(abstract)
    saved_dtype = {jnp.bfloat16: "float32", jnp.float32: "bfloat16"}[dtype]
    assert (f"4 arrays restored in another dtype than saved (4 {saved_dtype} -> "
            f"{jnp.dtype(dtype)}), e.g. opt_state/0/mu/") in caplog.text
    _assert_state_equal(restored, 3)
    for got, saved in zip(jax.tree.leaves(restored["opt_state"][0].mu),
                          jax.tree.leaves(state["opt_state"][0].mu)):
      assert got.dtype == dtype
      np.testing.assert_array_equal(np.asarray(got), np.asarray(saved.astype(dtype)))
    if dtype == jnp.bfloat16:  # then saved again and restored as float32: widened exactly
      with checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=2,
                                   async_save=False) as ckpt:
        ckpt.save(4, restored, data_state=None, config=load("tiny"))
      state = restored


def assert_sharding(array, sharding):
  assert array.sharding == sharding, (array.sharding, sharding)


def test_async_save_rotation_and_data_state(tmp_path):
  mesh = _mesh(fsdp=8)
  config = load("tiny")
  dataset = grain.MapDataset.range(100).shuffle(seed=5).to_iter_dataset()
  iterator = iter(dataset)
  data_states = {}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2, async_save=True)
  for step in range(1, 9):
    next(iterator)
    saved = ckpt.save(step, _train_state(mesh, step), data_state=iterator.get_state(),
                      config=config)
    assert saved == (step % 2 == 0) == ckpt.should_save(step)
    if saved:
      data_states[step] = iterator.get_state()
  assert not ckpt.save(8, _train_state(mesh, 8), data_state=None, config=config, force=True)
  assert ckpt.save(9, _train_state(mesh, 9), data_state=iterator.get_state(), config=config,
                   force=True)
  expected_next = [next(iterator) for _ in range(3)]
  ckpt.wait()
  assert ckpt.all_steps() == [8, 9]
  ckpt.close()

  abstract = _abstract(_mesh(fsdp=4, tensor=2))
  with checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2) as ckpt:
    assert ckpt.latest_step() == 9
    state, data_state, config_dict = ckpt.restore(abstract)
    older, older_data_state, _ = ckpt.restore(abstract, step=8)
    assert ckpt.restore_config(step=8) == config_dict
  _assert_state_equal(state, 9)
  _assert_state_equal(older, 8)
  assert older_data_state == data_states[8]
  # The restored iterator state resumes on exactly the examples the run would have seen.
  resumed = iter(dataset)
  resumed.set_state(data_state)
  assert [next(resumed) for _ in range(3)] == expected_next
  assert config_dict == json.loads(config.to_json_best_effort())
  assert config_dict["checkpoint"]["every_steps"] == config.checkpoint.every_steps


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  """`--workdir=runs/demo` is how users and the demo script call the trainer and sampler."""
  monkeypatch.chdir(tmp_path)
  mesh = _mesh(fsdp=8)
  with checkpoint.Checkpointer("runs/demo/checkpoints", every_steps=1, keep=1) as ckpt:
    assert ckpt.save(3, _train_state(mesh, 3), data_state=None, config=load("tiny"))
    ckpt.wait()
  assert (tmp_path / "runs/demo/checkpoints/3").is_dir()
  with checkpoint.Checkpointer("runs/demo/checkpoints", every_steps=1, keep=1,
                               read_only=True) as ckpt:
    state, _, _ = ckpt.restore(_abstract(mesh))
  _assert_state_equal(state, 3)
  params, report = checkpoint.load_params("runs/demo", _abstract(mesh)["params"], strict=True)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w), params,
               _numpy_state(3)[0])


def test_async_save_survives_donated_buffers(tmp_path):
  """The trainer donates the state to the next step right after save() returns."""
  mesh = _mesh(fsdp=8)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=True) as ckpt:
    state = _train_state(mesh, 4)
    assert ckpt.save(4, state, data_state={"pos": 4}, config=load("tiny"))
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait()
    restored, data_state, _ = ckpt.restore(_abstract(mesh))
  _assert_state_equal(restored, 4)
  assert data_state == {"pos": 4}


def test_restore_mismatch_names_the_key(tmp_path):
  mesh = _mesh(fsdp=8)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as ckpt:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore(_abstract(mesh))
    ckpt.save(1, _train_state(mesh, 1), data_state=None, config=load("tiny"))
    with pytest.raises(FileNotFoundError, match=r"step 5 .*steps \[1\]"):
      ckpt.restore(_abstract(mesh), step=5)

    extra = _abstract(mesh)
    extra["params"]["mlp"]["gate"] = extra["params"]["mlp"]["bias"]
    with pytest.raises(ValueError, match="target has 'params/mlp/gate' but the checkpoint"):
      ckpt.restore(extra)

    fewer = _abstract(mesh)
    del fewer["ema"]
    with pytest.raises(ValueError, match="checkpoint has 'ema/attn/qkv' but the restore target"):
      ckpt.restore(fewer)

    reshaped = _abstract(mesh)
    bias = reshaped["params"]["mlp"]["bias"]
    reshaped["params"]["mlp"]["bias"] = jax.ShapeDtypeStruct((16,), bias.dtype,
                                                             sharding=bias.sharding)
    with pytest.raises(ValueError, match=r"'params/mlp/bias' has shape \(32,\) in the checkpoint "
                                         r"but \(16,\)"):
      ckpt.restore(reshaped)

    unsharded = _abstract(mesh)
    unsharded["step"] = jax.ShapeDtypeStruct((), jnp.int32)
    with pytest.raises(ValueError, match="'step' has no sharding"):
      ckpt.restore(unsharded)


def test_nnx_state_round_trip(tmp_path):
  """nnx.State params are stored as plain dicts (no '/value' keys) and come back as State."""
  mesh = _mesh(fsdp=8)
  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  replicated = rules.sharding(mesh, None)
  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False) as ckpt:
    ckpt.save(1, {"params": params}, data_state=None, config={"name": "linear"})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            nnx.eval_shape(lambda: nnx.state(nnx.Linear(8, 4, rngs=nnx.Rngs(1)),
                                                             nnx.Param)))
    restored, _, config_dict = ckpt.restore({"params": abstract})
  assert config_dict == {"name": "linear"}
  assert isinstance(restored["params"], nnx.State)
  np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"][...]),
                                np.asarray(model.kernel[...]))
  loaded, report = checkpoint.load_params(tmp_path, {"kernel": abstract["kernel"].get_value(),
                                                     "bias": abstract["bias"].get_value()})
  assert sorted(report["loaded"]) == ["bias", "kernel"]
  np.testing.assert_array_equal(np.asarray(loaded["bias"]), np.asarray(model.bias[...]))


def _save_params(directory, step, params):
  with checkpoint.Checkpointer(directory, every_steps=1, keep=3, async_save=False) as ckpt:
    ckpt.save(step, {"params": params, "step": jnp.int32(step)}, data_state=None,
              config={"step": step})


def test_load_params_report(tmp_path):
  mesh = _mesh(fsdp=2, tensor=4)
  workdir = tmp_path / "run"
  base = {"a": np.arange(8, dtype=np.float32), "b": {"c": np.ones((2, 4), np.float32)},
          "d": np.full((4, 2), 3.0, np.float32), "old": np.zeros(3, np.float32)}
  for step, scale in ((1, 10.0), (2, 1.0)):
    _save_params(workdir / "checkpoints", step, jax.tree.map(lambda x: jnp.asarray(x * scale),
                                                            base))
  fsdp, tensor = (rules.sharding(mesh, names) for names in (("embed",), (None, "mlp")))
  target = {"a": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=fsdp),
            "b": {"c": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=tensor)},
            "d": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=rules.sharding(mesh, None)),
            "new": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=fsdp)}

  params, report = checkpoint.load_params(workdir, target)
  assert report == {"loaded": ["a", "d"], "missing": ["new"], "unexpected": ["old"],
                    "shape_mismatch": [("b/c", (2, 4), (3, 4))],
                    "step_dir": str(workdir / "checkpoints" / "2")}  # the latest step
  assert params["a"].dtype == jnp.bfloat16 and params["a"].sharding == fsdp
  np.testing.assert_array_equal(np.asarray(params["a"], np.float32), base["a"])
  np.testing.assert_array_equal(np.asarray(params["d"]), base["d"])
  assert params["new"] is target["new"] and params["b"]["c"] is target["b"]["c"]
  text = checkpoint.format_report(report)
  assert "missing (kept from init): new" in text and "unexpected (ignored): old" in text
  assert "b/c: checkpoint (2, 4), model (3, 4)" in text

  fallback = {"a": jnp.zeros(8, jnp.bfloat16), "b": {"c": jnp.full((3, 4), 5.0)},
              "d": jnp.zeros((4, 2)), "new": jnp.full((2,), 6.0)}
  older, _ = checkpoint.load_params(workdir / "checkpoints" / "1", target, fallback=fallback)
  np.testing.assert_array_equal(np.asarray(older["d"]), base["d"] * 10)
  np.testing.assert_array_equal(np.asarray(older["new"]), [6.0, 6.0])
  np.testing.assert_array_equal(np.asarray(older["b"]["c"]), np.full((3, 4), 5.0))
  same, _ = checkpoint.load_params(workdir / "checkpoints", target)
  np.testing.assert_array_equal(np.asarray(same["d"]), base["d"])

  with pytest.raises(ValueError, match="(?s)strict.*b/c"):
    checkpoint.load_params(workdir, target, strict=True)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoint.load_params(tmp_path / "nowhere", target)


def test_interrupted_save_is_ignored(tmp_path):
  """A save killed midway leaves `<step>.orbax-checkpoint-tmp`: never listed nor restored."""
  mesh = _mesh(fsdp=8)
  params = {"w": jnp.arange(8.0)}
  _save_params(tmp_path, 2, params)
  _save_params(tmp_path, 4, jax.tree.map(lambda x: x + 1, params))
  # What a killed save of step 6 leaves on a local/NFS disk: all files, never renamed.
  partial = tmp_path / "6.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "4", partial)
  os.remove(partial / "commit_success.txt")
  target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=rules.sharding(mesh, None))}

  loaded, _ = checkpoint.load_params(tmp_path, target)
  np.testing.assert_array_equal(np.asarray(loaded["w"]), np.arange(8.0) + 1)
  reader = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, read_only=True)
  assert reader.latest_step() == 4 and reader.all_steps() == [2, 4]
  with pytest.raises(FileNotFoundError, match=r"step 6 .*steps \[2, 4\]"):
    reader.restore_config(step=6)
  assert reader.restore_config() == {"step": 4}
  assert partial.exists()  # a reader never deletes a writer's in-flight save
  _save_params(tmp_path, 5, params)  # a writer: it cleans up the leftover
  assert reader.latest_step() == 5  # a reader sees saves made after it opened
  reader.close()

  with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as writer:
    assert writer.latest_step() == 5
    restored, _, _ = writer.restore(step=4, abstract_state={"params": target, "step": jax.ShapeDtypeStruct(
        (), jnp.int32, sharding=rules.sharding(mesh, None))})
  assert int(restored["step"]) == 4
  assert not partial.exists()


def test_restore_latest_skips_a_step_without_metadata(tmp_path):
  """A latest step missing its _METADATA (Orbax then fails with an AttributeError) is skipped
  for the step before, and set aside so the resumed run can save that step again."""
  mesh = _mesh(fsdp=8)
  ckpts = tmp_path / "checkpoints"
  _save_params(ckpts, 2, {"w": jnp.arange(8.0)})
  _save_params(ckpts, 4, {"w": jnp.arange(8.0) + 1})
  os.remove(ckpts / "4" / "state" / "_METADATA")
  replicated = rules.sharding(mesh, None)
  target = {"params": {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=replicated)},
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
  with checkpoint.Checkpointer(ckpts, every_steps=1, keep=3) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4 does not restore"):
      ckpt.restore_latest(target, strict=True)
    assert ckpt.all_steps() == [2, 4]  # a refusal moves nothing
    step, state, _ = ckpt.restore_latest(target)
    assert step == 2 and ckpt.all_steps() == [2]
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(8.0))
  assert (tmp_path / checkpoint.BROKEN_DIR / "4" / "state").is_dir()


@pytest.mark.parametrize("reader", ["restore_latest", "load_params"])
def test_a_failed_restore_reports_one_error_not_its_leftover_reads(tmp_path, monkeypatch, caplog,
                                                                   reader):
  """A truncated step fails one read while TensorStore still has the others in flight; the
  error is the only report (no callback into Orbax's closed loop, no unretrieved error), for a
  resume and for --init_from / the sampler's load_params alike."""
  mesh = _mesh(fsdp=8)
  replicated = rules.sharding(mesh, None)
  params = {f"w{i}": jax.random.normal(jax.random.key(i), (64, 256)) for i in range(48)}
  _save_params(tmp_path, 2, params)
  truncate_array_files(tmp_path / "2")
  abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
                     for k, v in params.items()}
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    if reader == "restore_latest":
      target = {"params": abstract_params,
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
      with checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match=r"/2 does not restore"):
          ckpt.restore_latest(target, strict=True)
    else:
      with pytest.raises(checkpoint.CheckpointError, match=r"/2 does not restore"):
        checkpoint.load_params(tmp_path, abstract_params)
    time.sleep(0.5)  # reads left in flight would report within this
    gc.collect()
  assert not unraisable, [str(u.exc_value) for u in unraisable[:3]]
  assert not caplog.records, caplog.text[:2000]


def test_preemption_watcher_sigterm():
  before = signal.getsignal(signal.SIGTERM)
  watcher = checkpoint.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.signalled and watcher.signum == signal.SIGTERM  # the exit status: 143
    assert watcher.should_stop(2) and watcher.should_stop(3)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------ two processes

def _multiprocess_worker(process_id: int, port: int, workdir: str, out: str) -> None:
  """One of two jax.distributed processes (8 CPU devices each, 16 in the job)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  reference = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  source = _mesh(fsdp=16)
  weight = jax.make_array_from_callback(reference.shape, rules.sharding(source, ("embed", None)),
                                        lambda index: reference[index])
  watcher = checkpoint.PreemptionWatcher()
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=2, async_save=True)
  ckpt.save(1, {"params": {"w": weight}}, data_state={"position": 1}, config={"seed": 0})
  if process_id == 1:  # a preemption notice that reaches one host only
    os.kill(os.getpid(), signal.SIGTERM)
  stop = watcher.should_stop(2)
  ckpt.wait()
  target = _mesh(data=2, fsdp=4, tensor=2)
  sharding = rules.sharding(target, ("embed", "mlp"))
  restored, data_state, _ = ckpt.restore(
      {"params": {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding)}})
  weight = restored["params"]["w"]
  result = {"stop": stop, "signalled": watcher.signalled, "data_state": data_state,
            "same_sharding": weight.sharding == sharding,
            "shards": [bool(np.array_equal(np.asarray(s.data), reference[s.index]))
                       for s in weight.addressable_shards]}
  ckpt.close()
  watcher.close()
  with open(out, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


def test_two_processes_save_restore_and_agree_on_preemption(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / "ckpt"),
                             str(tmp_path / f"out{i}.json")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert [r["signalled"] for r in results] == [False, True]
  assert [r["stop"] for r in results] == [True, True]  # both stop, at the same step
  for r in results:
    assert r["data_state"] == {"position": 1} and r["same_sharding"]
    assert len(r["shards"]) == 8 and all(r["shards"])


if __name__ == "__main__":
  _multiprocess_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
