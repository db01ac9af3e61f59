"""Context-parallel training equals the unsharded sequence, in one process and across two."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jova_jax.training import checkpoint, loop
from tests.conftest import REPO, load


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def _tiny(**overrides):
  c = load("tiny")
  c.data.source = "synthetic"
  c.train.update(steps=3, log_every=1)
  c.checkpoint.update(every_steps=1000, async_save=False)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def unsharded_losses(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("context1"))
  loop.train(_tiny(**{"mesh.fsdp": 8, "mesh.context": 1}), workdir)
  return _losses(workdir)


@pytest.mark.parametrize("strategy,context", [("ring", 4), ("ulysses", 4), ("all_gather", 2)])
def test_context_sharded_training_matches_context_1(unsharded_losses, tmp_path, strategy, context):
  config = _tiny(**{"mesh.fsdp": 8 // context, "mesh.context": context,
                    "parallel.context_strategy": strategy})
  workdir = str(tmp_path / strategy)
  loop.train(config, workdir)
  np.testing.assert_allclose(_losses(workdir), unsharded_losses, rtol=2e-5)


@pytest.mark.xdist_group("multiprocess")
def test_local_multiprocess_launcher_trains_context_sharded(tmp_path):
  workdir = tmp_path / "mp"
  cmd = ["bash", "launch/local_multiprocess.sh", "2", "--", sys.executable, "-m", "jova_jax.train",
         "--config=configs/tiny.py", f"--workdir={workdir}", "--config.data.source=synthetic",
         "--config.train.steps=2", "--config.mesh.fsdp=-1", "--config.mesh.context=2",
         "--config.parallel.context_strategy=all_gather", "--config.checkpoint.every_steps=1000"]
  env = dict(os.environ, DEVICES_PER_PROCESS="4", LOG_DIR=str(tmp_path / "logs"))
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "on 2 processes" in out.stdout + out.stderr
  assert "'context': 2" in out.stdout + out.stderr
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1, read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()
