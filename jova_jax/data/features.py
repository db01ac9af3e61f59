"""The prepared dataset (docs/design.md section 4): schema, shard writer, finalize,
dataset-level metadata.

Layout of a dataset directory after `finalize`:
  jova-<split>.array_record-<i>-of-<n>   ArrayRecord shards, one tf.train.Example per record
  dataset_info.json, features.json       TFDS metadata (tfds.builder_from_directory reads them)
  metadata.json                          our dataset-level metadata (codecs, shapes, counts...)
While jobs run, each ShardWriter writes shards/<split>/<shard_name>.array_record; finalize
renames them to the TFDS names. Everything here works with no TensorFlow installed: examples
are encoded by the features' own `encode_example` (tensors as raw bytes) and serialized by
TFDS's ExampleSerializer (protobuf only), and `write_metadata` runs with check_data=False
(its check reads via tf.data).
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer

from jova_jax.config_lib import LatentShapes, latent_shapes
from jova_jax.errors import UserError

DATASET_NAME = "jova"
PENDING_DIR = "shards"
SHARD_SUFFIX = ".array_record"
# One record per chunk: the trainer reads records in random order.
ARRAY_RECORD_OPTIONS = "group_size:1"
_FINAL_SHARD = re.compile(
    rf"^{DATASET_NAME}-(?P<split>\w+)\.array_record-(?P<index>\d+)-of-(?P<count>\d+)$")
_SHARD_NAME = re.compile(r"^[\w.-]+$")


class DatasetError(UserError):
  """A prepared dataset that cannot be written or read; the message names the path and the key."""


def dataset_features(config, shapes: LatentShapes | None = None) -> tfds.features.FeaturesDict:
  """The TFDS schema of one example (docs/design.md section 4), shapes from the config
  (shapes: the run's, when the caller derived them)."""
  shapes = shapes or latent_shapes(config)
  t, h, w, _ = shapes.video

  def tensor(shape, dtype):
    # Raw bytes: 2 bytes per float16 and ~8x faster to write than a proto float_list.
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)

  return tfds.features.FeaturesDict({
      "video_latent": tensor(shapes.video, np.float16),
      "audio_latent": tensor(shapes.audio, np.float16),
      "mouth_mask": tensor((t, h, w), np.uint8),
      "text_emb": tensor((None, int(config.text.width)), np.float16),
      "caption": tfds.features.Text(),
      "clip_id": tfds.features.Text(),
      "face_frac": tfds.features.Scalar(dtype=np.float32),
  })


class ShardWriter:
  """Writes one ArrayRecord shard of one split.

  The shard lives under a temporary name until `close`, which renames it: a crashed job never
  leaves a half-written shard under a name that finalize would pick up.
  """

  def __init__(self, out_dir, split: str, shard_name: str, features: tfds.features.FeaturesDict):
    if not _SHARD_NAME.match(shard_name) or not re.match(r"^\w+$", split):
      raise DatasetError(f"shard {split!r}/{shard_name!r} in {out_dir}: split must be a word and the "
                         f"shard name letters, digits, '_', '.', '-'")
    self.split = split
    self.features = features
    split_dir = os.path.join(os.fspath(out_dir), PENDING_DIR, split)
    os.makedirs(split_dir, exist_ok=True)
    self.path = os.path.join(split_dir, shard_name + SHARD_SUFFIX)
    if os.path.exists(self.path):
      raise DatasetError(f"shard {self.path} already exists: shard names must be unique per split")
    self._tmp_path = f"{self.path}.tmp-{os.getpid()}"
    self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    self._writer = array_record_module.ArrayRecordWriter(self._tmp_path, ARRAY_RECORD_OPTIONS)
    self._float_dtypes = {k: f.np_dtype for k, f in features.items()
                          if isinstance(f, tfds.features.Tensor) and np.issubdtype(f.np_dtype, np.floating)}
    self.num_examples = 0

  def write(self, example: dict) -> None:
    """Writes one example; float arrays are cast to the stored dtype (float16 latents)."""
    example = dict(example)
    for key, dtype in self._float_dtypes.items():
      if key in example:
        example[key] = np.asarray(example[key]).astype(dtype, copy=False)
    missing = sorted(set(self.features.keys()) - set(example))
    if missing:
      raise DatasetError(f"shard {self.path}: example {self.num_examples} lacks keys {missing}")
    try:
      record = self._serializer.serialize_example(self.features.encode_example(example))
    except Exception as e:  # TFDS names the feature and the expected/found shape or dtype.
      raise DatasetError(f"shard {self.path}: example {self.num_examples} "
                         f"(clip_id {example.get('clip_id')!r}) does not match the schema: {e}") from e
    self._writer.write(record)
    self.num_examples += 1

  def close(self) -> dict:
    """Closes and renames the shard; returns a JSON-able report."""
    self._writer.close()
    os.replace(self._tmp_path, self.path)
    return {"split": self.split, "path": self.path, "num_examples": self.num_examples,
            "num_bytes": os.path.getsize(self.path)}


def _num_records(path: str) -> int:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def _collect_shards(out_dir: str) -> dict[str, list[str]]:
  """Shards per split: already-final ones (in index order) then pending ones (by name)."""
  found: dict[str, list[tuple]] = {}
  for name in os.listdir(out_dir):
    m = _FINAL_SHARD.match(name)
    if m:
      found.setdefault(m["split"], []).append((0, int(m["index"]), os.path.join(out_dir, name)))
  pending_root = os.path.join(out_dir, PENDING_DIR)
  if os.path.isdir(pending_root):
    for split in sorted(os.listdir(pending_root)):
      for name in sorted(os.listdir(os.path.join(pending_root, split))):
        if name.endswith(SHARD_SUFFIX):  # *.tmp-* are shards of unfinished or crashed jobs.
          found.setdefault(split, []).append((1, name, os.path.join(pending_root, split, name)))
  return {split: [p for *_, p in sorted(items)] for split, items in found.items()}


def finalize(out_dir, features: tfds.features.FeaturesDict, metadata: dict) -> None:
  """Gives every finished shard its TFDS name and writes the TFDS and dataset metadata.

  Safe to run again after more jobs have written shards: all shards of a split are renumbered.
  `metadata["counts"]` is set from the shards themselves.
  """
  out_dir = os.fspath(out_dir)
  shards = _collect_shards(out_dir)
  split_infos, counts = [], {}
  for split, paths in sorted(shards.items()):
    lengths = {p: _num_records(p) for p in paths}
    for p in paths:
      if lengths[p] == 0:  # TFDS refuses empty shards; an empty job contributes nothing.
        os.remove(p)
    paths = [p for p in paths if lengths[p]]
    if not paths:
      continue
    final = [os.path.join(out_dir, f"{DATASET_NAME}-{split}{SHARD_SUFFIX}-{i:05d}-of-{len(paths):05d}")
             for i in range(len(paths))]
    # Two passes so a renumbering never overwrites a shard that is still to be moved.
    for i, p in enumerate(paths):
      if p != final[i]:
        os.replace(p, f"{final[i]}.renaming")
    for i, p in enumerate(paths):
      if p != final[i]:
        os.replace(f"{final[i]}.renaming", final[i])
    shard_lengths = [lengths[p] for p in paths]
    counts[split] = sum(shard_lengths)
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=shard_lengths, num_bytes=sum(os.path.getsize(f) for f in final),
        filename_template=None))
  if not split_infos:
    raise DatasetError(f"dataset {out_dir}: no finished shards to finalize (looked for "
                       f"{PENDING_DIR}/<split>/*{SHARD_SUFFIX} and final TFDS shards)")
  pending_root = os.path.join(out_dir, PENDING_DIR)
  for split in counts:
    split_dir = os.path.join(pending_root, split)
    if os.path.isdir(split_dir) and not os.listdir(split_dir):
      os.rmdir(split_dir)
  if os.path.isdir(pending_root) and not os.listdir(pending_root):
    os.rmdir(pending_root)
  metadata = json.loads(json.dumps(metadata))  # JSON-able, and a copy.
  metadata["counts"] = counts
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features, split_infos=split_infos, check_data=False,
      description="JoVA prepared dataset (jova-jax docs/design.md section 4)",
      metadata=tfds.core.MetadataDict(metadata))


def default_metadata(config) -> dict:
  """Metadata of a dataset made for `config`; no "latent_norm", which means identity
  normalisation (data/latent_norm.py)."""
  v, a, t = config.video, config.audio, config.text
  shapes = latent_shapes(config)
  return {
      "video_codec": {"name": v.codec, "config": {
          "temporal_factor": int(v.temporal_factor), "spatial_factor": int(v.spatial_factor),
          "latent_channels": int(v.latent_channels)}},
      "audio_codec": {"name": a.codec, "config": {
          "sample_rate": int(a.sample_rate), "latent_channels": int(a.latent_channels),
          "latents_per_second": float(a.latents_per_second)}},
      "text_encoder": {"name": t.encoder, "width": int(t.width)},
      "fps": float(v.fps), "frames": int(v.frames), "height": int(v.height), "width": int(v.width),
      "sample_rate": int(a.sample_rate),
      "video_latent_shape": list(shapes.video), "audio_latent_shape": list(shapes.audio),
      "counts": {}, "rejects": {},
  }


def write_dataset(out_dir, config, examples_by_split: dict, metadata: dict | None = None) -> dict:
  """Writes every split with one ShardWriter each, then finalizes; returns the shard reports."""
  features = dataset_features(config)
  reports = {}
  for split, examples in examples_by_split.items():
    writer = ShardWriter(out_dir, split, "shard-00000", features)
    for example in examples:
      writer.write(example)
    reports[split] = writer.close()
  finalize(out_dir, features, metadata if metadata is not None else default_metadata(config))
  return reports


def read_metadata(dataset_dir) -> dict:
  """The metadata dict stored by finalize."""
  path = os.path.join(os.fspath(dataset_dir), "metadata.json")
  if not os.path.exists(path):
    raise DatasetError(f"dataset {dataset_dir}: no metadata.json (not written by "
                       f"jova_jax.data.features.finalize)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"dataset {dataset_dir}: metadata.json is not valid JSON: {e}") from e


def check_metadata(metadata: dict, config, dataset_dir,
                   shapes: LatentShapes | None = None) -> None:
  """Raises DatasetError listing every way the dataset disagrees with the config."""
  shapes = shapes or latent_shapes(config)
  v, a, t = config.video, config.audio, config.text
  expected = [  # (metadata key path, config keys it derives from, value the config implies)
      (("video_codec", "name"), "video.codec", v.codec),
      (("audio_codec", "name"), "audio.codec", a.codec),
      (("text_encoder", "name"), "text.encoder", t.encoder),
      (("text_encoder", "width"), "text.width", int(t.width)),
      (("fps",), "video.fps", float(v.fps)),
      (("frames",), "video.frames", int(v.frames)),
      (("height",), "video.height", int(v.height)),
      (("width",), "video.width", int(v.width)),
      (("sample_rate",), "audio.sample_rate", int(a.sample_rate)),
      (("video_latent_shape",), "video.*, model.*", list(shapes.video)),
      (("audio_latent_shape",), "audio.*, video.frames, video.fps", list(shapes.audio)),
  ]
  errors = []
  for path, keys, want in expected:
    found, node = True, metadata
    for p in path:
      if not isinstance(node, dict) or p not in node:
        found = False
        break
      node = node[p]
    name = ".".join(path)
    if not found:
      errors.append(f"{name} is missing but config ({keys}) expects {_fmt(want)}")
    elif not _same(node, want):
      errors.append(f"{name} is {_fmt(node)} but config ({keys}) expects {_fmt(want)}")
  if errors:
    raise DatasetError(f"dataset {dataset_dir}: " + "; ".join(errors))


def check_features(features: tfds.features.FeaturesDict, config, dataset_dir,
                   shapes: LatentShapes | None = None) -> None:
  """Raises DatasetError if the stored schema (features.json) differs from the config's."""
  want = dataset_features(config, shapes)
  errors = []
  for key, feature in want.items():
    if key not in features.keys():
      errors.append(f"feature {key!r} is missing")
      continue
    found = features[key]
    if tuple(found.shape) != tuple(feature.shape) or found.np_dtype != feature.np_dtype:
      errors.append(f"feature {key!r} is {_fmt_spec(found)} but the config expects {_fmt_spec(feature)}")
  if errors:
    raise DatasetError(f"dataset {dataset_dir} (features.json): " + "; ".join(errors))


def _fmt_spec(feature) -> str:
  shape = ",".join("None" if d is None else str(d) for d in feature.shape)
  return f"[{shape}] {np.dtype(feature.np_dtype).name}"


def _same(found, want) -> bool:
  if isinstance(want, float) and isinstance(found, (int, float)):
    return math.isclose(found, want, rel_tol=1e-6)
  if isinstance(want, list):
    return isinstance(found, list) and [int(x) for x in found] == want
  return found == want


def _fmt(value) -> str:
  return "[" + ",".join(str(x) for x in value) + "]" if isinstance(value, list) else repr(value)
