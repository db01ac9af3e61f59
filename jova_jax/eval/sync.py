r"""Lip-sync score with no downloaded weights: mouth opening vs speech loudness.

  python -m jova_jax.eval.sync --video=out.mp4
  python -m jova_jax.eval.sync --video=OUT_DIR --shuffle_control

Per video frame: the mouth opening from dlib's 68 landmarks (faces.MouthTracker ->
FaceTrack.mouth_opening(): inner-lip gap over mouth width) and the RMS of the audio in a 1/fps
window centred on the frame. The two series are correlated (Pearson) with the audio shifted by
every offset in [-N, N] frames (N: --max_offset_s, at most an eighth of the clip's frames); the
score reports the best offset, the peak correlation, and a
confidence = peak minus the median over offsets (like SyncNet's LSE-C: a clear peak at one
offset means the lips follow this audio, not just any speech). --shuffle_control scores each
video against another clip's audio (the next one in the folder, or --control_audio), the
baseline a real sync score must beat.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import cv2
import numpy as np

from jova_jax.errors import UserError
from jova_jax.media import io as media

SAMPLE_RATE = 16000
MIN_FACE_FRAC = 0.5
# The best of many offsets over a short clip finds chance alignments: a +-0.5 s search over the
# demo's 17 frames slides one clip's pause onto another's, and its shuffled-audio control rose
# to 0.59 against 0.48 at +-2 frames, while the true clips' own peak did not change (0.874).
MAX_OFFSET_SHARE = 1 / 8


def max_offset_frames(max_offset_s: float, fps: float, num_frames: int) -> int:
  """Offsets searched, in frames: +-max_offset_s, at most MAX_OFFSET_SHARE of the clip (>= 1)."""
  return max(1, min(int(round(max_offset_s * fps)), int(num_frames * MAX_OFFSET_SHARE)))


@dataclasses.dataclass
class SyncScore:
  offset: int          # frames; > 0: the audio comes later than the lips
  peak: float          # Pearson correlation at the best offset
  confidence: float    # peak minus the median correlation over offsets
  face_frac: float     # frames with a face
  correlations: list   # per offset, from -max_offset to max_offset

  def to_json(self) -> dict:
    return {"offset": self.offset, "peak": round(self.peak, 4),
            "confidence": round(self.confidence, 4), "face_frac": round(self.face_frac, 3)}


def audio_envelope(wave: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
  """(num_frames,) RMS of the audio in a 1/fps window centred on each frame's time."""
  half = 0.5 * sample_rate / fps
  out = np.zeros(num_frames)
  for k in range(num_frames):
    center = k * sample_rate / fps
    window = wave[max(0, int(center - half)):max(0, int(center + half))]
    out[k] = np.sqrt(np.mean(np.square(window))) if window.size else 0.0
  return out


def _fill_gaps(series: np.ndarray) -> np.ndarray:
  """Linear interpolation over nan frames (no face found there)."""
  good = np.isfinite(series)
  if good.all():
    return series
  index = np.arange(series.size)
  return np.interp(index, index[good], series[good])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt((a * a).sum() * (b * b).sum())
  return float((a * b).sum() / denom) if denom > 0 else 0.0


def offset_correlations(mouth: np.ndarray, envelope: np.ndarray, max_offset: int) -> np.ndarray:
  """Pearson correlation of mouth[t] with envelope[t + k] over the overlap, k = -N..N."""
  n = min(mouth.size, envelope.size)
  if n - max_offset < 3:
    raise ValueError(f"{n} frames are too few to correlate over offsets of +-{max_offset}")
  out = []
  for k in range(-max_offset, max_offset + 1):
    lo, hi = max(0, -k), min(n, n - k)
    out.append(_pearson(mouth[lo:hi], envelope[lo + k:hi + k]))
  return np.array(out)


def score_series(mouth: np.ndarray, envelope: np.ndarray, max_offset: int,
                 face_frac: float = 1.0) -> SyncScore:
  correlations = offset_correlations(_fill_gaps(mouth), envelope, max_offset)
  best = int(np.argmax(correlations))
  peak = float(correlations[best])
  return SyncScore(offset=best - max_offset, peak=peak,
                   confidence=peak - float(np.median(correlations)), face_frac=face_frac,
                   correlations=correlations.round(4).tolist())


# dlib's HOG detector and 68-point model need a face of roughly 80 px or more.
MIN_TRACK_SIZE = 160


def upscale_for_landmarks(frames: np.ndarray) -> np.ndarray:
  """Small videos (the CPU demo renders 32x32) are enlarged before landmarks; the mouth opening
  is a ratio of landmark distances, so the scale does not change it."""
  size = min(frames.shape[1:3])
  if size >= MIN_TRACK_SIZE:
    return frames
  factor = MIN_TRACK_SIZE / size
  h, w = (int(round(d * factor)) for d in frames.shape[1:3])
  return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in frames])


class SyncScorer:
  """Scores videos; one dlib tracker for all of them."""

  def __init__(self, max_offset_s: float = 0.5, tracker=None):
    from jova_jax.media import faces
    self.max_offset_s = max_offset_s
    self.tracker = tracker or faces.MouthTracker(detect_every=1)
    self._mouths = {}

  def mouth(self, path: str) -> tuple[np.ndarray, float, float]:
    """(mouth opening per frame, fps, face fraction) of a video, cached per path."""
    if path not in self._mouths:
      frames, fps = media.read_frames(path)
      track = self.tracker.track(upscale_for_landmarks(frames))
      if track.face_frac < MIN_FACE_FRAC:
        raise ValueError(f"{path}: a face in only {track.face_frac:.0%} of the frames (need "
                         f"{MIN_FACE_FRAC:.0%}) : no lip-sync score")
      self._mouths[path] = (track.mouth_opening(), fps, track.face_frac)
    return self._mouths[path]

  def score(self, video_path: str, audio_path: str | None = None) -> SyncScore:
    """The video's lips against its own audio, or against audio_path's."""
    mouth, fps, face_frac = self.mouth(video_path)
    num_samples = int(round(mouth.size / fps * SAMPLE_RATE))
    wave = media.read_audio(audio_path or video_path, SAMPLE_RATE, num_samples)
    envelope = audio_envelope(wave, SAMPLE_RATE, fps, mouth.size)
    return score_series(mouth, envelope, max_offset_frames(self.max_offset_s, fps, mouth.size),
                        face_frac)


def video_paths(path: str) -> list[str]:
  if os.path.isdir(path):
    paths = sorted(glob.glob(os.path.join(path, "*.mp4")))
    if not paths:
      raise FileNotFoundError(f"{path}: no .mp4 files in it")
    return paths
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  return [path]


def _control(scorer: SyncScorer, path: str, audios: list[str]) -> dict:
  """The mean score of path's lips against each of audios; an audio that fails is skipped, and
  ValueError / MediaError is raised when all of them fail."""
  scores, used, error = [], [], None
  for audio in audios:
    try:
      scores.append(scorer.score(path, audio))
      used.append(audio)
    except (ValueError, media.MediaError) as e:
      error = e
  if not scores:
    raise error
  return {"peak": round(float(np.mean([s.peak for s in scores])), 4),
          "confidence": round(float(np.mean([s.confidence for s in scores])), 4),
          "audios": used}


def _paired_margin(clips: list[dict]) -> dict | None:
  """Own minus control peak per video: mean, standard error and count (None under 2 videos)."""
  diffs = [c["score"]["peak"] - c["control"]["peak"] for c in clips if "control" in c]
  if len(diffs) < 2:
    return None
  return {"peak": round(float(np.mean(diffs)), 4),
          "stderr": round(float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))), 4),
          "videos": len(diffs)}


def score_videos(paths: list[str], *, shuffle_control: bool = False, control_audio=None,
                 max_offset_s: float = 0.5) -> dict:
  """{"clips": [{video, score, control? or control_error?} or {video, error}], "mean": {...}}.

  The control scores video i against the audio of every other video (or control_audio) and
  averages; a corrupt other video is left out of the average, and control_error is reported
  beside the video's own score only when every control audio fails.
  """
  if shuffle_control and control_audio is None and len(paths) < 2:
    raise UserError("--shuffle_control on one video needs --control_audio (another clip)")
  scorer = SyncScorer(max_offset_s)
  clips = []
  for i, path in enumerate(paths):
    entry = {"video": path}
    try:
      entry["score"] = scorer.score(path).to_json()
    except (ValueError, media.MediaError) as e:
      clips.append({"video": path, "error": str(e)})
      continue
    if shuffle_control:
      others = [control_audio] if control_audio else paths[:i] + paths[i + 1:]
      try:
        entry["control"] = _control(scorer, path, others)
      except (ValueError, media.MediaError) as e:
        entry["control_error"] = str(e)
    clips.append(entry)
  mean = {}
  for key in ("score", "control"):
    scored = [c[key] for c in clips if key in c]
    if scored:
      mean[key] = {m: round(float(np.mean([s[m] for s in scored])), 4)
                   for m in ("peak", "confidence")}
  margin = _paired_margin(clips)
  if margin:
    mean["margin"] = margin
  return {"clips": clips, "mean": mean}


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  report = score_videos(video_paths(f.video), shuffle_control=f.shuffle_control,
                        control_audio=f.control_audio, max_offset_s=f.max_offset_s)
  for clip in report["clips"]:
    print(json.dumps(clip))
  print(json.dumps({"mean": report["mean"]}))
  return 1 if any("error" in c or "control_error" in c for c in report["clips"]) else 0


if __name__ == "__main__":
  from absl import flags

  from jova_jax import cli
  flags.DEFINE_string("video", None, "An .mp4 file or a folder of them.", required=True)
  flags.DEFINE_bool("shuffle_control", False,
                    "Also score each video against the other clips' audio (their mean).")
  flags.DEFINE_string("control_audio", None, "The control's audio (default: every other video).")
  flags.DEFINE_float("max_offset_s", 0.5, "Offsets searched: +- this many seconds of frames "
                     "(at most an eighth of the clip).")
  cli.run(main)
