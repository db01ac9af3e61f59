"""Writes the demo's prompts: the held-out (eval) clips' prompts with their first frame as the I2V
reference, then the text-only prompts of configs/demo_prompts.jsonl.

  python -m data_prep.demo_prompts --dataset=demo/dataset --out=demo/prompts.jsonl --config=configs/demo.py

The reference frame is decoded from the prepared latents, so it is framed exactly as in training.
With --references=DIR the same held-out clips are also written whole (video and audio decoded
from their latents, muxed to mp4): the lip-sync score's ground truth at the samples' resolution
and through the same codecs, so generated and real clips are compared like for like.
"""
import json
import os

import cv2
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jova_jax import codecs, config_lib, media
from jova_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config of the demo run.")
_DATASET = flags.DEFINE_string("dataset", "demo/dataset", "Prepared dataset directory.")
_OUT = flags.DEFINE_string("out", "demo/prompts.jsonl", "Prompts file to write.")
_NUM_I2V = flags.DEFINE_integer("num_i2v", 4, "Held-out clips used as image-to-video prompts.")
_REFERENCES = flags.DEFINE_string("references", "", "Folder for the held-out clips as decoded mp4s.")
_TEXT_ONLY = flags.DEFINE_string("text_only", "configs/demo_prompts.jsonl", "Text-only prompts appended.")


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def write_references(config, source, video_codec, out_dir: str, count: int) -> None:
  audio_codec = codecs.get_audio_codec(config)
  num_samples = config_lib.audio_num_samples(config)
  os.makedirs(out_dir, exist_ok=True)
  for i in range(min(count, len(source))):
    record = source[i]
    clip_id = _text(record["clip_id"])
    frames = video_codec.decode(np.asarray(record["video_latent"], np.float32)[None])[0]
    wave = audio_codec.decode(np.asarray(record["audio_latent"], np.float32)[None])[0]
    wave = media.fit_length(wave, num_samples)
    media.write_mp4(os.path.join(out_dir, f"{clip_id}.mp4"), frames, config.video.fps, wave,
                    config.audio.sample_rate)


def main(argv):
  del argv
  config = _CONFIG.value
  config.data.dir = _DATASET.value
  source = pipeline.open_source(config, config.data.eval_split)
  codec = codecs.get_video_codec(config)
  if _REFERENCES.value:
    write_references(config, source, codec, _REFERENCES.value, _NUM_I2V.value)
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  os.makedirs(os.path.join(out_dir, "reference_frames"), exist_ok=True)
  lines = []
  for i in range(min(_NUM_I2V.value, len(source))):
    record = source[i]
    clip_id = _text(record["clip_id"])
    caption = _text(record["caption"])
    frame = codec.decode(np.asarray(record["video_latent"], np.float32)[None])[0, 0]
    image = os.path.join(out_dir, "reference_frames", f"{clip_id}.png")
    cv2.imwrite(image, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    lines.append({"name": f"i2v_{clip_id}", "prompt": caption, "image": image, "seed": 100 + i})
  with open(_TEXT_ONLY.value) as f:
    lines += [json.loads(line) for line in f if line.strip()]
  with open(_OUT.value, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  print(f"wrote {len(lines)} prompts ({min(_NUM_I2V.value, len(source))} image-to-video) to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
