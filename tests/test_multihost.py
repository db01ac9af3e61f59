"""Multi-host: start-up through each detection path (faked environments and TPU metadata), a
real 2-process gloo start, the refusal to train alone when the job expects several processes,
the every-N-steps stop check, multi-host sampling and hybrid (multi-slice) meshes."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jova_jax.data import pipeline as data_pipeline
from jova_jax.errors import UserError
from jova_jax.media import io as media
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.sampling import generate, prompts as prompt_lib, sampler as sampler_lib
from jova_jax.training import checkpoint, state as train_state, steps as train_steps
from tests.conftest import REPO, load, two_processes
from tests.test_sample import CAPTIONS, pipeline, run_dir  # noqa: F401 (fixtures)
from tests.test_trainer import _train_cmd, dataset  # noqa: F401 (a fixture)


def _no_metadata(key):
  return None


def _tpu_vm(answers):
  """A fake metadata reader answering like the TPU VM metadata server."""
  return answers.get


@pytest.mark.parametrize("env, expected", [
    ({"JOVA_COORDINATOR": "10.0.0.1:8476", "JOVA_NUM_PROCESSES": "4", "JOVA_PROCESS_ID": "3"},
     mesh_lib.Startup("env", 4, 3, "10.0.0.1:8476", "JOVA_NUM_PROCESSES=4")),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     mesh_lib.Startup("env", 2, 1, "h0:1234", "JAX_NUM_PROCESSES=2")),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"},
     mesh_lib.Startup("slurm", 8, 5, None, "SLURM_NTASKS=8")),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "2"},
     mesh_lib.Startup("gke", 4, 2, None, "TPU_WORKER_HOSTNAMES lists 4 hosts x 1 slices")),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_WORKER_ID": "1", "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_SLICE_ID": "1"},
     mesh_lib.Startup("gke", 4, 3, None, "TPU_WORKER_HOSTNAMES lists 2 hosts x 2 slices")),
    ({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}, mesh_lib.Startup("none")),
    ({}, mesh_lib.Startup("none")),
])
def test_auto_detects_env_slurm_gke(env, expected):
  assert mesh_lib.detect_startup("auto", env=env, metadata=_no_metadata) == expected


def test_auto_detects_a_tpu_vm_from_its_metadata():
  """A plain TPU VM pod slice (no TPU_WORKER_HOSTNAMES): the metadata server lists the workers;
  a multi-slice job's tpu-env gives the slice."""
  metadata = _tpu_vm({"worker-network-endpoints": "a:0:10.0.0.2,b:1:10.0.0.3,c:2:10.0.0.4,"
                                                   "d:3:10.0.0.5",
                      "agent-worker-number": "1",
                      "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"})
  assert mesh_lib.detect_startup("auto", env={}, metadata=metadata) == mesh_lib.Startup(
      "tpu", 8, 5, None, "the TPU metadata lists 4 workers x 2 slices")
  single = _tpu_vm({"worker-network-endpoints": "a:0:10.0.0.2", "agent-worker-number": "0"})
  assert mesh_lib.detect_startup("auto", env={}, metadata=single).method == "none"
  assert mesh_lib.detect_startup("tpu", env={}, metadata=single).num_processes == 1


def test_explicit_method_needs_its_environment():
  with pytest.raises(UserError, match=r"--distributed=slurm: the environment shows no slurm job "
                                      r"\(expected SLURM_NTASKS\)"):
    mesh_lib.detect_startup("slurm", env={}, metadata=_no_metadata)
  with pytest.raises(UserError, match="JOVA_COORDINATOR is set but JOVA_PROCESS_ID not"):
    mesh_lib.detect_startup("env", env={"JOVA_COORDINATOR": "h:1", "JOVA_NUM_PROCESSES": "2"})
  # An explicit method wins over what auto would pick first.
  env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "TPU_WORKER_HOSTNAMES": "a,b,c"}
  assert mesh_lib.detect_startup("gke", env=env, metadata=_no_metadata).num_processes == 3


@pytest.mark.parametrize("env, method, num_processes, message", [
    ({"SLURM_NTASKS": "4"}, "none", None,
     r"--distributed=none: expected 4 processes \(SLURM_NTASKS=4\), found 1"),
    ({}, "auto", 2, r"--distributed=auto: expected 2 processes \(--num_processes=2\), found 1"),
])
def test_a_job_that_expects_several_processes_refuses_to_run_alone(monkeypatch, env, method,
                                                                   num_processes, message):
  monkeypatch.setattr(mesh_lib, "_started", None)
  for key in ("SLURM_NTASKS", "JOVA_COORDINATOR", "JAX_COORDINATOR_ADDRESS",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  with pytest.raises(UserError, match=message):
    mesh_lib.initialize_distributed(method, num_processes, metadata=_no_metadata)


@pytest.mark.parametrize("env, metadata, expected", [
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, {}, {"cluster_detection_method": "slurm"}),
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, {}, {"cluster_detection_method": "gketpu"}),
    ({}, {"worker-network-endpoints": "a,b,c,d", "agent-worker-number": "3"},
     {"cluster_detection_method": "gcetpu"}),
    ({"JOVA_COORDINATOR": "h:1", "JOVA_NUM_PROCESSES": "4", "JOVA_PROCESS_ID": "1"}, {},
     {"args": ("h:1", 4, 1)}),
])
def test_each_method_starts_jax_distributed_its_way(monkeypatch, env, metadata, expected):
  """What jax.distributed.initialize is given (a fake: no peers here) for each method."""
  calls = []
  monkeypatch.setattr(mesh_lib, "_started", None)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *args, **kw: calls.append(dict(kw, args=args) if args else kw))
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep this process's collectives
  for key in ("SLURM_NTASKS", "JOVA_COORDINATOR", "JAX_COORDINATOR_ADDRESS",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  startup = mesh_lib.initialize_distributed("auto", metadata=_tpu_vm(metadata))
  assert calls == [expected] and startup.num_processes == 4


_START = ("from absl import logging; logging.set_verbosity(logging.INFO); import jax; "
          "from jova_jax.parallel import mesh; s = mesh.initialize_distributed(); "
          "print('started', s.method, jax.process_index(), jax.process_count(), "
          "jax.local_device_count(), jax.device_count(), flush=True)")


@pytest.mark.xdist_group("multiprocess")
def test_two_processes_start_through_the_env_path():
  """The JAX_* env form, detected by auto: both processes join, see 2 x 2 devices, log once."""
  procs = two_processes([sys.executable, "-c", _START], 21000 + os.getpid() % 20000,
                        keys=("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for pid, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"started env {pid} 2 2 4" in out, out[-3000:]
    assert out.count("start-up env: process") == 1, out[-3000:]


def test_train_cli_refuses_to_train_alone(tmp_path):
  """--num_processes=2 on a lone process: one `error:` line, exit 2, nothing written."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JOVA_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                      "TPU_WORKER_HOSTNAMES")}
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", "jova_jax.train", "--config=configs/tiny.py",
                        f"--workdir={workdir}", "--num_processes=2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert ("error: --distributed=auto: expected 2 processes (--num_processes=2), found 1"
          in out.stderr), out.stderr[-3000:]
  assert not workdir.exists()


# ------------------------------------------------------------------ two-process runs

@pytest.mark.xdist_group("multiprocess")
def test_sigterm_on_one_host_stops_all_at_a_checked_step_and_resumes(dataset, tmp_path):
  """train.stop_check_every=3: a SIGTERM that reaches process 1 only stops both processes at
  the same multiple of 3, after saving; the same command resumes, each step once."""
  workdir = tmp_path / "run"
  overrides = {"data.dir": dataset, "data.read_threads": 1, "train.steps": 400,
               "train.log_every": 1, "train.stop_check_every": 3, "checkpoint.every_steps": 1000,
               "mesh.fsdp": -1}
  port = 22000 + os.getpid() % 20000
  procs = two_processes(_train_cmd(overrides, workdir), port)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.5)
  assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 143 and "stopped: SIGTERM: saved step" in out, out[-3000:]
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, read_only=True)
  stopped_at = ckpt.latest_step()
  ckpt.close()
  assert stopped_at is not None and stopped_at % 3 == 0 and 3 <= stopped_at < 400, stopped_at
  assert all(f"saved step {stopped_at} " in out for out in outs)
  overrides["train.steps"] = stopped_at + 2
  procs = two_processes(_train_cmd(overrides, workdir), port + 1)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(1, stopped_at + 3))


@pytest.mark.xdist_group("multiprocess")
def test_two_processes_sample_each_prompt_once(run_dir, pipeline, tmp_path):
  """5 prompts in global batches of 4 over 2 processes x 2 devices: each process writes the
  prompts of its batch rows (3 + 2), every prompt exactly once, the same audio as one process.
  """
  names = [f"p{i}" for i in range(5)]
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(dict(CAPTIONS, name=n, seed=i)) + "\n"
                             for i, n in enumerate(names)))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "jova_jax.sample", f"--workdir={run_dir[0]}",
         f"--prompts={prompts}", f"--outdir={out}", "--steps=2", "--batch_size=4",
         "--config.mesh.tensor=1"]
  procs = two_processes(cmd, 23000 + os.getpid() % 20000)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, text in zip(procs, outs):
    assert p.returncode == 0, text[-3000:]
  assert "wrote 3 samples" in outs[0] and "wrote 2 samples" in outs[1], outs
  assert sorted(os.listdir(out)) == sorted(f"{n}.{ext}" for n in names
                                           for ext in ("json", "mp4", "wav"))
  single = tmp_path / "single"
  prompt_list, _ = prompt_lib.read_prompts(str(prompts), default_seed=0, config=pipeline.config)
  generate.run(pipeline, prompt_list, str(single),
               sampler_lib.Settings.from_config(pipeline.config, steps=2), 4, log=lambda msg: None)
  # The same audio up to float reordering (mesh tensor 1 there, 2 here), far from any other prompt's.
  wave = {(d, n): media.read_wav(str(d / f"{n}.wav"))[0] for d in (out, single) for n in names}
  for n in names:
    gaps = {m: float(np.abs(wave[out, n] - wave[single, m]).max()) for m in names}
    others = min(g for m, g in gaps.items() if m != n)
    assert gaps[n] < 1e-2 and others > 5e-2, (n, gaps)


# ------------------------------------------------------------------ hybrid ICI x DCN meshes

def _losses(config, mesh, steps=3):
  program = train_state.build_program(config, mesh)
  state, step = train_state.init_state(program), train_steps.compile_train_step(program)
  batches = data_pipeline.make_train_iterator(config, mesh)
  losses = []
  for _ in range(steps):
    with jax.set_mesh(mesh):
      state, metrics = step(state, train_state.model_inputs(next(batches)))
    losses.append(float(metrics["loss"]))
  return losses


def test_two_slice_hybrid_mesh_trains_like_one_device():
  """mesh.dcn_data=2 over 8 fake devices: 2 "slices" (contiguous device groups, or an injected
  grouping) of fsdp=2 x tensor=2 each; the training losses equal the single-device run's."""
  config = load("tiny")
  config.data.source = "synthetic"
  config.mesh.update(dict(data=1, fsdp=2, context=1, tensor=2, dcn_data=2))
  assert mesh_lib.mesh_shape(config, 8) == dict(data=2, fsdp=2, context=1, tensor=2)
  mesh = mesh_lib.make_mesh(config)
  devices = jax.devices()
  assert {d.id for d in mesh.devices[0].flat} == {d.id for d in devices[:4]}  # slice 0
  odd_even = mesh_lib.make_mesh(config, slice_of=lambda d: d.id % 2)
  assert {d.id % 2 for d in odd_even.devices[1].flat} == {1}
  hybrid = _losses(config, mesh)

  single = config.copy_and_resolve_references()
  single.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1))
  reference = _losses(single, mesh_lib.make_mesh(single, devices=devices[:1]))
  np.testing.assert_allclose(hybrid, reference, rtol=1e-5)


def test_dcn_axes_multiply_the_per_slice_sizes():
  config = load("tiny")
  config.mesh.update(dict(data=1, fsdp=-1, context=1, tensor=2, dcn_fsdp=2))
  assert mesh_lib.mesh_shape(config, 8) == dict(data=1, fsdp=4, context=1, tensor=2)
  config.mesh.update(dcn_data=3, dcn_fsdp=1)
  with pytest.raises(UserError, match="3 slices cannot split 8 devices"):
    mesh_lib.mesh_shape(config, 8)


# ------------------------------------------------------------------ launchers

def _dry_run(script, args, **env):
  env = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))},
             DRY_RUN="1", **env)
  out = subprocess.run(["bash", script] + args, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_slurm_dry_run_prints_each_task_environment_and_command():
  out = _dry_run("launch/gpu_slurm.sbatch", ["--config=configs/jova_24b.py", "--workdir=/s/x"],
                 SLURM_JOB_NODELIST="gpu01,gpu02", SLURM_NTASKS="4", SLURM_SUBMIT_DIR=REPO)
  tasks = out.split("# task ")[1:]
  assert [t.splitlines()[0] for t in tasks] == ["0 on gpu01", "1 on gpu01", "2 on gpu02",
                                                "3 on gpu02"]
  for i, task in enumerate(tasks):
    lines = task.splitlines()
    assert "export JOVA_COORDINATOR=gpu01:8476" in lines and "export JOVA_NUM_PROCESSES=4" in lines
    assert f"export JOVA_PROCESS_ID={i}" in lines
    assert any(line.startswith("export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")
               for line in lines)
    assert lines[-1].strip() == ("python -m jova_jax.train --config=configs/jova_24b.py "
                                 "--workdir=/s/x")


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  out = _dry_run("launch/tpu_pod.sh", ["run", "--", "python", "-m", "jova_jax.train",
                                        "--workdir=gs://b/x"], TPU_NAME="pod", ZONE="z")
  lines = out.splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all --command=")
  assert "python\\ -m\\ jova_jax.train\\ --workdir=gs://b/x" in lines[0]
  assert "LIBTPU_INIT_ARGS" in lines[0]
