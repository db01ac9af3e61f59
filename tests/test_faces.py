"""jova_jax.media.faces: dlib face and mouth tracking, mouth masks, box mapping through crop+resize."""
import cv2
import numpy as np
import pytest
import skimage.data

from jova_jax.media import faces


@pytest.fixture(scope="module")
def tracker():
  return faces.MouthTracker(detect_every=2)


def _astronaut_frames(num_frames=5, size=160):
  # The astronaut's face is ~90 px wide in the 512 px photo: crop around it so that it stays
  # above dlib's ~80 px minimum at `size`, and shift the crop a little per frame.
  photo = skimage.data.astronaut()
  frames = [cv2.resize(photo[40 + t:210 + t, 140 - t:310 - t], (size, size),
                       interpolation=cv2.INTER_AREA) for t in range(num_frames)]
  return np.stack(frames)


def test_landmark_model_is_found():
  assert faces.landmark_model_path().endswith("shape_predictor_68_face_landmarks.dat")


def test_face_and_mouth_on_the_astronaut(tracker):
  frames = _astronaut_frames()
  track = tracker.track(frames)
  assert track.face_frac == 1.0
  assert track.face_boxes.shape == track.mouth_boxes.shape == (5, 4)
  assert track.landmarks.shape == (5, 68, 2)
  for face, mouth, points in zip(track.face_boxes, track.mouth_boxes, track.landmarks):
    x0, y0, x1, y1 = mouth
    mouth_points = points[48:68]
    assert (mouth_points[:, 0] >= x0).all() and (mouth_points[:, 0] < x1).all()
    assert (mouth_points[:, 1] >= y0).all() and (mouth_points[:, 1] < y1).all()
    # The mouth sits in the lower half of the face box, and the face is >= 80 px.
    assert face[0] <= x0 and x1 <= face[2] and (face[1] + face[3]) / 2 < y0 and y1 <= face[3]
    assert face[2] - face[0] >= 80
  # She smiles with her lips slightly parted: ~0.14 of the mouth width.
  opening = track.mouth_opening()
  assert np.isfinite(opening).all() and (0.05 < opening).all() and (opening < 0.3).all()


def test_mouth_opening_by_hand():
  # Corners 48 and 54 are 40 px apart; inner-lip pairs 61/67, 62/66, 63/65 are 4, 6, 8 px apart
  # -> mean gap 6 px -> opening 6 / 40. A frame of nan landmarks (no face) gives nan.
  points = np.zeros((2, 68, 2))
  points[0, 48], points[0, 54] = (10, 50), (50, 50)
  for upper, lower, gap in ((61, 67, 4), (62, 66, 6), (63, 65, 8)):
    points[0, upper] = (30, 48)
    points[0, lower] = (30, 48 + gap)
  points[1] = np.nan
  track = faces.FaceTrack(face_boxes=np.full((2, 4), -1), mouth_boxes=np.full((2, 4), -1),
                          landmarks=points, face_frac=0.5)
  opening = track.mouth_opening()
  assert opening[0] == pytest.approx(6 / 40) and np.isnan(opening[1])


def test_mouth_mask_is_one_exactly_in_the_box(tracker):
  track = tracker.track(_astronaut_frames(3))
  mask = track.mouth_mask(160, 160)
  assert mask.shape == (3, 160, 160) and mask.dtype == np.uint8
  for frame_mask, (x0, y0, x1, y1) in zip(mask, track.mouth_boxes):
    expected = np.zeros((160, 160), np.uint8)
    expected[y0:y1, x0:x1] = 1
    np.testing.assert_array_equal(frame_mask, expected)
    assert frame_mask.sum() == (x1 - x0) * (y1 - y0) > 0


def test_no_face_in_a_landscape(tracker):
  landscape = cv2.resize(skimage.data.coffee(), (160, 160), interpolation=cv2.INTER_AREA)
  track = tracker.track(np.stack([landscape] * 3))
  assert track.face_frac == 0.0
  assert (track.face_boxes == -1).all() and (track.mouth_boxes == -1).all()
  assert np.isnan(track.landmarks).all() and np.isnan(track.mouth_opening()).all()
  assert track.mouth_mask(160, 160).sum() == 0


def test_face_missing_in_some_frames(tracker):
  frames = _astronaut_frames(4)
  frames[2:] = 0  # frames 2 and 3 are black; detect_every=2 re-detects on frame 2
  track = tracker.track(frames)
  assert track.face_frac == 0.5
  assert (track.mouth_boxes[2:] == -1).all() and (track.mouth_boxes[:2] >= 0).all()
  assert track.mouth_mask(160, 160)[2:].sum() == 0


def test_transform_boxes_by_hand():
  # Crop (100, 50)-(300, 250) of the source, resized by 0.5 to 100 x 100. Edges map to
  # (e - crop start) * scale, rounded outwards, clipped to the output; -1 rows stay -1.
  boxes = np.array([[150, 60, 201, 120],   # -> 25, 5, 50.5 -> 51, 35
                    [80, 40, 120, 70],     # starts left/above the crop -> clipped to 0
                    [290, 240, 400, 300],  # runs past the crop's end -> clipped to 100
                    [10, 10, 50, 40],      # entirely outside the crop -> no face
                    [-1, -1, -1, -1]])
  got = faces.transform_boxes(boxes, (100, 50, 300, 250), 0.5)
  np.testing.assert_array_equal(got, [[25, 5, 51, 35],
                                      [0, 0, 10, 10],
                                      [95, 95, 100, 100],
                                      [-1, -1, -1, -1],
                                      [-1, -1, -1, -1]])
  # Separate x and y scales: crop 200 x 100 -> 50 x 50 (sx 0.25, sy 0.5).
  got = faces.transform_boxes(np.array([[[110, 20, 130, 41]]]), (100, 20, 300, 120), (0.25, 0.5))
  np.testing.assert_array_equal(got, [[[2, 0, 8, 11]]])


def test_transformed_mask_matches_tracking_the_resized_frames(tracker):
  # Tracking the source and mapping the boxes gives nearly the box found on the cropped and
  # resized frames themselves (dlib is not exactly scale-equivariant: allow a few pixels).
  photo = skimage.data.astronaut()
  source = np.stack([cv2.resize(photo[30:230, 120:320], (200, 200))] * 2)
  crop = (20, 10, 180, 170)
  scale = 140 / 160
  resized = np.stack([cv2.resize(f[10:170, 20:180], (140, 140), interpolation=cv2.INTER_AREA)
                      for f in source])
  mapped = faces.transform_boxes(tracker.track(source).mouth_boxes, crop, scale)
  direct = tracker.track(resized).mouth_boxes
  assert np.abs(mapped - direct).max() <= 3


# ------------------------------------------------------------------ real footage: small faces, crowds

@pytest.fixture(scope="module")
def talking_face(tracker):
  """The astronaut photo with a MouthWarp whose mouth opens and closes (a talking face)."""
  from data_prep.make_demo_corpus import MouthWarp
  photo = np.ascontiguousarray(skimage.data.astronaut()[0:300, 80:370])  # face ~87 px wide
  return MouthWarp(photo, tracker.track(photo[None]).landmarks[0])


def _talking_frames(warp, face_px, num_frames):
  """Frames of the talking face scaled so that dlib's face box is about `face_px` wide."""
  scale = face_px / 87
  amounts = 0.5 + 0.5 * np.sin(1.3 * np.arange(num_frames))
  return [cv2.resize(warp.render(a), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
          for a in amounts]


def _small_face_clip(warp, num_frames=17, face_px=46):
  """176 x 144 frames around a talking face that drifts by a couple of pixels; dlib's box of
  the face is 53 px wide (its boxes come in pyramid-level steps)."""
  scale = face_px / 87
  cx, cy = (224 - 80) * scale, 130 * scale  # the face centre in the scaled photo
  out = []
  for t, image in enumerate(_talking_frames(warp, face_px, num_frames)):
    padded = cv2.copyMakeBorder(image, 100, 100, 100, 100, cv2.BORDER_REFLECT)
    x0 = int(cx - 88 + 2 * np.sin(t / 3)) + 100
    y0 = int(cy - 72 + 1.5 * np.cos(t / 4)) + 100
    out.append(padded[y0:y0 + 144, x0:x0 + 176])
  return np.stack(out)


def test_small_face_in_a_low_resolution_clip_is_kept(talking_face, tmp_path):
  import dlib
  from data_prep import clips
  from jova_jax import codecs
  from jova_jax.media import io as media
  from tests.conftest import load
  frames = _small_face_clip(talking_face)
  # Without upsampling dlib misses this face in every frame (the clip used to be rejected).
  detector = dlib.get_frontal_face_detector()
  assert not any(detector(f, 0) for f in frames)
  path = str(tmp_path / "small.mp4")
  media.write_mp4(path, frames, 8.0, 0.1 * np.sin(np.arange(40000) / 10.0), 16000)
  config = load("tiny")
  config.video.update(frames=17, height=64, width=64)
  options = clips.ClipOptions(fps=8.0, frames=17, height=64, width=64, sample_rate=16000,
                              num_samples=17 * 2000, face_centered_crop=True, min_face_frac=0.5,
                              crop_margin=0.5, detect_every=4)
  clip = clips.prepare_clip(path, options)
  assert clip.face_frac >= 0.9
  latent = codecs.get_video_codec(config).pixel_mask_to_latent(clip.mouth_mask)
  t, h, w = latent.shape
  mouth_sized = 0
  for frame in latent:
    ys, xs = np.nonzero(frame)
    # A mouth: the face is about half the face-centred crop, the mouth at most a third of the
    # frame wide and a quarter high, and below the eyes (the upper third).
    mouth_sized += (bool(len(ys)) and np.ptp(xs) + 1 <= w / 3 and np.ptp(ys) + 1 <= h / 4
                    and ys.min() >= h / 3)
  assert mouth_sized >= 0.9 * t, [np.nonzero(f) for f in latent]


def test_the_speaker_is_the_talking_face_among_larger_still_ones(talking_face, tracker):
  num_frames = 17
  still = cv2.resize(talking_face.image, None, fx=105 / 87, fy=105 / 87, interpolation=cv2.INTER_AREA)
  talking = _talking_frames(talking_face, 50, num_frames)
  scene = np.full((num_frames, 270, 400, 3), 90, np.uint8)
  scene[:, 0:200, 0:170] = still[30:230, 40:210]             # ~105 px faces, mouths still
  scene[:, 0:200, 230:400] = still[30:230, 40:210][:, ::-1]
  for frame, image in zip(scene, talking):
    frame[150:270, 150:270] = image[20:140, 20:140]             # ~50 px, talking
  track = tracker.track(scene)
  assert track.face_frac == 1.0 and "most mouth motion of 3 faces" in track.detail
  x0, y0, x1, y1 = np.median(track.face_boxes, axis=0)
  assert 150 <= x0 < x1 <= 270 and 150 <= y0 < y1 <= 270 and x1 - x0 < 80
  # With every mouth still the largest face is the speaker.
  track = tracker.track(np.stack([scene[0]] * 4))
  assert "the largest of 3 faces" in track.detail and track.face_boxes[0, 2] - track.face_boxes[0, 0] > 80


def test_missed_detections_between_hits_are_bridged():
  frames = _astronaut_frames(17)
  covered = frames.copy()
  covered[4:12, 40:75] = 0  # a bar over the eyes: the detector misses frames 4 and 8
  tracker = faces.MouthTracker(detect_every=4, max_missed=2)
  track = tracker.track(covered)
  assert track.face_frac == 1.0 and "3 of 5 detections hit, 8 frames bridged" in track.detail
  # The bridged mouths sit where tracking the uncovered frames puts them.
  assert np.abs(track.mouth_boxes[4:12] - tracker.track(frames).mouth_boxes[4:12]).max() <= 4
  strict = faces.MouthTracker(detect_every=4, max_missed=1).track(covered)
  assert strict.face_frac == 9 / 17 and (strict.mouth_boxes[4:12] == -1).all()
