"""Reading and writing media with ffmpeg (imageio_ffmpeg's binary) and OpenCV: the sampler's
inputs (reference image, given speech, given video) and outputs (mp4, wav).

Every reader returns exactly the shape the model works at (frames at the config's fps and
size, audio at its sample rate and length) or raises MediaError naming the file and what is
wrong, e.g. a clip shorter than the model's.
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
  """A media file that cannot be read as asked; the message names the file."""


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
  """(num_samples,) float32 mono at sample_rate from any file ffmpeg reads (wav, mp4, ...).

  Up to 2% missing at the end (AAC padding) is zero-filled; a shorter file is an error.
  """
  _require_file(path)
  seconds = num_samples / sample_rate
  result = subprocess.run(
      [_ffmpeg(), "-nostdin", "-v", "error", "-i", path, "-t", f"{seconds + 0.5:.3f}", "-vn",
       "-map", "0:a:0?", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"],
      capture_output=True, check=False)
  if result.returncode != 0:
    raise MediaError(f"{path}: ffmpeg cannot read its audio: {_last_line(result.stderr)}")
  audio = np.frombuffer(result.stdout, "<f4")
  if audio.size == 0:
    raise MediaError(f"{path}: no audio stream")
  if audio.size < 0.98 * num_samples:
    raise MediaError(f"{path}: {audio.size / sample_rate:.2f} s of audio, the model makes "
                     f"{seconds:.2f} s clips")
  return fit_length(audio, num_samples)


def _cover_filter(height: int, width: int) -> str:
  """Scale to cover height x width (keeping the aspect ratio), then centre-crop."""
  return (f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=area,"
          f"crop={width}:{height}")


def read_video(path: str, fps: float, frames: int, height: int, width: int) -> np.ndarray:
  """(frames, height, width, 3) uint8 RGB: resampled to fps, scaled to cover, centre-cropped."""
  _require_file(path)
  result = subprocess.run(
      [_ffmpeg(), "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0?",
       "-vf", f"fps={fps},{_cover_filter(height, width)}", "-frames:v", str(frames),
       "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=False)
  if result.returncode != 0:
    raise MediaError(f"{path}: ffmpeg cannot read its video: {_last_line(result.stderr)}")
  frame_bytes = height * width * 3
  got = len(result.stdout) // frame_bytes
  if got == 0:
    raise MediaError(f"{path}: no video stream")
  if got < frames:
    raise MediaError(f"{path}: {got} frames at {fps} fps, the model makes {frames}-frame clips")
  return np.frombuffer(result.stdout[:frames * frame_bytes], np.uint8).reshape(
      frames, height, width, 3)


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
