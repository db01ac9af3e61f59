"""Facial landmarks -> face and mouth boxes -> pixel masks, for the mouth-weighted video loss.

dlib's HOG frontal-face detector finds the face (every `detect_every` frames; faces in talking
clips move slowly, and detection costs ~10x a landmark fit), and its 68-point shape predictor
(the iBUG 300-W layout shipped by `face_recognition_models`) fits landmarks on every frame.
Points 48-67 are the mouth: 48-59 the outer lip contour, 60-67 the inner one.

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

  def mouth_mask(self, height: int, width: int) -> np.ndarray:
    """(T, H, W) uint8: 1 inside the frame's mouth box, 0 elsewhere and in faceless frames."""
    mask = np.zeros((len(self.mouth_boxes), height, width), np.uint8)
    for frame, (x0, y0, x1, y1) in zip(mask, self.mouth_boxes):
      if x0 >= 0:
        frame[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = 1
    return mask

  def mouth_opening(self) -> np.ndarray:
    """(T,) inner-lip gap over mouth width (corner 48 to corner 54); nan where no face.

    The gap is the mean distance of the upper inner-lip points 61, 62, 63 to the lower ones
    67, 66, 65 facing them; dividing by the mouth width makes it independent of face size.
    """
    upper, lower = self.landmarks[:, [61, 62, 63]], self.landmarks[:, [67, 66, 65]]
    gap = np.linalg.norm(upper - lower, axis=-1).mean(axis=-1)
    width = np.linalg.norm(self.landmarks[:, 54] - self.landmarks[:, 48], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
      return gap / width


def _grown_box(points: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
  """Bounding box of `points` grown by `margin` x its size on each side, clipped to the frame.

  Rounded outwards, so every point's pixel lies inside the half-open box.
  """
  low, high = points.min(axis=0), points.max(axis=0)
  grow = margin * (high - low)
  x0, y0 = np.floor(low - grow).astype(int)
  x1, y1 = np.floor(high + grow).astype(int) + 1
  return np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)])


class MouthTracker:
  """Finds the face and mouth in every frame of a clip with dlib."""

  def __init__(self, detect_every: int = 4, margin: float = 0.15, upsample: int = 0):
    """detect_every: run the face detector on every n-th frame and reuse its box in between.
    margin: boxes are the landmarks' bounding box grown by this fraction of its size per side.
    upsample: detector image pyramid upsamplings; 0 finds faces of ~80 px and larger, each
      extra level halves that at 4x the cost.
    """
    if detect_every < 1:
      raise ValueError(f"MouthTracker: detect_every must be >= 1, got {detect_every}")
    import dlib  # imported here so that importing this module costs nothing without dlib
    self._detector = dlib.get_frontal_face_detector()
    self._predictor = dlib.shape_predictor(landmark_model_path())
    self.detect_every = detect_every
    self.margin = margin
    self.upsample = upsample

  def _detect(self, frame: np.ndarray):
    faces = self._detector(frame, self.upsample)
    if not faces:
      return None
    return max(faces, key=lambda r: r.width() * r.height())  # the speaker is the largest face

  def track(self, frames: np.ndarray) -> FaceTrack:
    """frames: uint8 (T, H, W, 3) RGB."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"MouthTracker.track: expected uint8 frames (T, H, W, 3), got "
                       f"{frames.dtype} {frames.shape}")
    num_frames, height, width = frames.shape[:3]
    face_boxes = np.full((num_frames, 4), -1, np.int64)
    mouth_boxes = np.full((num_frames, 4), -1, np.int64)
    landmarks = np.full((num_frames, 68, 2), np.nan)
    detection = None
    for t, frame in enumerate(frames):
      frame = np.ascontiguousarray(frame)
      if t % self.detect_every == 0:
        detection = self._detect(frame)
      if detection is None:
        continue
      shape = self._predictor(frame, detection)
      points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
      landmarks[t] = points
      face_boxes[t] = _grown_box(points, self.margin, height, width)
      mouth_boxes[t] = _grown_box(points[MOUTH], self.margin, height, width)
    face_frac = float(np.mean(face_boxes[:, 0] >= 0)) if num_frames else 0.0
    return FaceTrack(face_boxes=face_boxes, mouth_boxes=mouth_boxes, landmarks=landmarks,
                     face_frac=face_frac)


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
