"""Samples while training (eval.sample_every_steps) and the contact sheet."""
import glob
import os
import struct

import cv2
import numpy as np
import pytest

from jova_jax.eval import contact_sheet
from jova_jax.media import io as media
from jova_jax.training import loop
from tests.conftest import load
from tests.datasets import write_random_dataset


def _events(workdir):
  """(tag, step, kind) of every summary value in the run's TensorBoard files."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for value in event.summary.value:
        out.append((value.tag, event.step, value.WhichOneof("value")))
  return out


@pytest.fixture(scope="module")
def previewed_run(tmp_path_factory):
  config = load("tiny")
  tmp = tmp_path_factory.mktemp("preview")
  config.data.update(dir=str(write_random_dataset(tmp / "ds", config, 8, 4)), read_threads=1)
  config.train.update(steps=4, log_every=2)
  config.eval.update(sample_every_steps=3, sample_prompts=2, sample_steps=2)
  workdir = str(tmp / "run")
  loop.train(config, workdir)
  return config, workdir


def test_samples_are_written_at_each_interval_and_at_the_end(previewed_run):
  config, workdir = previewed_run
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["3", "4"]
  for step in ("3", "4"):
    folder = os.path.join(workdir, "samples", step)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.mp4")))
    assert names == ["i2v_0.mp4", "i2v_1.mp4", "text_0.mp4", "text_1.mp4"]
    frames, fps = media.read_frames(os.path.join(folder, "i2v_0.mp4"))
    assert frames.shape == (config.video.frames, config.video.height, config.video.width, 3)
    assert fps == pytest.approx(config.video.fps)
    sheet = cv2.imread(os.path.join(folder, "contact_sheet.png"))
    assert sheet.shape[1] == config.video.frames * 64


def test_tensorboard_gets_the_sheet_and_the_audio(previewed_run):
  _, workdir = previewed_run
  events = _events(workdir)
  images = {(tag, step) for tag, step, kind in events if kind == "image"}
  audio = {(tag, step) for tag, step, kind in events if kind == "audio"}
  assert images == {("samples/contact_sheet", 3), ("samples/contact_sheet", 4)}
  assert {tag for tag, _ in audio} == {"samples/i2v_0", "samples/i2v_1", "samples/text_0",
                                       "samples/text_1"}


def test_contact_sheet_layout():
  frames = np.zeros((5, 16, 16, 3), np.uint8)
  frames[:, 4:12, 4:12] = 200
  t = np.arange(16000) / 16000
  wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  with_ref = contact_sheet.SheetEntry("a", frames, wave, 16000, reference=frames[:1])
  plain = contact_sheet.SheetEntry("b", frames, None)
  sheet = contact_sheet.render([with_ref, plain], cell=32)
  label, mel, gap = contact_sheet.LABEL_HEIGHT, contact_sheet.MEL_HEIGHT, contact_sheet.GAP
  assert sheet.shape == (2 * (label + 32 + gap) + label + 32 + mel, 5 * 32, 3)
  # The first sample's frames sit under its label, pixel for pixel (nearest scaling).
  row = sheet[label:label + 32]
  assert row[16, 16].tolist() == [200, 200, 200] and row[2, 2].tolist() == [0, 0, 0]
  # A 440 Hz tone lights one band of the spectrogram, not the whole strip.
  strip = sheet[2 * label + 64:2 * label + 64 + mel].astype(float).mean(axis=(1, 2))
  assert strip.max() > 3 * np.median(strip)
