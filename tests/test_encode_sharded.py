"""Issue 13: prepare's encoders split each batch over all local devices (8 fake CPU devices
here) and give the same latents and text embeddings as on one device."""
import jax
import numpy as np
import pytest

from data_prep import encode
from tests.test_pretrained_prepare import _config, _weights_dir

BATCH = 8


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return _config(_weights_dir(tmp_path_factory.mktemp("weights")))


def _inputs(config):
  rng = np.random.default_rng(0)
  v, a = config.video, config.audio
  frames = [rng.integers(0, 256, (v.frames, v.height, v.width, 3), np.uint8) for _ in range(5)]
  seconds = v.frames / v.fps
  waves = [rng.uniform(-0.5, 0.5, int(seconds * a.sample_rate)).astype(np.float32)
           for _ in range(5)]
  masks = [rng.integers(0, 2, (v.frames, v.height, v.width)).astype(bool) for _ in range(5)]
  prompts = ["a woman speaks", "rain on a roof, then a man says hello", "x", "a dog", "bells"]
  return frames, waves, masks, prompts


@pytest.mark.xdist_group("encode_weights")
def test_encoders_shard_the_batch_over_local_devices_and_match_one_device(config):
  assert jax.local_device_count() == 8
  frames, waves, masks, prompts = _inputs(config)
  everywhere = encode.Encoders(config, BATCH)
  one = encode.Encoders(config, BATCH, devices=jax.local_devices()[:1])
  # The jitted encoders ran split over the devices: their outputs are batch-sharded.
  for latents in (everywhere.encode_video(frames), everywhere.encode_audio(waves)):
    assert len(latents.sharding.device_set) == 8
    assert latents.addressable_shards[0].data.shape[0] == BATCH // 8
  assert len(one.encode_video(frames).sharding.device_set) == 1
  for got, want in zip(everywhere.media(frames, waves, masks), one.media(frames, waves, masks)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for got, want in zip(everywhere.prompts(prompts), one.prompts(prompts)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.xdist_group("encode_weights")
def test_encoder_batch_rounds_up_to_a_multiple_of_the_devices(config):
  assert encode.Encoders(config, 5).batch_size == 8
  assert encode.Encoders(config, 5, devices=jax.local_devices()[:1]).batch_size == 5


def test_bench_codecs_reports_prepare_throughput_per_device():
  import re
  import subprocess
  import sys

  from tests.conftest import REPO
  result = subprocess.run([sys.executable, "-m", "jova_jax.bench", "codecs",
                           "--config=configs/tiny.py", "--steps=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  line = re.search(r"prepare encode .*?8 clips over 8 cpu devices per call\): ([\d.]+) clips/s "
                   r"per device, (\d+) clips/hour per host", result.stdout)
  assert line, result.stdout
  per_device, per_hour = float(line.group(1)), int(line.group(2))
  assert per_device > 0 and abs(per_hour - 3600 * 8 * per_device) <= 0.01 * per_hour + 1
