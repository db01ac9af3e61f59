"""Writes the demo's prompts: the held-out (eval) clips' prompts with their first frame as the I2V
reference, then the text-only prompts of configs/demo_prompts.jsonl.

  python -m data_prep.demo_prompts --dataset=demo/dataset --out=demo/prompts.jsonl --config=configs/demo.py

The reference frame is decoded from the prepared latents, so it is framed exactly as in training.
Stored records are in codec space (data/latent_norm.py): the codecs decode them as they are, with
no statistics to undo.
With --references=DIR the same held-out clips are also written whole (video and audio decoded
from their latents, muxed to mp4): the lip-sync score's ground truth at the samples' resolution
and through the same codecs, so generated and real clips are compared like for like.
"""
import json
import os

import cv2
import numpy as np
from absl import flags
from ml_collections import config_flags

from jova_jax import cli, codecs, config_lib
from jova_jax.data import pipeline
from jova_jax.media import io as media

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config of the demo run.")
_DATASET = flags.DEFINE_string("dataset", "demo/dataset", "Prepared dataset directory.")
_OUT = flags.DEFINE_string("out", "demo/prompts.jsonl", "Prompts file to write.")
_NUM_I2V = flags.DEFINE_integer("num_i2v", 4, "Held-out clips used as image-to-video prompts.")
_REFERENCES = flags.DEFINE_string("references", "", "Folder for the held-out clips as decoded mp4s.")
_TEXT_ONLY = flags.DEFINE_string("text_only", "configs/demo_prompts.jsonl", "Text-only prompts appended.")


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def write_reference(path: str, record, frames, audio_codec, config) -> None:
  """The clip as training saw it: decoded frames plus decoded audio, muxed to mp4."""
  wave = audio_codec.decode(np.asarray(record["audio_latent"], np.float32)[None])[0]
  wave = media.fit_length(wave, config_lib.audio_num_samples(config))
  media.write_mp4(path, frames, config.video.fps, wave, config.audio.sample_rate)


def main(argv):
  del argv
  config = _CONFIG.value
  config.data.dir = _DATASET.value
  source = pipeline.open_source(config, config.data.eval_split)
  codec = codecs.get_video_codec(config)
  audio_codec = codecs.get_audio_codec(config) if _REFERENCES.value else None
  if _REFERENCES.value:
    os.makedirs(_REFERENCES.value, exist_ok=True)
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  os.makedirs(os.path.join(out_dir, "reference_frames"), exist_ok=True)
  lines = []
  for i in range(min(_NUM_I2V.value, len(source))):
    record = source[i]
    clip_id = _text(record["clip_id"])
    caption = _text(record["caption"])
    frames = codec.decode(np.asarray(record["video_latent"], np.float32)[None])[0]
    image = os.path.join(out_dir, "reference_frames", f"{clip_id}.png")
    cv2.imwrite(image, cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR))
    lines.append({"name": f"i2v_{clip_id}", "prompt": caption, "image": image, "seed": 100 + i})
    if audio_codec is not None:
      write_reference(os.path.join(_REFERENCES.value, f"{clip_id}.mp4"), record, frames,
                      audio_codec, config)
  with open(_TEXT_ONLY.value) as f:
    lines += [json.loads(line) for line in f if line.strip()]
  with open(_OUT.value, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  print(f"wrote {len(lines)} prompts ({min(_NUM_I2V.value, len(source))} image-to-video) to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
