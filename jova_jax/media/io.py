"""Reading and writing media with ffmpeg (imageio_ffmpeg's binary) and OpenCV.

The one reader and resampler of clips: data_prep (training data), the sampler's given video and
speech, and eval.sync all decode through read_frames / read_audio, so the same clip becomes the
same frames and samples everywhere (video: OpenCV, the nearest source frame by timestamp;
audio: ffmpeg's resampler, time 0 at the clip start). read_video adds the centre crop and
resize that prepare makes without a face-centred crop. Readers return exactly the shape asked
for or raise MediaError naming the file and what is wrong; its `reason` is one of prepare's
reject reasons.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import wave

import cv2
import imageio_ffmpeg
import numpy as np

from jova_jax.errors import UserError
from jova_jax.files import finished_file


class MediaError(UserError):
  """A media file that cannot be read as asked; the message names the file, `reason` says
  which way (unreadable, no_audio, too_short: data_prep's reject reasons)."""

  def __init__(self, message: str, reason: str = "unreadable"):
    super().__init__(message)
    self.reason = reason


def _ffmpeg() -> str:
  return imageio_ffmpeg.get_ffmpeg_exe()


def _last_line(stderr: bytes) -> str:
  lines = stderr.decode(errors="replace").strip().splitlines()
  return lines[-1] if lines else "no message"


def _require_file(path: str) -> None:
  if not os.path.isfile(path):
    raise MediaError(f"{path}: no such file")


# ---------------------------------------------------------------- reading

def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
  """Cuts or zero-pads a wave to num_samples: decoders and ffmpeg give a little more or less
  than the clip (whole codec latents, AAC padding)."""
  return np.pad(wave, (0, max(0, num_samples - wave.size)))[:num_samples]


def read_audio(path: str, sample_rate: int, num_samples: int) -> np.ndarray:
  """(num_samples,) float32 mono at sample_rate from any file ffmpeg reads (wav, mp4, ...),
  time 0 at the start of the file (of its first video frame in an mp4).

  Up to 2% missing at the end (AAC padding) is zero-filled; a shorter file is an error.
  """
  _require_file(path)
  seconds = num_samples / sample_rate
  result = subprocess.run(
      [_ffmpeg(), "-nostdin", "-v", "error", "-i", path, "-t", f"{seconds + 0.5:.3f}", "-vn",
       "-map", "0:a:0?", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"],
      capture_output=True, check=False)
  audio = np.frombuffer(result.stdout, "<f4")
  if "does not contain any stream" in result.stderr.decode(errors="replace"):
    raise MediaError(f"{path}: no audio stream", "no_audio")
  if result.returncode != 0:
    raise MediaError(f"{path}: ffmpeg cannot read its audio: {_last_line(result.stderr)}")
  if audio.size == 0:
    raise MediaError(f"{path}: the audio stream decodes to no samples", "no_audio")
  if audio.size < 0.98 * num_samples:
    raise MediaError(f"{path}: {audio.size / sample_rate:.2f} s of audio, need {seconds:.2f} s",
                     "too_short")
  return fit_length(audio, num_samples)


def read_frames(path: str, fps: float | None = None, frames: int | None = None
                ) -> tuple[np.ndarray, float]:
  """(uint8 RGB frames (N, H, W, 3) at the source resolution, their fps).

  fps None: every frame at the source's rate. Else the frames at times k / fps, each the
  source frame nearest by timestamp: the first `frames` of them (too_short if the clip is
  shorter), or all up to the clip's end when frames is None.
  """
  _require_file(path)
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise MediaError(f"{path}: OpenCV cannot open it")
  try:
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps or (source_fps if source_fps > 0 else None)
    if fps is None:
      raise MediaError(f"{path}: OpenCV finds no frame rate in it")
    frame_period = 1.0 / source_fps if source_fps > 0 else 1.0 / fps
    wanted = np.inf if frames is None else frames
    picked = []
    previous = None  # (timestamp, image) of the frame before the current one
    first_ms = None
    index = 0
    while len(picked) < wanted and capture.grab():
      ms = capture.get(cv2.CAP_PROP_POS_MSEC)
      first_ms = ms if first_ms is None else first_ms
      stamp = (ms - first_ms) / 1000.0
      if previous is not None and stamp <= previous[0]:
        stamp = previous[0] + frame_period  # backends without usable timestamps
      ok, image = capture.retrieve()
      if not ok:
        raise MediaError(f"{path}: OpenCV cannot decode frame {index}")
      while len(picked) < wanted and stamp >= len(picked) / fps:
        target = len(picked) / fps
        use_previous = previous is not None and target - previous[0] < stamp - target
        picked.append(previous[1] if use_previous else image)
      previous = (stamp, image)
      index += 1
    # Tail: a target still covered by the last frame's display time takes that frame.
    while previous is not None and len(picked) < wanted and \
        len(picked) / fps < previous[0] + frame_period:
      picked.append(previous[1])
  finally:
    capture.release()
  if index == 0:
    raise MediaError(f"{path}: no decodable video frames")
  if frames is not None and len(picked) < frames:
    duration = previous[0] + frame_period
    raise MediaError(f"{path}: {duration:.2f} s of video ({index} frames), need "
                     f"{frames / fps:.2f} s ({frames} frames at {fps} fps)", "too_short")
  return np.stack([cv2.cvtColor(image, cv2.COLOR_BGR2RGB) for image in picked]), float(fps)


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
  """frames[:, y0:y1, x0:x1] resized to out_hw (area filter shrinking, bicubic enlarging)."""
  x0, y0, x1, y1 = box
  height, width = out_hw
  shrinking = (y1 - y0) > height
  interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
  return np.stack([cv2.resize(frame[y0:y1, x0:x1], (width, height), interpolation=interpolation)
                   for frame in frames])


def read_video(path: str, fps: float, frames: int, height: int, width: int) -> np.ndarray:
  """(frames, height, width, 3) uint8 RGB: read_frames, then the largest centred crop with the
  output's aspect resized to height x width (as prepare without a face-centred crop)."""
  source, _ = read_frames(path, fps, frames)
  return crop_and_resize(source, crop_box(source.shape[1:3], (height, width)), (height, width))


def read_image(path: str, height: int, width: int) -> np.ndarray:
  """(height, width, 3) uint8 RGB: scaled to cover, centre-cropped."""
  _require_file(path)
  image = cv2.imread(path, cv2.IMREAD_COLOR)
  if image is None:
    raise MediaError(f"{path}: OpenCV cannot read it as an image")
  h, w = image.shape[:2]
  scale = max(height / h, width / w)
  size = (max(width, round(w * scale)), max(height, round(h * scale)))
  image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
  y0, x0 = (size[1] - height) // 2, (size[0] - width) // 2
  return cv2.cvtColor(image[y0:y0 + height, x0:x0 + width], cv2.COLOR_BGR2RGB)


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """(float32 samples (S,) or (S, C), sample rate) of a 16-bit PCM wav."""
  with wave.open(path, "rb") as f:
    if f.getsampwidth() != 2:
      raise MediaError(f"{path}: {8 * f.getsampwidth()}-bit wav, expected 16-bit PCM")
    data = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0
    channels, rate = f.getnchannels(), f.getframerate()
  return (data if channels == 1 else data.reshape(-1, channels)), rate


def probe_streams(path: str) -> list[str]:
  """Stream descriptions ffmpeg reports for a file, e.g. ['Video: h264 ...', 'Audio: aac ...']."""
  _require_file(path)
  result = subprocess.run([_ffmpeg(), "-nostdin", "-hide_banner", "-i", path],
                          capture_output=True, check=False)  # exits 1: no output named
  text = result.stderr.decode(errors="replace")
  return re.findall(r"Stream #\d+:\d+.*?: ((?:Video|Audio): .*)", text)


# ---------------------------------------------------------------- writing

def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
  """16-bit PCM mono wav; samples are clipped to [-1, 1]."""
  with finished_file(path) as partial, wave.open(partial, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(int(sample_rate))
    f.writeframes((np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def write_mp4(path: str, frames: np.ndarray, fps: float, audio: np.ndarray | None,
              sample_rate: int) -> None:
  """H.264 (yuv420p) video + AAC audio (none if audio is None).

  yuv420p needs even sizes: an odd height or width gets one black row or column.
  """
  frames = np.ascontiguousarray(frames, np.uint8)
  height, width = frames.shape[1:3]
  cmd = [_ffmpeg(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
         "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "pipe:0"]
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    if audio is not None:
      audio_path = os.path.join(tmp, "audio.wav")
      write_wav(audio_path, audio, sample_rate)
      cmd += ["-i", audio_path, "-c:a", "aac", "-b:a", "96k"]
    cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", "veryfast",
            "-crf", "16", "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
    with finished_file(path) as partial:
      result = subprocess.run(cmd + [partial], input=frames.tobytes(), capture_output=True,
                              check=False)
      if result.returncode != 0:
        raise MediaError(f"{path}: ffmpeg failed writing it: {_last_line(result.stderr)}")
