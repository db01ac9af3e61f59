"""The lip-sync score (jova_jax/eval/sync.py): offsets on synthetic series, and ground-truth
demo clips (lips driven by their speech) ranked above the same clips with another's audio."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jova_jax.eval import sync
from tests.conftest import REPO


@pytest.fixture(scope="session")
def demo_clips(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_clips")
  subprocess.run([sys.executable, "-m", "data_prep.make_demo_corpus", f"--out={out}",
                  "--num_clips=4"], cwd=REPO, check=True, capture_output=True, timeout=300)
  return str(out)


def test_offset_correlations_against_numpy():
  rng = np.random.default_rng(0)
  mouth = rng.standard_normal(40)
  envelope = rng.standard_normal(40)
  got = sync.offset_correlations(mouth, envelope, 3)
  for i, k in enumerate(range(-3, 4)):
    lo, hi = max(0, -k), min(40, 40 - k)
    np.testing.assert_allclose(got[i], np.corrcoef(mouth[lo:hi], envelope[lo + k:hi + k])[0, 1],
                               atol=1e-12)


def test_finds_a_known_delay():
  rng = np.random.default_rng(1)
  lips = np.convolve(rng.random(60), np.ones(3) / 3, mode="same")
  audio = np.roll(lips, 2) + 0.05 * rng.standard_normal(60)  # the audio comes 2 frames later
  lips[[5, 6, 30]] = np.nan  # frames without a face are interpolated over
  score = sync.score_series(lips, audio, max_offset=4)
  assert score.offset == 2
  assert score.peak > 0.9
  np.testing.assert_allclose(score.confidence, score.peak - np.median(score.correlations),
                             atol=1e-3)


def test_offsets_searched_stay_a_small_share_of_the_clip():
  assert sync.max_offset_frames(0.5, fps=8, num_frames=17) == 2    # the demo: not 4 of 17
  assert sync.max_offset_frames(0.5, fps=25, num_frames=250) == 12  # 10 s: the 0.5 s bound
  assert sync.max_offset_frames(0.5, fps=8, num_frames=5) == 1


def test_envelope_is_rms_per_frame():
  wave = np.zeros(1600, np.float32)
  wave[600:1000] = 0.5
  env = sync.audio_envelope(wave, sample_rate=1000, fps=10, num_frames=16)
  # Frame k covers samples [100k - 50, 100k + 50).
  expected = [np.sqrt(np.mean(np.square(wave[max(0, 100 * k - 50):100 * k + 50])))
              for k in range(16)]
  np.testing.assert_allclose(env, expected)


def test_ground_truth_beats_shuffled_audio(demo_clips):
  paths = sync.video_paths(demo_clips)
  assert len(paths) == 4
  report = sync.score_videos(paths, shuffle_control=True)
  for clip in report["clips"]:
    assert "error" not in clip, clip
    assert clip["score"]["offset"] == 0, clip
    assert clip["score"]["peak"] > clip["control"]["peak"], clip
    assert clip["score"]["confidence"] > clip["control"]["confidence"], clip
    # The control is every other clip's audio.
    assert len(clip["control"]["audios"]) == 3 and clip["video"] not in clip["control"]["audios"]
  mean = report["mean"]
  assert mean["score"]["confidence"] > mean["control"]["confidence"] + 0.15, mean
  own_minus_control = [c["score"]["peak"] - c["control"]["peak"] for c in report["clips"]]
  np.testing.assert_allclose(mean["margin"]["peak"], np.mean(own_minus_control), atol=1e-3)
  np.testing.assert_allclose(mean["margin"]["stderr"],
                             np.std(own_minus_control, ddof=1) / 2.0, atol=1e-3)
  assert mean["margin"]["videos"] == 4


def test_cli_and_errors(demo_clips, tmp_path):
  clip = os.path.join(demo_clips, "clip_00000.mp4")
  result = subprocess.run(
      [sys.executable, "-m", "jova_jax.eval.sync", f"--video={clip}", "--shuffle_control",
       f"--control_audio={os.path.join(demo_clips, 'clip_00001.mp4')}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert lines[0]["video"] == clip and lines[0]["score"]["offset"] == 0
  assert [os.path.basename(a) for a in lines[0]["control"]["audios"]] == ["clip_00001.mp4"]
  with pytest.raises(FileNotFoundError, match="nothing.mp4"):
    sync.video_paths(str(tmp_path / "nothing.mp4"))
  with pytest.raises(ValueError, match="control_audio"):
    sync.score_videos([clip], shuffle_control=True)
  # A corrupt neighbour loses its own score and the control, never the good video's score.
  corrupt = tmp_path / "corrupt.mp4"
  corrupt.write_bytes(b"not a video")
  good, bad = sync.score_videos([clip, str(corrupt)], shuffle_control=True)["clips"]
  assert good["score"]["offset"] == 0 and "corrupt.mp4" in good["control_error"]
  assert "corrupt.mp4" in bad["error"] and "score" not in bad
  # Among several others, a corrupt one is left out of the control's average.
  other = os.path.join(demo_clips, "clip_00001.mp4")
  good = sync.score_videos([clip, str(corrupt), other], shuffle_control=True)["clips"][0]
  assert good["control"]["audios"] == [other] and "control_error" not in good
