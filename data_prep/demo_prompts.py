"""Writes the demo's prompts: the held-out (eval) clips' prompts with their first frame as the I2V
reference, then the text-only prompts of configs/demo_prompts.jsonl.

  python -m data_prep.demo_prompts --dataset=demo/dataset --out=demo/prompts.jsonl --config=configs/demo.py

The reference frame is decoded from the prepared latents, so it is framed exactly as in training.
"""
import json
import os

import cv2
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jova_jax import codecs
from jova_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config of the demo run.")
_DATASET = flags.DEFINE_string("dataset", "demo/dataset", "Prepared dataset directory.")
_OUT = flags.DEFINE_string("out", "demo/prompts.jsonl", "Prompts file to write.")
_NUM_I2V = flags.DEFINE_integer("num_i2v", 4, "Held-out clips used as image-to-video prompts.")
_TEXT_ONLY = flags.DEFINE_string("text_only", "configs/demo_prompts.jsonl", "Text-only prompts appended.")


def main(argv):
  del argv
  config = _CONFIG.value
  config.data.dir = _DATASET.value
  source = pipeline.open_source(config, config.data.eval_split)
  codec = codecs.get_video_codec(config)
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  os.makedirs(os.path.join(out_dir, "reference_frames"), exist_ok=True)
  lines = []
  for i in range(min(_NUM_I2V.value, len(source))):
    record = source[i]
    clip_id = record["clip_id"].decode() if isinstance(record["clip_id"], bytes) else str(record["clip_id"])
    caption = record["caption"].decode() if isinstance(record["caption"], bytes) else str(record["caption"])
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
