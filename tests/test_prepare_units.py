"""data_prep's pieces on their own: clip decoding and resampling (media/io.py, the one reader
prepare, the sampler and eval.sync share), the crop box, the eval split hash, the input
manifest and its captions."""
import hashlib
import json
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from data_prep import manifest
from jova_jax.media import io as media
from jova_jax.text.base import structured_prompt

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _encode_raw(path, frames, fps, audio=None, sample_rate=16000):
  """Writes uint8 gray frames (N,H,W) (+ int16 mono audio) losslessly into a .mkv with ffmpeg."""
  n, h, w = frames.shape
  cmd = [FFMPEG, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{w}x{h}",
         "-r", str(fps), "-i", "pipe:0"]
  if audio is not None:
    raw = path + ".pcm"
    audio.astype("<i2").tofile(raw)
    cmd += ["-f", "s16le", "-ar", str(sample_rate), "-ac", "1", "-i", raw, "-c:a", "pcm_s16le"]
  cmd += ["-c:v", "ffv1", "-pix_fmt", "gray", path]
  subprocess.run(cmd, input=frames.tobytes(), check=True)


def test_resampling_picks_the_nearest_frame_by_timestamp(tmp_path):
  # 25 fps source whose frame i has gray level 5*i; at 8 fps frame k is at k/8 s, nearest
  # source frame floor(k*25/8 + 0.5).
  levels = 5 * np.arange(40, dtype=np.uint8)
  path = str(tmp_path / "ramp.mkv")
  _encode_raw(path, np.broadcast_to(levels[:, None, None], (40, 8, 8)).copy(), 25)
  got, fps = media.read_frames(path, fps=8.0, frames=12)
  assert got.shape == (12, 8, 8, 3) and fps == 8.0
  want = 5 * np.floor(np.arange(12) * 25 / 8 + 0.5)
  np.testing.assert_array_equal(got[:, 0, 0, 0], want)
  with pytest.raises(media.MediaError) as e:  # 40 frames at 25 fps = 1.6 s < 14 / 8 s
    media.read_frames(path, fps=8.0, frames=14)
  assert e.value.reason == "too_short"
  # Without fps: every source frame at the source rate (eval.sync); without frames: to the end.
  every, fps = media.read_frames(path)
  np.testing.assert_array_equal(every[:, 0, 0, 0], levels)
  assert fps == 25.0
  whole, _ = media.read_frames(path, fps=8.0)
  assert len(whole) == 13  # 1.6 s: times 0 .. 12/8 s


def test_audio_is_cut_from_the_clip_start(tmp_path):
  rate = 16000
  t = np.arange(rate) / rate
  wave = (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t) * 32767).astype(np.int16)
  path = str(tmp_path / "tone.mkv")
  _encode_raw(path, np.zeros((25, 8, 8), np.uint8), 25, audio=wave, sample_rate=rate)
  got = media.read_audio(path, rate, 12345)
  assert got.shape == (12345,) and got.dtype == np.float32
  np.testing.assert_allclose(got, wave[:12345] / 32768.0, atol=1e-4)
  with pytest.raises(media.MediaError) as e:
    media.read_audio(path, rate, 2 * rate)
  assert e.value.reason == "too_short"
  silent = str(tmp_path / "silent.mkv")
  _encode_raw(silent, np.zeros((25, 8, 8), np.uint8), 25)
  with pytest.raises(media.MediaError) as e:
    media.read_audio(silent, rate, 100)
  assert e.value.reason == "no_audio"


def test_crop_box():
  # No face: the largest centred crop with the output aspect.
  assert media.crop_box((72, 96), (64, 64)) == (12, 0, 84, 72)
  assert media.crop_box((72, 96), (32, 64)) == (0, 12, 96, 60)
  # Face 20x30 at (40,20): side 30 * (1 + 2*0.5) = 60 around the centre (50, 35), shifted inside.
  assert media.crop_box((72, 96), (64, 64), (40, 20, 60, 50), margin=0.5) == (20, 5, 80, 65)
  assert media.crop_box((72, 96), (64, 64), (0, 0, 20, 30), margin=0.5) == (0, 0, 60, 60)
  # A face larger than the frame allows: the crop shrinks to the frame height.
  assert media.crop_box((72, 96), (64, 64), (30, 0, 90, 70), margin=0.5) == (24, 0, 96, 72)


def test_splits_are_a_hash_of_the_clip_id():
  ids = [f"clip_{i:05d}" for i in range(40)]
  unit = {c: int(hashlib.sha256(c.encode()).hexdigest()[:16], 16) / 2**64 for c in ids}
  splits = manifest.assign_splits(ids, 0.25)
  assert {c for c, s in splits.items() if s == "eval"} == {c for c in ids if unit[c] < 0.25}
  few = manifest.assign_splits(ids[:5], 1e-9)  # >= 5 clips: at least one in eval
  assert [c for c, s in few.items() if s == "eval"] == [min(ids[:5], key=unit.get)]
  assert set(manifest.assign_splits(ids[:4], 1e-9).values()) == {"train"}
  assert manifest.assign_splits(ids, 0.0) == {c: "train" for c in ids}


def test_manifest_inputs_and_captions(tmp_path):
  for name in ("b", "a", "c"):
    (tmp_path / f"{name}.mp4").write_bytes(b"")
  (tmp_path / "a.json").write_text(json.dumps(
      {"video_caption": "a man talks", "audio_caption": "calm voice", "transcript": "hi"}))
  (tmp_path / "b.json").write_text(json.dumps({"video_caption": "x", "transcript": "hi"}))
  entries = manifest.read_inputs(str(tmp_path))
  assert [e.clip_id for e in entries] == ["a", "b", "c"]
  assert manifest.caption_problem(entries[0]) == ""
  assert "audio_caption" in manifest.caption_problem(entries[1])
  assert "no caption sidecar" in manifest.caption_problem(entries[2])
  assert structured_prompt(entries[0].captions) == (
      "<Video Caption>: a man talks <Audio Caption>: calm voice <Transcript>: hi")
  jsonl = tmp_path / "m.jsonl"
  jsonl.write_text(json.dumps({"path": "a.mp4", "clip_id": "x1", "video_caption": "v",
                               "audio_caption": "a", "transcript": ""}) + "\n\n")
  (entry,) = manifest.read_inputs(str(jsonl))
  assert entry.clip_id == "x1" and entry.path == str(tmp_path / "a.mp4")
  assert manifest.caption_problem(entry) == ""
  jsonl.write_text('{"video_caption": "no path"}\n')
  with pytest.raises(manifest.ManifestError, match="m.jsonl:1"):
    manifest.read_inputs(str(jsonl))
  jsonl.write_text('{"path": "a.mp4"}\n\n{"path": \n')
  with pytest.raises(manifest.ManifestError, match="m.jsonl:3: not valid JSON"):
    manifest.read_inputs(str(jsonl))
  assert [e.clip_id for e in manifest.shard_entries(entries, 2, 1)] == ["b"]
