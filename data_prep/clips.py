"""One raw clip -> fixed-size frames, audio and mouth boxes (runs in worker processes).

Everything here is numpy / OpenCV / ffmpeg; nothing imports JAX, so a worker pool stays cheap.
"""
from __future__ import annotations

import dataclasses
import functools
import subprocess
import time

import cv2
import imageio_ffmpeg
import numpy as np

from jova_jax import faces, media


class ClipRejected(Exception):
  """A clip that cannot be used; `reason` is one of the rejects.jsonl reasons."""

  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)  # both in args, so it pickles back from a worker process
    self.reason = reason
    self.detail = detail

  def __str__(self):
    return f"{self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class ClipOptions:
  """What a worker needs to turn a raw clip into model-sized media (picklable)."""
  fps: float
  frames: int
  height: int
  width: int
  sample_rate: int
  num_samples: int
  face_centered_crop: bool
  min_face_frac: float
  crop_margin: float      # face-centred crop: extra context on each side, as a fraction of the face size
  detect_every: int       # face detector runs on every n-th frame, landmarks track in between


@dataclasses.dataclass
class PreparedClip:
  frames: np.ndarray       # (T, height, width, 3) uint8 RGB
  audio: np.ndarray        # (num_samples,) float32 mono
  mouth_mask: np.ndarray   # (T, height, width) uint8, mouth boxes at the output resolution
  face_frac: float
  timings: dict            # seconds per stage: decode, faces


def read_resampled_frames(path: str, fps: float, frames: int) -> np.ndarray:
  """Decodes the first `frames` frames of `path` resampled to `fps` (nearest frame by timestamp).

  Returns (frames, H, W, 3) uint8 RGB at the source resolution.
  """
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise ClipRejected("unreadable", f"OpenCV cannot open {path}")
  try:
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    frame_period = 1.0 / source_fps if source_fps > 0 else 1.0 / fps
    targets = np.arange(frames) / fps
    picked = []
    previous = None  # (timestamp, image) of the frame before the current one
    first_ms = None
    index = 0
    while len(picked) < frames and capture.grab():
      ms = capture.get(cv2.CAP_PROP_POS_MSEC)
      first_ms = ms if first_ms is None else first_ms
      stamp = (ms - first_ms) / 1000.0
      if previous is not None and stamp <= previous[0]:
        stamp = previous[0] + frame_period  # backends without usable timestamps
      ok, image = capture.retrieve()
      if not ok:
        raise ClipRejected("unreadable", f"OpenCV cannot decode frame {index} of {path}")
      while len(picked) < frames and stamp >= targets[len(picked)]:
        target = targets[len(picked)]
        use_previous = previous is not None and target - previous[0] < stamp - target
        picked.append(previous[1] if use_previous else image)
      previous = (stamp, image)
      index += 1
    # Tail: a target still covered by the last frame's display time takes that frame.
    while previous is not None and len(picked) < frames and \
        targets[len(picked)] < previous[0] + frame_period:
      picked.append(previous[1])
  finally:
    capture.release()
  if index == 0:
    raise ClipRejected("unreadable", f"no decodable video frames in {path}")
  if len(picked) < frames:
    duration = previous[0] + frame_period
    raise ClipRejected("too_short", f"{path} has {duration:.2f}s of video ({index} frames), "
                       f"need {frames / fps:.2f}s ({frames} frames at {fps} fps)")
  return np.stack([cv2.cvtColor(image, cv2.COLOR_BGR2RGB) for image in picked])


def read_audio(path: str, sample_rate: int, num_samples: int) -> np.ndarray:
  """The first `num_samples` mono samples at `sample_rate` (time 0 = the first video frame).

  AAC padding can leave a clip a few ms short; up to 2% missing is zero-padded, more is too_short.
  """
  duration = num_samples / sample_rate + 0.5
  command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-t",
             f"{duration:.3f}", "-vn", "-map", "0:a:0?", "-ac", "1", "-ar", str(sample_rate),
             "-f", "f32le", "-"]
  result = subprocess.run(command, capture_output=True, check=False)
  message = result.stderr.decode(errors="replace").strip()
  if "does not contain any stream" in message:
    raise ClipRejected("no_audio", f"{path} has no audio stream")
  if result.returncode != 0:
    raise ClipRejected("unreadable", f"ffmpeg cannot read the audio of {path}: "
                       f"{message.splitlines()[-1] if message else result.returncode}")
  audio = np.frombuffer(result.stdout, dtype="<f4")
  if audio.size == 0:
    raise ClipRejected("no_audio", f"{path}: the audio stream decodes to no samples")
  if audio.size < num_samples * 0.98:
    raise ClipRejected("too_short", f"{path} has {audio.size / sample_rate:.2f}s of audio, "
                       f"need {num_samples / sample_rate:.2f}s")
  return media.fit_length(audio, num_samples)


def median_face_box(face_boxes: np.ndarray) -> np.ndarray | None:
  """Median (x0, y0, x1, y1) over frames with a face (rows of -1 mean no face)."""
  found = face_boxes[(face_boxes >= 0).all(axis=1)]
  return np.median(found, axis=0) if len(found) else None


def crop_box(source_hw: tuple[int, int], out_hw: tuple[int, int], face_box=None,
             margin: float = 0.5) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1) crop with the output's aspect ratio, inside the frame.

  With a face box: centred on the face, `margin` x face size of context on each side (shrunk
  to fit the frame, then shifted inside it). Without: the largest centred crop.
  """
  src_h, src_w = source_hw
  aspect = out_hw[1] / out_hw[0]  # width / height
  full_h = min(src_h, src_w / aspect)
  if face_box is None:
    crop_h, center_x, center_y = full_h, src_w / 2, src_h / 2
  else:
    x0, y0, x1, y1 = face_box
    crop_h = min(full_h, max(y1 - y0, (x1 - x0) / aspect) * (1 + 2 * margin))
    center_x, center_y = (x0 + x1) / 2, (y0 + y1) / 2
  crop_w = crop_h * aspect
  left = float(np.clip(center_x - crop_w / 2, 0, src_w - crop_w))
  top = float(np.clip(center_y - crop_h / 2, 0, src_h - crop_h))
  x0, y0 = int(round(left)), int(round(top))
  x1 = min(src_w, x0 + max(1, int(round(crop_w))))
  y1 = min(src_h, y0 + max(1, int(round(crop_h))))
  return x0, y0, x1, y1


def crop_and_resize(frames: np.ndarray, box, out_hw: tuple[int, int]) -> np.ndarray:
  x0, y0, x1, y1 = box
  height, width = out_hw
  shrinking = (y1 - y0) > height
  interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
  return np.stack([cv2.resize(frame[y0:y1, x0:x1], (width, height), interpolation=interpolation)
                   for frame in frames])


@functools.lru_cache(maxsize=None)
def _tracker(detect_every: int):
  """One tracker per process: loading dlib's landmark model takes longer than tracking a clip."""
  return faces.MouthTracker(detect_every=detect_every)


def prepare_or_reject(path: str, options: ClipOptions) -> PreparedClip | ClipRejected:
  """prepare_clip for a worker pool: a bad clip comes back as its ClipRejected, never raises.

  An unexpected error (a decoder or detector failing on odd input) rejects the clip as
  `unreadable` with the error in the detail, so one clip cannot stop the job.
  """
  try:
    return prepare_clip(path, options)
  except ClipRejected as e:
    return e
  except Exception as e:  # noqa: BLE001 -- see docstring
    return ClipRejected("unreadable", f"{path}: {type(e).__name__}: {e}")


def prepare_clip(path: str, options: ClipOptions) -> PreparedClip:
  """Decode, resample, find the face and mouth, crop, resize, and cut the matching audio."""
  start = time.perf_counter()
  frames = read_resampled_frames(path, options.fps, options.frames)
  audio = read_audio(path, options.sample_rate, options.num_samples)
  decoded = time.perf_counter()

  track = _tracker(options.detect_every).track(frames)
  if track.face_frac < options.min_face_frac:
    raise ClipRejected("no_face", f"a face in {track.face_frac:.0%} of frames of {path}, "
                       f"need {options.min_face_frac:.0%} (--min_face_frac): {track.detail}")
  out_hw = (options.height, options.width)
  face = median_face_box(track.face_boxes) if options.face_centered_crop else None
  box = crop_box(frames.shape[1:3], out_hw, face, options.crop_margin)
  scale = (options.width / (box[2] - box[0]), options.height / (box[3] - box[1]))
  cropped = dataclasses.replace(track, face_boxes=faces.transform_boxes(track.face_boxes, box, scale),
                                mouth_boxes=faces.transform_boxes(track.mouth_boxes, box, scale))
  mouth_mask = cropped.mouth_mask(options.height, options.width)
  tracked = time.perf_counter()

  resized = crop_and_resize(frames, box, out_hw)
  finished = time.perf_counter()
  return PreparedClip(frames=resized, audio=audio, mouth_mask=mouth_mask,
                      face_frac=float(track.face_frac),
                      timings={"decode": decoded - start + finished - tracked,
                               "faces": tracked - decoded})
