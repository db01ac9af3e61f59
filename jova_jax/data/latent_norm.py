"""Latent normalisation: the one contract between the codecs, the prepared dataset, the trainer
and the sampler (README "Latent normalisation").

Two spaces:
  codec space  what codec.encode returns and codec.decode takes. The prepared dataset stores its
               latents in this space (float16): statistics are never baked into the records, so
               a dataset stays valid when its statistics are recomputed.
  model space  what the model trains on and the sampler's ODE integrates:
               normalize(x) = (x - mean) / std per channel (last axis); denormalize is its inverse.

Which mean and std, per modality (a `Stream`, whose `source` says why):
  "codec"     the codec's encode already normalises (codec.normalises): Wan2.1 with its published
              per-channel latents_mean / latents_std, MMAudio with a latent_stats.json beside its
              weights, the built-in pixels (x / 127.5 - 1) and mel (fixed per-bin MEAN / STD)
              codecs. Mean 0, std 1: the identity.
  "measured"  a codec without published statistics (MMAudio without latent_stats.json): the
              per-channel mean and std of the train split's float32 latents, measured by prepare
              (float64 sums over every latent position; a std under 1e-6 is stored as 1).

Where the statistics live and who applies them:
  dataset     metadata.json "latent_norm": {"video": {"source", "mean", "std"}, "audio": {...}},
              written by data_prep (shards.finalize).
  pipeline    data/pipeline.decode normalises every record: train and eval batches are model space.
  run         the trainer copies the dataset's statistics into the run's config as
              data.latent_norm, saved in <workdir>/config.json and with every checkpoint, so
              sampling.loading.load_run finds them without the dataset folder.
  sampler     sampling.generate.Pipeline normalises the latents of given media (video, audio,
              first frame) and denormalises the model's outputs before codec.decode;
              training/preview.py does the same with the dataset's statistics;
              data_prep/demo_prompts.py decodes stored records, which are codec space, as
              they are.
Absent statistics mean the identity: synthetic data, datasets and runs from before this contract
(their metadata held flat, never-applied "video_mean"... keys, their configs no data.latent_norm),
which trained on codec-space latents and are sampled the same way.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jova_jax.config_lib import ConfigError
from jova_jax.data.features import DatasetError

CODEC, MEASURED = "codec", "measured"
SOURCES = (CODEC, MEASURED)
MODALITIES = ("video", "audio")


def source_for(codec) -> str:
  """CODEC when the codec's encode normalises by itself, else MEASURED (prepare measures)."""
  return CODEC if codec.normalises else MEASURED


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
  """One modality's per-channel statistics; mean and std are float32 (C,)."""
  source: str
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def identity(cls, channels: int) -> "Stream":
    return cls(CODEC, np.zeros(channels, np.float32), np.ones(channels, np.float32))

  @property
  def is_identity(self) -> bool:
    return not self.mean.any() and bool((self.std == 1).all())

  def normalize(self, latents):
    """Codec space -> model space over the last axis (numpy or jax); the identity returns its
    input unchanged, so it is exact."""
    return latents if self.is_identity else (latents - self.mean) / self.std

  def denormalize(self, latents):
    """Model space -> codec space: the inverse of normalize, to float32 rounding (a round trip
    is within 2e-6 * (|x| + |mean|))."""
    return latents if self.is_identity else latents * self.std + self.mean

  def to_json(self) -> dict:
    return {"source": self.source, "mean": self.mean.tolist(), "std": self.std.tolist()}


@dataclasses.dataclass(frozen=True, eq=False)
class LatentNorm:
  video: Stream
  audio: Stream

  @classmethod
  def identity(cls, config) -> "LatentNorm":
    return cls(Stream.identity(int(config.video.latent_channels)),
               Stream.identity(int(config.audio.latent_channels)))

  @classmethod
  def from_json(cls, value, config, where: str, error=DatasetError) -> "LatentNorm":
    """The statistics in a metadata.json or config value; identity when there are none (None,
    or the flat pre-contract layout). Raises `error` naming `where` for malformed ones (a
    modality missing among them, a wrong channel count, a std <= 0)."""
    value = value.to_dict() if hasattr(value, "to_dict") else value  # a ConfigDict
    if not isinstance(value, dict) or not any(m in value for m in MODALITIES):
      return cls.identity(config)
    streams = {}
    for m in MODALITIES:
      entry, channels = value.get(m), int(config[m].latent_channels)
      entry = entry if isinstance(entry, dict) else {}
      mean = np.asarray(entry.get("mean", ()), np.float32).reshape(-1)
      std = np.asarray(entry.get("std", ()), np.float32).reshape(-1)
      if (entry.get("source") not in SOURCES or mean.shape != (channels,) or
          std.shape != (channels,) or not np.isfinite(mean).all() or not (std > 0).all()):
        raise error(f"{where}: latent_norm.{m} needs source {' or '.join(SOURCES)} and mean / "
                    f"std lists of {channels} finite floats (std > 0), found source "
                    f"{entry.get('source')!r} and {mean.size} / {std.size} values")
      streams[m] = Stream(entry["source"], mean, std)
    return cls(**streams)

  def to_json(self) -> dict:
    return {m: getattr(self, m).to_json() for m in MODALITIES}


def of_run(config) -> LatentNorm:
  """The statistics a run trained with (data.latent_norm, set by the trainer); identity for a
  run from before the contract."""
  return LatentNorm.from_json(config.data.get("latent_norm"), config,
                              "the run's config data.latent_norm", ConfigError)
