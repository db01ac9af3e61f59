"""data_prep.make_demo_corpus: playable clips with captions, lips that follow the speech."""
import json
import os
import re
import subprocess
import sys
import time

import imageio_ffmpeg
import numpy as np
import pytest

from jova_jax.media import faces
from jova_jax.media import io as media
from tests.conftest import REPO

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
FPS, SECONDS, SIZE = 8, 2.5, 160
NUM_FRAMES = 20  # 2.5 s at 8 fps
AUDIO_RATE = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  subprocess.run([sys.executable, "-m", "data_prep.make_demo_corpus", f"--out={out}",
                  "--num_clips=2", "--seed=3", f"--fps={FPS}", f"--seconds={SECONDS}",
                  f"--size={SIZE}", "--with_bad_clips"], cwd=REPO, check=True)
  return out


def _read_frames(path):
  return media.read_frames(str(path))[0]


def _read_audio(path):
  result = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
                           "-ar", str(AUDIO_RATE), "pipe:1"], capture_output=True, check=True)
  return np.frombuffer(result.stdout, np.float32)


def _streams(path):
  # `ffmpeg -i` with no output exits 1 but describes the streams on stderr.
  result = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True)
  return re.findall(r"Stream #\S+: (Video|Audio): (\w+)", result.stderr)


def _rms_per_frame(samples, num_frames):
  # Independent of the corpus code: RMS over the 1/FPS s window centred on each frame's time.
  hop = AUDIO_RATE // FPS
  padded = np.pad(samples, (hop // 2, hop))
  return np.array([np.sqrt(np.mean(padded[k * hop:(k + 1) * hop] ** 2))
                   for k in range(num_frames)])


def test_clips_have_the_expected_video_audio_and_captions(corpus):
  for name in ("clip_00000", "clip_00001"):
    frames = _read_frames(corpus / f"{name}.mp4")
    assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3)
    assert sorted(_streams(corpus / f"{name}.mp4")) == [("Audio", "aac"), ("Video", "h264")]
    audio = _read_audio(corpus / f"{name}.mp4")
    assert abs(audio.size - SECONDS * AUDIO_RATE) < 0.05 * AUDIO_RATE
    assert np.abs(audio).max() > 0.1  # speech, not silence
    sidecar = json.loads((corpus / f"{name}.json").read_text())
    assert set(sidecar) == {"video_caption", "audio_caption", "transcript"}
    assert all(isinstance(v, str) and len(v) > 5 for v in sidecar.values())


def test_lips_follow_the_speech(corpus):
  tracker = faces.MouthTracker(detect_every=1)
  for name in ("clip_00000", "clip_00001"):
    path = corpus / f"{name}.mp4"
    track = tracker.track(_read_frames(path))
    assert track.face_frac == 1.0
    assert (track.face_boxes[:, 2] - track.face_boxes[:, 0]).min() >= 80
    opening = track.mouth_opening()
    loudness = _rms_per_frame(_read_audio(path), NUM_FRAMES)
    correlation = np.corrcoef(opening, loudness)[0, 1]
    assert correlation > 0.5, (name, correlation, opening.round(2), loudness.round(3))
    # The mouth really moves: loud frames open it well beyond the quiet ones.
    assert opening.max() - opening.min() > 0.08
    # The speaker pauses mid-sentence: silent frames between speech, where the lips close.
    speaking = np.flatnonzero(loudness > 0.05 * loudness.max())
    inside = np.arange(speaking[0], speaking[-1] + 1)
    paused = inside[loudness[inside] < 0.05 * loudness.max()]
    assert paused.size >= 2, (name, loudness.round(3))
    assert opening[paused].mean() < np.median(opening[speaking]) - 0.05, (name, opening.round(2))


def test_sentences_split_at_a_word_boundary_for_the_pause():
  from data_prep.make_demo_corpus import spoken_in_two_parts
  assert spoken_in_two_parts("Open the hatch very slowly.", 0.5) == ("Open the", "hatch very slowly.")
  # Both parts keep at least one word whatever the fraction.
  assert spoken_in_two_parts("Hello there.", 0.0) == ("Hello", "there.")
  assert spoken_in_two_parts("Hello there.", 1.0) == ("Hello", "there.")


def test_bad_clips_are_bad_in_their_own_way(corpus):
  names = sorted(p.name for p in corpus.iterdir() if p.suffix == ".mp4")
  assert names == ["clip_00000.mp4", "clip_00001.mp4", "clip_00002_corrupt.mp4",
                   "clip_00003_no_audio.mp4", "clip_00004_faceless.mp4",
                   "clip_00005_too_short.mp4"]
  assert all(os.path.exists(corpus / n.replace(".mp4", ".json")) for n in names)
  with pytest.raises(media.MediaError, match="OpenCV cannot open it"):
    _read_frames(corpus / "clip_00002_corrupt.mp4")
  assert _streams(corpus / "clip_00003_no_audio.mp4") == [("Video", "h264")]
  faceless = _read_frames(corpus / "clip_00004_faceless.mp4")
  assert faceless.shape == (NUM_FRAMES, SIZE, SIZE, 3)
  assert faces.MouthTracker(detect_every=4).track(faceless).face_frac == 0.0
  assert len(_read_frames(corpus / "clip_00005_too_short.mp4")) == 8  # 1 s < 17 frames



def test_the_breathy_voices_say_the_same_in_every_process():
  """espeak-ng's female variants add breath noise from a generator that starts differently in
  each process (with the clock's second): unseeded, two `make demo` runs trained on different
  corpora (4 of the first 12 clips differed). The same utterances must give the same samples in
  two processes."""
  code = ("import hashlib; from data_prep import speech; s = speech.Synthesizer(); "
          "print(hashlib.sha256(b''.join(s.synthesize(t, v).tobytes() for t, v in ["
          "('The rocket launch is set for noon.', 'en-gb-x-rp+f3'), "
          "('Please check the oxygen levels.', 'en-us+f2')])).hexdigest())")
  runs = []
  for _ in range(2):
    runs.append(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.strip())
    time.sleep(1.1)  # unseeded, processes started within the same second drew alike
  assert len(runs[0]) == 64 and runs[0] == runs[1]
