"""The README's main command (`make demo` -> data_prep/run_demo.sh) in miniature: every stage
runs for real (corpus, prepare, train, sample, sync score), with 8 clips, 4 training steps and
2 ODE steps, from a relative output folder as `make demo` uses it."""
import os
import subprocess
import sys

import cv2
import pytest

from jova_jax.training import checkpoint
from tests.conftest import REPO, load


@pytest.mark.slow
@pytest.mark.xdist_group("multiprocess")
def test_demo_script_runs_every_stage(tmp_path):
  out_dir = os.path.relpath(tmp_path / "demo", REPO)
  env = dict(os.environ, DEMO_NUM_CLIPS="8",
             DEMO_TRAIN_FLAGS="--config.train.steps=4 --config.train.batch_size=2 "
                              "--config.checkpoint.every_steps=2 "
                              "--config.eval.every_steps=2 --config.train.log_every=2",
             DEMO_SAMPLE_FLAGS="--steps=2",
             # One CPU device, as on a user's machine (the suite's 8 fake devices are for tests).
             XLA_FLAGS="")
  run = subprocess.run(["bash", "data_prep/run_demo.sh", sys.executable, out_dir], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  log = run.stdout + run.stderr
  assert run.returncode == 0, log[-4000:]
  for stage in range(1, 6):
    assert f"== {stage}/5" in run.stdout
  demo = tmp_path / "demo"
  assert len(list((demo / "corpus").glob("clip_*.mp4"))) == 8
  with checkpoint.Checkpointer(demo / "run" / "checkpoints", every_steps=1, keep=1,
                               read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 4]
  videos = sorted((demo / "samples").glob("*.mp4"))
  assert videos and all(v.name in run.stdout for v in videos)  # listed at the end
  video = load("demo").video
  capture = cv2.VideoCapture(str(videos[0]))
  assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == video.frames
  assert int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == video.width
  capture.release()
  assert (demo / "samples" / (videos[0].stem + ".wav")).is_file()
  assert list((demo / "references").glob("*.mp4"))  # the held-out clips, decoded
  # The summary: faces found in generated and reference videos, both lip-sync lines, the sheet.
  assert "SUMMARY generated: a face in" in run.stdout
  assert "SUMMARY references: a face in" in run.stdout
  assert "references own audio peak" in " ".join(run.stdout.split())
  sheet = cv2.imread(str(demo / "contact_sheet.png"))
  assert sheet is not None and sheet.shape[1] >= video.frames * 64
