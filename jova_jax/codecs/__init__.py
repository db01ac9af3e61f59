"""Video and audio codecs behind one interface (docs/design.md section 5), chosen by config.

get_video_codec(config) / get_audio_codec(config) build the codec named by config.video.codec /
config.audio.codec and refuse one whose properties disagree with the config, so latent shapes
computed by config_lib always match what the codec produces. Built-ins need no weights;
`weights_dir` (default config.weights_dir) is where pretrained ports will read theirs.
"""
from __future__ import annotations

from jova_jax.codecs.base import AudioCodec, VideoCodec, pixel_mask_to_latent
from jova_jax.codecs.mel import MelCodec
from jova_jax.codecs.mmaudio import MMAudioCodec
from jova_jax.codecs.pixels import PixelsCodec
from jova_jax.codecs.wan21 import Wan21Codec

# name -> factory(config, weights_dir)
VIDEO_CODECS = {
    "pixels": lambda config, weights_dir: PixelsCodec(config.video.spatial_factor),
    "wan21": lambda config, weights_dir: Wan21Codec.from_weights_dir(weights_dir),
}
AUDIO_CODECS = {
    "mel": lambda config, weights_dir: MelCodec(),
    "mmaudio16k": lambda config, wd: MMAudioCodec.from_weights_dir("mmaudio16k", wd),
    "mmaudio44k": lambda config, wd: MMAudioCodec.from_weights_dir("mmaudio44k", wd),
}


def _weights_dir(config, weights_dir):
  return weights_dir if weights_dir is not None else config.get("weights_dir", "")


def _build(kind: str, registry: dict, config, weights_dir):
  name = config[kind].codec
  if name not in registry:
    raise ValueError(f"{kind}.codec={name!r} is not a known {kind} codec; known: "
                     f"{', '.join(sorted(registry))}")
  return registry[name](config, _weights_dir(config, weights_dir))


def _check(kind: str, codec, config, keys) -> None:
  """Refuses a codec whose properties differ from config.<kind>.<key>, naming both values."""
  errors = []
  for key in keys:
    want, have = config[kind][key], getattr(codec, key)
    if float(want) != float(have):
      errors.append(f"{kind}.{key}={want} in the config, but the {codec.name!r} codec has "
                    f"{key}={have}")
  if errors:
    hint = ""
    if codec.name == "pixels":
      hint = "\n  (the pixels codec has temporal_factor 1 and latent_channels 3*spatial_factor**2)"
    raise ValueError(f"{kind} codec {codec.name!r} does not match the config:\n  - " +
                     "\n  - ".join(errors) + hint)


def get_video_codec(config, weights_dir: str | None = None) -> VideoCodec:
  codec = _build("video", VIDEO_CODECS, config, weights_dir)
  _check("video", codec, config, ("temporal_factor", "spatial_factor", "latent_channels"))
  return codec


def get_audio_codec(config, weights_dir: str | None = None) -> AudioCodec:
  codec = _build("audio", AUDIO_CODECS, config, weights_dir)
  _check("audio", codec, config, ("sample_rate", "latent_channels", "latents_per_second"))
  return codec


__all__ = ["AudioCodec", "VideoCodec", "pixel_mask_to_latent", "get_audio_codec",
           "get_video_codec", "PixelsCodec", "MelCodec"]
