"""Raw talking clips -> the prepared dataset (docs/design.md section 4).

  python -m data_prep.prepare --input=CLIPS_DIR_OR_JSONL --output=DATASET_DIR --config=configs/demo.py
  # cluster: one job per shard, then one finalize
  python -m data_prep.prepare --input=... --output=DS --config=... --num_shards=N --shard_index=i
  python -m data_prep.prepare finalize --output=DS --config=...

A single-shard run (the default) finalizes itself. Bad clips go to DATASET_DIR/rejects.jsonl.
The dataset in DATASET_DIR is replaced only when a run keeps at least one clip, and one prepared
from another input or settings only with --overwrite (data_prep/shards.py).
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from data_prep import job, shards
from jova_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.")
_INPUT = flags.DEFINE_string("input", None, "Folder of *.mp4 (+ NAME.json captions) or a JSONL manifest.")
_OUTPUT = flags.DEFINE_string("output", None, "Prepared dataset directory.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "Fraction of clips (by clip_id hash) in 'eval'.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of shard jobs over the input.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This job's shard, in [0, num_shards).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes for decoding and face tracking.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Clips per codec / text-encoder call.")
_MIN_FACE_FRAC = flags.DEFINE_float("min_face_frac", 0.5, "Reject clips with a face in fewer frames.")
_CROP_MARGIN = flags.DEFINE_float("crop_margin", 0.5,
                                  "Face-centred crop: context on each side, as a fraction of the face size.")
_DETECT_EVERY = flags.DEFINE_integer("detect_every", 4, "Run the face detector on every n-th frame.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a dataset in --output that was prepared "
                                "from another input or settings (a rerun of the same needs no flag).")
_BENCH = flags.DEFINE_bool("bench", False, "Print clips/s and frames/s per stage as JSON to stdout.")


def main(argv):
  if len(argv) > 2 or (len(argv) == 2 and argv[1] != "finalize"):
    raise app.UsageError(f"the only command is 'finalize', got {argv[1:]}")
  if _CONFIG.value is None or not _OUTPUT.value:
    raise app.UsageError("--config and --output are required")
  config = _CONFIG.value
  if len(argv) == 2:
    metadata = shards.finalize(_OUTPUT.value, config)
    logging.info("finalized %s: counts %s, rejects %s", _OUTPUT.value, metadata["counts"],
                 metadata["rejects"])
    return
  if not _INPUT.value:
    raise app.UsageError("--input is required (a folder of clips or a JSONL manifest)")
  report = job.run_shard(
      config, _INPUT.value, _OUTPUT.value, num_shards=_NUM_SHARDS.value,
      shard_index=_SHARD_INDEX.value, eval_fraction=_EVAL_FRACTION.value, workers=_WORKERS.value,
      batch_size=_BATCH_SIZE.value, min_face_frac=_MIN_FACE_FRAC.value,
      crop_margin=_CROP_MARGIN.value, detect_every=_DETECT_EVERY.value,
      overwrite=_OVERWRITE.value)
  for line in shards.summary_lines(report["kept"], report["rejects"], report["timings"]):
    logging.info("%s", line)
  if _NUM_SHARDS.value == 1:
    metadata = shards.finalize(_OUTPUT.value, config)
    logging.info("finalized %s: counts %s", _OUTPUT.value, metadata["counts"])
  if _BENCH.value:
    print(json.dumps({"kept": report["kept"], "rejects": report["rejects"], **report["timings"]},
                     indent=1))


if __name__ == "__main__":
  cli.run(main)
