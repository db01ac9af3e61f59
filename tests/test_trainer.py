"""The trainer: exact resume, restore onto another mesh, multi-process, SIGTERM, non-finite
steps, clear errors. (That training learns is tests/test_learning.py's job.)"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jova_jax.data import features, pipeline
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import checkpoint, loop, state as train_state, steps as train_steps
from tests.conftest import REPO, load, truncate_array_files, two_processes
from tests.datasets import write_random_dataset


def tiny(dataset_dir, **mesh):
  c = load("tiny")
  c.data.dir = str(dataset_dir)
  c.data.read_threads = 1
  c.mesh.update({**dict(data=1, fsdp=8, context=1, tensor=1), **mesh})
  c.train.update(steps=4, log_every=1)
  c.checkpoint.update(every_steps=2, keep=5, async_save=False)
  return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return write_random_dataset(tmp_path_factory.mktemp("ds"), load("tiny"), 24, 8)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _restore(workdir, config, step=None):
  mesh = mesh_lib.make_mesh(config)
  program = train_state.build_program(config, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1,
                                 read_only=True)
  state, data_state, _ = ckpt.restore(program.abstract_state, step)
  ckpt.close()
  return jax.device_get(state), data_state


def test_resume_is_exact(dataset, tmp_path):
  config = tiny(dataset)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  loop.train(config, straight)
  half = config.copy_and_resolve_references()
  half.train.steps = 2
  loop.train(half, resumed)
  loop.train(config, resumed)  # picks up at step 2
  # config.json is the config that ran last; the one it replaced is kept beside it.
  with open(os.path.join(resumed, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 4
  with open(os.path.join(resumed, "config.before_step_2.json")) as f:
    assert json.load(f)["train"]["steps"] == 2

  a, data_a = _restore(straight, config)
  b, data_b = _restore(resumed, config)
  assert int(a["step"]) == int(b["step"]) == 4
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
  assert data_a == data_b  # the same position in the same example order
  losses_a = [m["loss"] for m in _metrics(straight)]
  losses_b = [m["loss"] for m in _metrics(resumed)]  # the resumed run appended
  np.testing.assert_allclose(losses_b, losses_a, rtol=1e-6)

  # The examples after the resume point are the ones the uninterrupted run saw next.
  _, data_mid = _restore(resumed, config, step=2)
  mesh = mesh_lib.make_mesh(config)
  ref = pipeline.make_train_iterator(config, mesh)
  expected = [np.asarray(next(ref)["record_index"]) for _ in range(4)][2:]
  it = pipeline.make_train_iterator(config, mesh)
  it.set_state(data_mid)
  np.testing.assert_array_equal([np.asarray(next(it)["record_index"]) for _ in range(2)], expected)


def test_checkpoint_restores_onto_another_mesh(dataset, tmp_path):
  config = tiny(dataset)
  config.train.steps = 3
  first = str(tmp_path / "fsdp8")
  loop.train(config, first)
  # Continue from step 2 of that run on (data=2, fsdp=2, tensor=2).
  other = str(tmp_path / "mesh222")
  os.makedirs(os.path.join(other, "checkpoints"))
  shutil.copytree(os.path.join(first, "checkpoints", "2"), os.path.join(other, "checkpoints", "2"))
  moved = tiny(dataset, data=2, fsdp=2, tensor=2)
  moved.train.steps = 3
  loop.train(moved, other)
  loss_first = [m["loss"] for m in _metrics(first) if m["step"] == 3]
  loss_moved = [m["loss"] for m in _metrics(other) if m["step"] == 3]
  np.testing.assert_allclose(loss_moved, loss_first, rtol=1e-5)


def test_nonfinite_steps_are_skipped_then_stop(dataset, tmp_path):
  config = tiny(dataset)
  config.train.update(steps=10, max_nonfinite=3)
  config.loss.lambda_audio = float("inf")  # every loss non-finite (a NaN lr is refused by validate)
  config.checkpoint.every_steps = 1
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.TrainingDiverged, match=r"3 non-finite steps in a row.*max_nonfinite=3"):
    loop.train(config, workdir)
  # Nothing after the bad steps was saved; what was saved still holds the initial params.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=1,
                                 read_only=True)
  assert ckpt.latest_step() is None or ckpt.latest_step() < 3
  ckpt.close()


def test_clear_errors_name_the_offending_item(dataset, tmp_path):
  config = tiny(tmp_path / "missing")
  with pytest.raises(features.DatasetError, match="missing"):
    loop.train(config, str(tmp_path / "w1"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(features.DatasetError, match="empty"):
    loop.train(tiny(empty), str(tmp_path / "w2"))
  wrong = tiny(dataset)
  wrong.text.width = 128
  with pytest.raises(features.DatasetError, match="128"):
    loop.train(wrong, str(tmp_path / "w3"))
  # Refused before anything is written (the command-line cases: tests/test_cli.py).
  assert not any((tmp_path / w).exists() for w in ("w1", "w2", "w3"))


def _train_cmd(config_overrides, workdir):
  return [sys.executable, "-m", "jova_jax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in config_overrides.items()]


def test_sigterm_stops_a_set_e_script_and_the_run_resumes(dataset, tmp_path):
  """SIGTERM saves, exits 143 and so stops a `set -e` script before its next stage; the same
  script then resumes and finishes, each step once in metrics.jsonl."""
  workdir = tmp_path / "sig"
  overrides = {"data.dir": dataset, "data.read_threads": 1, "train.steps": 400,
               "train.log_every": 1, "checkpoint.every_steps": 1000}
  script = tmp_path / "stages.sh"
  script.write_text('set -e\n"$@"\ntouch "$NEXT_STAGE"\n')  # a training stage, then the next
  next_stage = tmp_path / "next_stage"
  env = dict(os.environ, NEXT_STAGE=str(next_stage))
  proc = subprocess.Popen(["bash", "-e", str(script)] + _train_cmd(overrides, workdir), cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stdout.read()
  with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
    os.kill(int(f.read().split()[0]), signal.SIGTERM)  # the trainer, not the shell
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143 and "stopped: SIGTERM: saved step" in out, out[-3000:]
  assert not next_stage.exists()
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, read_only=True)
  stopped_at = ckpt.latest_step()
  ckpt.close()
  assert stopped_at is not None and 3 <= stopped_at < 400
  # The same script resumes, finishes a few more steps and goes on to its next stage.
  overrides["train.steps"] = stopped_at + 2
  out = subprocess.run(["bash", "-e", str(script)] + _train_cmd(overrides, workdir), cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and next_stage.exists(), out.stderr[-3000:]
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps == list(range(1, stopped_at + 3))


def test_truncated_latest_checkpoint_resumes_from_the_step_before(dataset, tmp_path, caplog):
  """A disk that filled up while step 4 was written: the rerun warns, resumes from step 2 with
  the first run's losses, saves step 4 again and keeps each step once in metrics.jsonl."""
  config = tiny(dataset)  # 4 steps, checkpoints at 2 and 4
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)
  first = _metrics(workdir)
  truncate_array_files(os.path.join(workdir, "checkpoints", "4"))
  with caplog.at_level(logging.WARNING):
    loop.train(config, workdir)
  assert "checkpoints/4 does not restore" in caplog.text, caplog.text
  assert "resuming from step 2" in caplog.text
  again = _metrics(workdir)
  assert [m["step"] for m in again] == [1, 2, 3, 4]
  np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in first], rtol=1e-6)
  assert os.path.isdir(os.path.join(workdir, checkpoint.BROKEN_DIR, "4"))
  state, _ = _restore(workdir, config)
  assert int(state["step"]) == 4


@pytest.mark.xdist_group("multiprocess")
def test_two_processes_train_on_disjoint_slices(dataset, tmp_path):
  workdir = tmp_path / "mp"
  overrides = {"data.dir": dataset, "data.read_threads": 1, "train.steps": 3,
               "checkpoint.every_steps": 1000, "mesh.fsdp": -1}
  procs = two_processes(_train_cmd(overrides, workdir), 20000 + os.getpid() % 20000, devices=4)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2" in outs[1] or "on 2 processes" in outs[0]
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, read_only=True)
  assert ckpt.all_steps() == [3]
  config = ckpt.restore_config()
  ckpt.close()
  assert config["train"]["steps"] == 3
  # The two processes' slices of the same 3 steps never share an example.
  c = tiny(dataset)
  mesh = mesh_lib.make_mesh(c)
  seen = []
  for pid in range(2):
    ds = pipeline.train_dataset(c, pipeline.open_source(c, "train"), seed=0, process_index=pid,
                                process_count=2)
    it = iter(ds)
    seen.append({int(i) for _ in range(3) for i in next(it)["record_index"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  del mesh


def test_a_split_smaller_than_the_batch_trains_and_evaluates(tmp_path):
  # 2 train and 3 eval examples, global batch 8: training repeats the split within a batch;
  # eval pads its one batch with 5 repeats that do not count.
  config = tiny(write_random_dataset(tmp_path / "ds", load("tiny"), 2, 3))
  mesh = mesh_lib.make_mesh(config)
  batch = next(iter(pipeline.make_train_iterator(config, mesh)))
  _, counts = np.unique(np.asarray(batch["video"]).reshape(8, -1), axis=0, return_counts=True)
  np.testing.assert_array_equal(counts, [4, 4])
  (padded,) = list(pipeline.make_eval_iterator(config, mesh))
  np.testing.assert_array_equal(np.asarray(padded["example_valid"]), [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(padded["record_index"]), [0, 1, 2, 0, 1, 2, 0, 1])
  program = train_state.build_program(config, mesh)
  params = train_state.init_state(program)["params"]
  eval_step = train_steps.compile_eval_step(program)
  got = loop.run_eval(eval_step, params, [padded], mesh)
  rows = {k: np.asarray(v) for k, v in padded.items()}
  # The padding rows changed to anything leave the losses as they are...
  garbage = dict(rows, video=np.where(rows["example_valid"][:, None, None, None, None],
                                      rows["video"], 1e3).astype(np.float32))
  assert loop.run_eval(eval_step, params, [pipeline.to_global(garbage, mesh)], mesh) == got
  # ...and the loss is the mean of the 3 real examples' own losses.
  singles = []
  for i in range(3):
    one = {k: np.stack([v[i]] * 8) for k, v in rows.items()}
    one["example_valid"] = np.arange(8) == i  # row i: the same fixed noise as in `padded`
    singles.append(loop.run_eval(eval_step, params, [pipeline.to_global(one, mesh)],
                                 mesh)["eval_loss_video"])
  assert got["eval_loss_video"] == pytest.approx(np.mean(singles), rel=1e-4)
