"""One PNG that shows a whole set of samples at a glance.

Each sample gets a block: its name, its frames in a row, the reference's frames under them
(the held-out clip, or the I2V reference image, when there is one) and the mel spectrogram of
its audio across the full width, so a reader sees at once whether the face holds, whether the
mouth moves, and whether the speech bursts line up with it.
"""
from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

from jova_jax import files
from jova_jax.media import io as media

LABEL_HEIGHT = 16
MEL_HEIGHT = 56
GAP = 6
BACKGROUND = 24  # dark grey: black frames of a failed sample still stand out


@dataclasses.dataclass
class SheetEntry:
  name: str
  frames: np.ndarray                     # (T, H, W, 3) uint8
  wave: np.ndarray | None = None         # (S,) float
  sample_rate: int = 16000
  reference: np.ndarray | None = None    # (T', H, W, 3) uint8: a clip, or one frame (1, H, W, 3)


def read_entry(path: str, name: str | None = None, reference: str | None = None,
               sample_rate: int = 16000) -> SheetEntry:
  """A sheet entry from an mp4 with audio; reference: an mp4 or an image file."""
  frames, fps = media.read_frames(path)
  wave = media.read_audio(path, sample_rate, int(round(len(frames) / fps * sample_rate)))
  ref = None
  if reference:
    if reference.endswith(".mp4"):
      ref, _ = media.read_frames(reference)
    else:
      image = cv2.imread(reference, cv2.IMREAD_COLOR)
      if image is None:
        raise media.MediaError(f"{reference}: not a readable image")
      ref = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[None]
  stem = name or os.path.splitext(os.path.basename(path))[0]
  return SheetEntry(stem, frames, wave, sample_rate, ref)


def _scaled(frames: np.ndarray, cell: int) -> np.ndarray:
  """Frames side by side, each resized to `cell` px high (nearest: keep the pixels honest)."""
  h, w = frames.shape[1:3]
  width = max(1, int(round(w * cell / h)))
  return np.concatenate([cv2.resize(f, (width, cell), interpolation=cv2.INTER_NEAREST)
                         for f in frames], axis=1)


def mel_image(wave: np.ndarray, sample_rate: int, width: int, height: int = MEL_HEIGHT):
  """(height, width, 3) uint8 log-mel spectrogram, low frequencies at the bottom."""
  import librosa
  wave = np.asarray(wave, np.float32)
  if wave.size < 512 or not np.any(wave):
    return np.full((height, width, 3), BACKGROUND, np.uint8)
  mel = librosa.feature.melspectrogram(y=wave, sr=sample_rate, n_fft=512, hop_length=128,
                                       n_mels=64)
  db = librosa.power_to_db(mel, ref=np.max, top_db=70.0)
  gray = np.uint8(np.clip((db + 70.0) / 70.0, 0.0, 1.0) * 255)[::-1]
  gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_LINEAR)
  return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_MAGMA), cv2.COLOR_BGR2RGB)


def _label(text: str, width: int) -> np.ndarray:
  strip = np.full((LABEL_HEIGHT, width, 3), BACKGROUND, np.uint8)
  cv2.putText(strip, text, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
              (235, 235, 235), 1, cv2.LINE_AA)
  return strip


def _pad_width(image: np.ndarray, width: int) -> np.ndarray:
  if image.shape[1] >= width:
    return image[:, :width]
  pad = np.full((image.shape[0], width - image.shape[1], 3), BACKGROUND, np.uint8)
  return np.concatenate([image, pad], axis=1)


def render(entries: list[SheetEntry], cell: int = 64) -> np.ndarray:
  """The sheet as an (H, W, 3) uint8 image."""
  if not entries:
    raise ValueError("a contact sheet needs at least one sample")
  rows = []
  for e in entries:
    frames = _scaled(np.asarray(e.frames, np.uint8), cell)
    width = frames.shape[1]
    block = [_label(e.name, width), frames]
    if e.reference is not None:
      block += [_label("reference", width), _scaled(np.asarray(e.reference, np.uint8), cell)]
    if e.wave is not None:
      block.append(mel_image(e.wave, e.sample_rate, width))
    rows.append([np.asarray(b, np.uint8) for b in block])
  width = max(b.shape[1] for block in rows for b in block)
  gap = np.full((GAP, width, 3), BACKGROUND, np.uint8)
  parts = []
  for block in rows:
    parts += [_pad_width(b, width) for b in block] + [gap]
  return np.concatenate(parts, axis=0)


def write(path: str, entries: list[SheetEntry], cell: int = 64) -> np.ndarray:
  """Renders the sheet, writes it as a PNG (finished or absent, never truncated) and returns
  the image."""
  sheet = render(entries, cell)
  with files.finished_file(path) as partial:
    if not cv2.imwrite(partial, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
      raise media.MediaError(f"{path}: OpenCV could not write the PNG")
  return sheet
