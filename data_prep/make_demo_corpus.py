r"""Makes a small corpus of synthetic talking clips whose lips follow their speech.

  python -m data_prep.make_demo_corpus --out=demo/clips --num_clips=48

Writes OUT/clip_00000.mp4 (H.264 video + AAC audio) with a sidecar OUT/clip_00000.json
{"video_caption", "audio_caption", "transcript"} per clip, the layout data_prep.prepare reads.

Each clip is the astronaut photo from scikit-image (a real face, so dlib finds it), cropped,
scaled, mirrored and lit differently per clip, saying one sentence in an espeak-ng voice with
its own rate and pitch, pausing once mid-sentence at a place of its own. Its mouth opens in proportion to the speech's loudness (RMS per video
frame, smoothed): the jaw and lower lip are pushed down with a remap, the upper lip a little up,
and the gap is painted as a dark mouth interior. So lips and audio agree frame by frame, which
is what the mouth-weighted loss and the sync metric need to see.

--with_bad_clips adds, after the good clips, one clip per reason data_prep.prepare rejects:
clip_NNNNN_corrupt.mp4 (not decodable), _no_audio (no audio track), _faceless (a landscape),
_too_short (1 s, shorter than the demo config's 17 frames at 8 fps).
"""
import concurrent.futures
import json
import os
import subprocess
import tempfile
import time
import wave

import cv2
import imageio_ffmpeg
import numpy as np
import skimage.data
from absl import flags, logging

from data_prep import speech
from jova_jax import cli
from jova_jax.errors import UserError
from jova_jax.eval import sync
from jova_jax.media import faces

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output folder for clip_NNNNN.mp4 + clip_NNNNN.json.")
flags.DEFINE_integer("num_clips", 48, "Number of good clips.")
flags.DEFINE_integer("seed", 0, "Clip k uses the random stream (seed, k).")
flags.DEFINE_float("fps", 8.0, "Video frame rate.")
flags.DEFINE_float("seconds", 2.5, "Clip length (the demo config needs 17 frames at 8 fps).")
flags.DEFINE_integer("size", 160, "Frame height and width in pixels (even, >= 128 so that the "
                     "face is >= 80 px for dlib).")
flags.DEFINE_bool("with_bad_clips", False, "Also write one clip per prepare reject reason.")

# Where the astronaut's face is in the 512 x 512 photo (centre of dlib's landmarks).
FACE_CENTER = (224.0, 130.0)
# (espeak-ng voice, speaker, accent) for the audio captions.
VOICES = (("en-us", "male", "American"), ("en-us+f2", "female", "American"),
          ("en-us+m3", "male", "American"), ("en-us+f4", "female", "American"),
          ("en-gb-x-rp", "male", "British"), ("en-gb-x-rp+f3", "female", "British"),
          ("en-029+m2", "male", "Caribbean"), ("en-gb-scotland+f1", "female", "Scottish"))
SENTENCES = (
    "The rocket launch is set for noon.", "Please check the oxygen levels.",
    "We can see the whole planet from here.", "The weather looks clear today.",
    "Turn left at the next station.", "I left my helmet in the lab.",
    "Our mission starts next Monday.", "The stars are very bright tonight.",
    "Can you hear me over the radio?", "Dinner is ready in five minutes.",
    "The engines are running smoothly.", "Let me read the numbers again.",
    "Hold the camera a little higher.", "This is my favourite photo.",
    "We landed safely on the moon.", "The coffee machine is broken again.",
    "Send the report before lunch.", "Open the hatch very slowly.",
    "My sister lives near the ocean.", "The crew is sleeping right now.",
    "Water boils at a lower temperature up here.", "Keep both hands on the panel.",
    "Tomorrow we test the new suit.", "I will call you after the flight.",
    "The library closes at six.", "Count to ten and breathe out.",
    "Everyone loves a good story.", "The signal is getting weaker.",
    "Pass me the blue cable, please.", "We need more light in this room.",
    "Look at the moon over the hills.", "The training took almost a year.")
MOUTH_INTERIOR = np.array([70.0, 22.0, 28.0])  # RGB of the opened mouth's dark interior
MAX_OPENING = 0.4  # mouth gap at the loudest frame, as a fraction of the mouth width
UPPER_SHARE = 0.1  # share of the gap made by raising the upper lip (the jaw makes the rest)


# ---------------------------------------------------------------- the face and its mouth

def base_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
  """The astronaut cropped around her face, scaled, maybe mirrored, and relit: uint8 (S,S,3)."""
  photo = skimage.data.astronaut()
  crop = rng.uniform(140, 170)  # dlib's face box is ~87 px in the photo: >= 80 px at size 160
  cx, cy = FACE_CENTER + rng.uniform(-8, 8, size=2)
  x0, y0 = int(round(cx - crop / 2)), int(round(cy - crop / 2))
  side = int(round(crop))
  image = cv2.resize(photo[y0:y0 + side, x0:x0 + side], (size, size),
                     interpolation=cv2.INTER_AREA).astype(np.float32)
  mirrored = bool(rng.random() < 0.5)
  if mirrored:
    image = image[:, ::-1]
  gain = rng.uniform(0.75, 1.2)
  tint = rng.uniform(0.9, 1.1, size=3)
  image = np.clip(image * gain * tint, 0, 255).astype(np.uint8)
  looks = {"mirrored": mirrored, "gain": gain, "warm": tint[0] - tint[2]}
  return np.ascontiguousarray(image), looks


class MouthWarp:
  """Opens the mouth of one face image by `amount` in [0, 1] (0: as photographed)."""

  def __init__(self, image: np.ndarray, landmarks: np.ndarray):
    self.image = image
    self.height, self.width = image.shape[:2]
    # The mouth opens along the lower inner lip: the upper lip and teeth stay, the lower lip
    # and jaw drop (as when the jaw opens), which is how dlib's inner-lip points see it.
    lower_inner = landmarks[[60, 67, 66, 65, 64]]
    order = np.argsort(lower_inner[:, 0])  # mirrored faces list the points right to left
    self.lip_x, self.lip_y = lower_inner[order, 0], lower_inner[order, 1] - 0.5
    self.center_x = (landmarks[60, 0] + landmarks[64, 0]) / 2
    self.half_width = abs(landmarks[64, 0] - landmarks[60, 0]) / 2
    split_y = self.lip_y.max()
    chin_y, nose_y = landmarks[8, 1], landmarks[33, 1]
    # The jaw moves down to below the chin, the upper lip up to the nose: the displacement
    # fades linearly to 0 at these lines, so the warp is continuous away from the lip line.
    self.jaw_end = min(chin_y + 0.25 * (chin_y - split_y), self.height - 1)
    self.lip_top = nose_y
    self.max_gap = MAX_OPENING * abs(landmarks[54, 0] - landmarks[48, 0])
    self.grid_y, self.grid_x = np.mgrid[0:self.height, 0:self.width].astype(np.float32)

  def render(self, amount: float, shift=(0.0, 0.0)) -> np.ndarray:
    """The image with the mouth opened by amount * MAX_OPENING, moved by `shift` (dx, dy) px."""
    xs = self.grid_x - np.float32(shift[0])
    ys = self.grid_y - np.float32(shift[1])
    # Lens-shaped gap: widest at the mouth centre, closed at the corners.
    across = np.clip(1 - ((xs - self.center_x) / self.half_width) ** 2, 0, 1) ** 0.6
    gap = amount * self.max_gap * across
    split_y = np.interp(xs, self.lip_x, self.lip_y).astype(np.float32)
    below = ys >= split_y
    jaw = (1 - UPPER_SHARE) * gap * np.clip((self.jaw_end - ys) / (self.jaw_end - split_y), 0, 1)
    lip = UPPER_SHARE * gap * np.clip((ys - self.lip_top) / (split_y - self.lip_top), 0, 1)
    source_y = np.where(below, ys - jaw, ys + lip)
    # How far a pixel samples across the lip line: > 0 inside the opened gap.
    depth = np.where(below, split_y - source_y, source_y - split_y)
    out = cv2.remap(self.image, xs, source_y.astype(np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    alpha = np.clip(depth, 0, 1)[..., None]  # one pixel of anti-aliasing at the lips
    shade = 0.6 + 0.4 * np.clip(np.abs(ys - split_y) / (self.max_gap / 2 + 1), 0, 1)
    interior = MOUTH_INTERIOR * shade[..., None]
    return np.clip(out * (1 - alpha) + interior * alpha, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- speech

def mouth_amounts(envelope: np.ndarray) -> np.ndarray:
  """Mouth opening in [0, 1] per frame: the envelope smoothed over 3 frames, relative to its
  peak, with the quietest tenth of the range (breath, fade-outs) kept closed."""
  smooth = np.convolve(np.pad(envelope, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
  peak = smooth.max()
  if peak <= 0:
    return np.zeros_like(envelope)
  return np.clip((smooth / peak - 0.1) / 0.9, 0, 1)


def spoken_in_two_parts(text: str, fraction: float) -> tuple[str, str]:
  """The sentence split at the word boundary nearest `fraction` of its words (both parts
  non-empty), where the speaker pauses."""
  words = text.split()
  cut = min(max(1, int(round(fraction * len(words)))), len(words) - 1)
  return " ".join(words[:cut]), " ".join(words[cut:])


def fitted_speech(synth: speech.Synthesizer, parts: tuple[str, ...], voice: str, rate: int,
                  pitch: int, num_samples: int, lead: int, pause: int) -> tuple[np.ndarray, int]:
  """(wave, words per minute used): `parts` spoken after `lead` silent samples with `pause`
  silent samples between them, num_samples long.

  Speech too long for the clip is re-synthesised faster (so the transcript stays true); what
  still does not fit is cut with a 20 ms fade.
  """
  room = num_samples - lead - synth.sample_rate // 10

  def say(rate):
    gap = np.zeros(pause, np.float32)
    pieces = [synth.synthesize(part, voice, rate, pitch) for part in parts]
    return np.concatenate([x for piece in pieces for x in (piece, gap)][:-1])

  said = say(rate)
  if said.size > room:
    rate = min(int(rate * said.size / room) + 1, 400)
    said = say(rate)
  said = said[:num_samples - lead].copy()
  fade = min(said.size, synth.sample_rate // 50)
  said[said.size - fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
  out = np.zeros(num_samples, np.float32)
  out[lead:lead + said.size] = said
  return out, rate


# ---------------------------------------------------------------- writing clips

def write_wav(path: str, samples: np.ndarray, sample_rate: int):
  with wave.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(sample_rate)
    f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def encode_mp4(path: str, frames: np.ndarray, fps: float, audio: np.ndarray | None,
               sample_rate: int):
  """H.264 (yuv420p) video + AAC audio (none if audio is None) into path, via ffmpeg."""
  height, width = frames.shape[1:3]
  cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps}", "-i", "pipe:0"]
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or ".") as tmp:
    if audio is not None:
      audio_path = os.path.join(tmp, "audio.wav")
      write_wav(audio_path, audio, sample_rate)
      cmd += ["-i", audio_path, "-c:a", "aac", "-b:a", "64k"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-threads", "1", "-movflags", "+faststart", path]
    result = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(),
                            capture_output=True)
  if result.returncode != 0:
    raise RuntimeError(f"ffmpeg failed writing {path}: {result.stderr.decode()[-2000:]}")


def _describe(looks: dict, voice: tuple, rate: int, pitch: int) -> tuple[str, str]:
  light = "bright" if looks["gain"] > 1.05 else "dim" if looks["gain"] < 0.9 else "soft"
  tone = "warm" if looks["warm"] > 0.05 else "cool" if looks["warm"] < -0.05 else "neutral"
  side = ", seen mirrored" if looks["mirrored"] else ""
  video_caption = (f"A close-up of a woman with short brown hair in a white spacesuit talking "
                   f"to the camera{side}, in {light} {tone} light.")
  _, speaker, accent = voice
  height = "low" if pitch < 42 else "high" if pitch > 58 else "medium"
  pace = "slowly" if rate < 160 else "quickly" if rate > 180 else "at a steady pace"
  audio_caption = (f"A {speaker} voice with a {height} pitch speaks {pace} in {accent} English "
                   "in a quiet room.")
  return video_caption, audio_caption


class ClipMaker:
  """Renders clips; holds the speech engine and the face tracker (both slow to build)."""

  def __init__(self, fps: float, seconds: float, size: int):
    if size % 2 or size < 128:
      raise UserError(f"--size must be even and >= 128 (a face of >= 80 px), got {size}")
    self.fps, self.seconds, self.size = fps, seconds, size
    self.synth = speech.Synthesizer()
    self.tracker = faces.MouthTracker(detect_every=1)

  def talking_clip(self, rng: np.random.Generator, seconds: float | None = None):
    """(frames uint8 (T,S,S,3), audio float32, sidecar dict) of one talking clip."""
    seconds = self.seconds if seconds is None else seconds
    num_frames = int(round(seconds * self.fps))
    rate_hz = self.synth.sample_rate
    image, looks = base_image(rng, self.size)
    track = self.tracker.track(image[None])
    if track.face_frac == 0:
      raise RuntimeError("dlib found no face in the demo's base image; --size too small?")
    warp = MouthWarp(image, track.landmarks[0])
    voice = VOICES[rng.integers(len(VOICES))]
    rate, pitch = int(rng.integers(145, 196)), int(rng.integers(30, 71))
    text = SENTENCES[rng.integers(len(SENTENCES))]
    lead = int(rng.uniform(0.05, 0.25) * rate_hz)
    # A pause mid-sentence, at a place and of a length of its own per clip: the mouth closes
    # there, an event only this clip's audio shares (speech that merely fills the clip from
    # start to end gives every clip the same silence-speech-silence shape).
    parts = spoken_in_two_parts(text, rng.uniform(0.3, 0.7))
    pause = int(rng.uniform(0.3, 0.5) * rate_hz)
    audio, rate = fitted_speech(self.synth, parts, voice[0], rate, pitch,
                                int(round(seconds * rate_hz)), lead, pause)
    # The loudness the sync score reads, so lips and score agree by construction.
    amounts = mouth_amounts(sync.audio_envelope(audio, rate_hz, self.fps, num_frames))
    # A slow sway of the head (about a pixel) so that frames differ away from the mouth too.
    phase = rng.uniform(0, 2 * np.pi, size=2)
    times = np.arange(num_frames) / self.fps
    sway = 1.2 * np.sin(2 * np.pi * 0.4 * times[:, None] + phase)
    frames = np.stack([warp.render(a, s) for a, s in zip(amounts, sway)])
    video_caption, audio_caption = _describe(looks, voice, rate, pitch)
    sidecar = {"video_caption": video_caption, "audio_caption": audio_caption,
               "transcript": text}
    return frames, audio, sidecar

  def faceless_clip(self, rng: np.random.Generator):
    """A slow pan over a landscape photo with speech over it."""
    frames, audio, spoken = self.talking_clip(rng)
    photo = skimage.data.rocket()  # 427 x 640
    side = photo.shape[0]
    steps = np.linspace(0, photo.shape[1] - side, len(frames)).astype(int)
    pans = np.stack([cv2.resize(photo[:, x:x + side], (self.size, self.size),
                                interpolation=cv2.INTER_AREA) for x in steps])
    sidecar = {"video_caption": "A slow pan across a rocket on its launch pad under a blue sky.",
               "audio_caption": "A voice speaks over the scene.",
               "transcript": spoken["transcript"]}
    return pans, audio, sidecar


def _write_sidecar(path: str, sidecar: dict):
  with open(path, "w") as f:
    json.dump(sidecar, f, indent=1)


def _write_corrupt(path: str, good_mp4: str, rng: np.random.Generator):
  """The first 32 bytes of a real mp4 (its `ftyp` box) followed by noise: not decodable."""
  with open(good_mp4, "rb") as f:
    header = f.read(32)
  with open(path, "wb") as f:
    f.write(header + rng.integers(0, 256, size=20000, dtype=np.uint8).tobytes())


def make_corpus(out: str, num_clips: int, seed: int = 0, fps: float = 8.0,
                seconds: float = 2.5, size: int = 160, with_bad_clips: bool = False) -> list[str]:
  """Writes the corpus into `out`; returns the mp4 paths (good clips first)."""
  maker = ClipMaker(fps, seconds, size)  # checks --size before anything is written
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  paths = []
  # ffmpeg runs in threads while the next clip is rendered (two cores: one each).
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    pending = []
    for index in range(num_clips):
      frames, audio, sidecar = maker.talking_clip(np.random.default_rng([seed, index]))
      path = os.path.join(out, f"clip_{index:05d}.mp4")
      _write_sidecar(path[:-4] + ".json", sidecar)
      pending.append(pool.submit(encode_mp4, path, frames, fps, audio, maker.synth.sample_rate))
      paths.append(path)
      if (index + 1) % 10 == 0 or index + 1 == num_clips:
        logging.info("rendered %d/%d clips (%.1f s)", index + 1, num_clips,
                     time.perf_counter() - start)
    for future in pending:
      future.result()
  if with_bad_clips:
    paths += _write_bad_clips(out, maker, num_clips, seed, fps)
  logging.info("wrote %d clips to %s in %.1f s", len(paths), out, time.perf_counter() - start)
  return paths


def _write_bad_clips(out: str, maker: ClipMaker, first_index: int, seed: int,
                     fps: float) -> list[str]:
  """One clip per prepare reject reason, named clip_NNNNN_<what is wrong>.mp4."""
  rate_hz = maker.synth.sample_rate
  paths = {kind: os.path.join(out, f"clip_{first_index + i:05d}_{kind}.mp4")
           for i, kind in enumerate(("corrupt", "no_audio", "faceless", "too_short"))}
  rng = np.random.default_rng([seed, first_index, 1])
  frames, audio, sidecar = maker.talking_clip(rng)
  encode_mp4(paths["no_audio"], frames, fps, None, rate_hz)
  _write_sidecar(paths["no_audio"][:-4] + ".json", sidecar)
  _write_corrupt(paths["corrupt"], paths["no_audio"], rng)
  _write_sidecar(paths["corrupt"][:-4] + ".json", sidecar)
  frames, audio, sidecar = maker.faceless_clip(rng)
  encode_mp4(paths["faceless"], frames, fps, audio, rate_hz)
  _write_sidecar(paths["faceless"][:-4] + ".json", sidecar)
  frames, audio, sidecar = maker.talking_clip(rng, seconds=1.0)
  encode_mp4(paths["too_short"], frames, fps, audio, rate_hz)
  _write_sidecar(paths["too_short"][:-4] + ".json", sidecar)
  logging.info("wrote bad clips: %s", ", ".join(sorted(paths)))
  return list(paths.values())


def main(argv):
  del argv
  make_corpus(FLAGS.out, FLAGS.num_clips, FLAGS.seed, FLAGS.fps, FLAGS.seconds, FLAGS.size,
              FLAGS.with_bad_clips)


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  cli.run(main)
