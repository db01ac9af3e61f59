"""One raw clip -> fixed-size frames, audio and mouth boxes (runs in worker processes).

Decoding and resampling is jova_jax.media.io's (the sampler and eval.sync read clips the same
way). Everything here is numpy / OpenCV / ffmpeg; nothing imports JAX, so a worker pool stays
cheap.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from jova_jax.media import faces
from jova_jax.media import io as media


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


def median_face_box(face_boxes: np.ndarray) -> np.ndarray | None:
  """Median (x0, y0, x1, y1) over frames with a face (rows of -1 mean no face)."""
  found = face_boxes[(face_boxes >= 0).all(axis=1)]
  return np.median(found, axis=0) if len(found) else None


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
  try:
    frames, _ = media.read_frames(path, options.fps, options.frames)
    audio = media.read_audio(path, options.sample_rate, options.num_samples)
  except media.MediaError as e:
    raise ClipRejected(e.reason, str(e)) from e
  decoded = time.perf_counter()

  track = _tracker(options.detect_every).track(frames)
  if track.face_frac < options.min_face_frac:
    raise ClipRejected("no_face", f"a face in {track.face_frac:.0%} of frames of {path}, "
                       f"need {options.min_face_frac:.0%} (--min_face_frac): {track.detail}")
  out_hw = (options.height, options.width)
  face = median_face_box(track.face_boxes) if options.face_centered_crop else None
  box = media.crop_box(frames.shape[1:3], out_hw, face, options.crop_margin)
  scale = (options.width / (box[2] - box[0]), options.height / (box[3] - box[1]))
  cropped = dataclasses.replace(track, face_boxes=faces.transform_boxes(track.face_boxes, box, scale),
                                mouth_boxes=faces.transform_boxes(track.mouth_boxes, box, scale))
  mouth_mask = cropped.mouth_mask(options.height, options.width)
  tracked = time.perf_counter()

  resized = media.crop_and_resize(frames, box, out_hw)
  finished = time.perf_counter()
  return PreparedClip(frames=resized, audio=audio, mouth_mask=mouth_mask,
                      face_frac=float(track.face_frac),
                      timings={"decode": decoded - start + finished - tracked,
                               "faces": tracked - decoded})
