"""Grain input pipeline: prepared dataset (docs/design.md section 4) -> global jax batches on
the mesh.

train: source -> shuffle(seed) -> repeat -> this process's slice -> decode (float32, latents
normalised with the dataset's statistics, data/latent_norm.py) -> random drops
(per-example RNG from (seed, index): exact resume) -> batch(B / processes) -> iter (+mp_prefetch)
-> jax.make_array_from_process_local_data, batch sharded by rules.batch_sharding. Repeating before
batching lets a split smaller than one global batch train (its examples recur within a batch).
eval: one in-order pass, the last batch filled with repeats marked example_valid=False, which
the eval step leaves out of its losses.
"""
from __future__ import annotations

import bisect
import functools
import os

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from jova_jax.config_lib import latent_shapes
from jova_jax.data import batch_spec
from jova_jax.data.features import DatasetError, check_features, check_metadata, read_metadata
from jova_jax.data.latent_norm import LatentNorm
from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.parallel import rules

_DROPS_SEED_OFFSET = 0x5EED  # the random drops draw from a stream apart from the shuffle's


class CheckedSource:
  """A TFDS ArrayRecord data source whose read errors name the split, shard file and record;
  `latent_norm` holds the dataset's latent statistics."""

  def __init__(self, builder, dataset_dir: str, split: str, latent_norm: LatentNorm):
    self.dataset_dir, self.split, self.latent_norm = dataset_dir, split, latent_norm
    info = builder.info.splits[split]
    self._files = [os.fspath(f) for f in info.filepaths]
    self._starts = list(np.cumsum([0] + list(info.shard_lengths))[:-1])
    self._source = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    try:
      return self._source[index]
    except Exception as e:  # ArrayRecord and protobuf raise many types for bad bytes.
      shard = bisect.bisect_right(self._starts, index) - 1
      raise DatasetError(
          f"dataset {self.dataset_dir}: split {self.split!r} record {index} (record "
          f"{index - self._starts[shard]} of file {self._files[shard]}) is unreadable: "
          f"{type(e).__name__}: {e}") from e


def open_source(config, split: str, shapes=None) -> CheckedSource:
  """Opens a split after checking the dataset's metadata and schema against the config."""
  dataset_dir = os.fspath(config.data.dir)
  if not dataset_dir:
    raise DatasetError("data.dir is empty: set it to a prepared dataset directory "
                       "(or data.source='synthetic')")
  if not os.path.isdir(dataset_dir):
    raise DatasetError(f"dataset directory {dataset_dir} (data.dir) does not exist")
  if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    raise DatasetError(f"dataset {dataset_dir} (data.dir) has no dataset_info.json: not a finalized "
                       f"prepared dataset (run data_prep.prepare, or features.finalize)")
  metadata = read_metadata(dataset_dir)
  check_metadata(metadata, config, dataset_dir, shapes)
  norm = LatentNorm.from_json(metadata.get("latent_norm"), config,
                              f"dataset {dataset_dir} (metadata.json)")
  builder = tfds.builder_from_directory(dataset_dir)
  check_features(builder.info.features, config, dataset_dir, shapes)
  if split not in builder.info.splits:
    raise DatasetError(f"dataset {dataset_dir} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits.keys())}")
  return CheckedSource(builder, dataset_dir, split, norm)


def decode(index: int, record: dict, *, spec: dict, norm: LatentNorm) -> dict[str, np.ndarray]:
  """A stored record -> the model inputs of `spec` (data/batch_spec.example_spec): latents
  normalised by `norm` (codec space -> model space), text padded or cut to its length with its
  mask."""
  max_length = spec["text_mask"][0][0]
  emb = np.asarray(record["text_emb"], np.float32)[:max_length]
  text = np.zeros((max_length, emb.shape[-1]), np.float32)
  text[:len(emb)] = emb
  return batch_spec.conform({
      "video": norm.video.normalize(np.asarray(record["video_latent"], np.float32)),
      "audio": norm.audio.normalize(np.asarray(record["audio_latent"], np.float32)),
      "mouth_mask": (np.asarray(record["mouth_mask"]) > 0).astype(np.float32),
      "text": text,
      "text_mask": np.arange(max_length) < len(emb),
      "record_index": index,
  }, spec)


def _with_index(index: int, record: dict) -> tuple[int, dict]:
  return index, record


def _decode_pair(pair, *, spec: dict, norm: LatentNorm) -> dict[str, np.ndarray]:
  return decode(*pair, spec=spec, norm=norm)


def add_random_drops(example: dict, rng: np.random.Generator, *, p_uncond: float,
                     p_i2v: float) -> dict:
  """CFG text drop and I2V first-frame condition, drawn from the example's own RNG."""
  return {**example, "drop_text": np.bool_(rng.random() < p_uncond),
          "use_first_frame": np.bool_(rng.random() < p_i2v)}


def _no_drops(example: dict) -> dict:
  return {**example, "drop_text": np.bool_(False), "use_first_frame": np.bool_(False)}


def process_slice(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """This process's disjoint share: every process_count-th element from process_index."""
  return ds[process_index::process_count]


def _process(process_index, process_count) -> tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def _local_batch_size(config, process_count: int) -> int:
  batch = int(config.train.batch_size)
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by the process count {process_count}")
  return batch // process_count


def _ensure_absl_flags_parsed() -> None:
  # Grain's multiprocessing reads absl flags; outside an absl app (tests, notebooks) they are unparsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, config) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config.data.read_threads),
                                            prefetch_buffer_size=int(config.data.read_threads)))
  workers = int(config.data.worker_count)
  if workers > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
  return it


def batch_spec_of(config, shapes=None) -> dict:
  """The run's batch table (data/batch_spec.py); shapes: the run's, when derived already."""
  return batch_spec.example_spec(shapes or latent_shapes(config), int(config.text.width))


def train_dataset(config, source, *, seed: int, process_index: int | None = None,
                  process_count: int | None = None, spec: dict | None = None) -> grain.IterDataset:
  """Endless, shuffled local batches (numpy) for this process."""
  process_index, process_count = _process(process_index, process_count)
  p_i2v = float(config.data.p_i2v) if config.model.i2v else 0.0
  ds = grain.MapDataset.source(source)
  if int(config.data.get("max_train_clips", 0)):  # fine-tuning on a few clips
    ds = ds[:int(config.data.max_train_clips)]
  ds = ds.map_with_index(_with_index).shuffle(seed=seed).repeat()
  ds = process_slice(ds, process_index, process_count)
  ds = ds.map(functools.partial(_decode_pair, spec=spec or batch_spec_of(config),
                                norm=source.latent_norm))
  ds = ds.random_map(functools.partial(add_random_drops, p_uncond=float(config.data.p_uncond),
                                       p_i2v=p_i2v), seed=seed + _DROPS_SEED_OFFSET)
  ds = ds.batch(_local_batch_size(config, process_count), drop_remainder=True)
  return _to_iter(ds, config)


class _Cycled:
  """A source read round and round up to `length` records (eval's padding)."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    return self._source[index % len(self._source)]


def _mark_padding(example: dict, *, num_real: int) -> dict:
  index = int(example["record_index"])
  return {**example, "record_index": np.int32(index % num_real),
          "example_valid": np.bool_(index < num_real)}


def _eval_batch_count(num_examples: int, global_batch: int) -> int:
  return -(-num_examples // global_batch)


def eval_dataset(config, source, *, process_index: int | None = None,
                 process_count: int | None = None, spec: dict | None = None) -> grain.IterDataset:
  """One in-order pass in whole global batches, the last one padded with repeats of the first
  records (example_valid False); every process yields the same number of batches."""
  process_index, process_count = _process(process_index, process_count)
  global_batch = int(config.train.batch_size)
  padded = _eval_batch_count(len(source), global_batch) * global_batch
  ds = grain.MapDataset.source(_Cycled(source, padded)).map_with_index(_with_index)
  ds = process_slice(ds, process_index, process_count)
  ds = ds.map(functools.partial(_decode_pair, spec=spec or batch_spec_of(config),
                                norm=source.latent_norm)).map(_no_drops)
  ds = ds.map(functools.partial(_mark_padding, num_real=len(source)))
  ds = ds.batch(_local_batch_size(config, process_count), drop_remainder=True)
  return _to_iter(ds, config)


def to_global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Per-process rows -> global arrays with the batch dim sharded by rules.batch_sharding."""
  sharding = rules.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


class DataIterator:
  """Global training batches; get_state() is JSON-able and set_state() resumes exactly.
  `latent_norm`: the statistics its latents are normalised with (identity for synthetic data)."""

  def __init__(self, local_iterator, mesh, source_name: str, seed: int, latent_norm: LatentNorm):
    self.latent_norm = latent_norm
    self._local = local_iterator
    self._mesh = mesh
    self._source_name = source_name
    self._seed = seed

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return to_global(next(self._local), self._mesh)

  def get_state(self) -> dict:
    return {"source": self._source_name, "seed": self._seed, "state": self._local.get_state()}

  def set_state(self, state: dict) -> None:
    # The position only means something in the same order: same source and seed.
    if state.get("source") != self._source_name:
      raise ValueError(f"data iterator state is for data.source={state.get('source')!r} but this "
                       f"iterator reads {self._source_name!r}")
    if state.get("seed") != self._seed:
      raise ValueError(f"data iterator state is for seed {state.get('seed')} (train.seed) but this "
                       f"iterator uses seed {self._seed}")
    self._local.set_state(state["state"])


def make_train_iterator(config, mesh, *, split: str | None = None, seed: int | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None, shapes=None) -> DataIterator:
  """shapes: the run's config_lib.LatentShapes when the caller derived them."""
  seed = int(config.train.seed if seed is None else seed)
  if config.data.source == "synthetic":
    pi, pc = _process(process_index, process_count)
    return DataIterator(SyntheticIterator(config, seed=seed, process_index=pi, process_count=pc,
                                          shapes=shapes),
                        mesh, "synthetic", seed, LatentNorm.identity(config))
  if config.data.source != "tfds":
    raise ValueError(f"data.source={config.data.source!r}: expected 'tfds' or 'synthetic'")
  source = open_source(config, split or config.data.train_split, shapes)
  ds = train_dataset(config, source, seed=seed, process_index=process_index,
                     process_count=process_count, spec=batch_spec_of(config, shapes))
  return DataIterator(iter(ds), mesh, "tfds", seed, source.latent_norm)


class EvalBatches:
  """One pass over an eval split as global batches; iterate it again for another pass."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int, mesh):
    self._dataset, self._num_batches, self._mesh = dataset, num_batches, mesh

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self):
    for local in self._dataset:
      yield to_global(local, self._mesh)


def make_eval_iterator(config, mesh, *, split: str | None = None, process_index: int | None = None,
                       process_count: int | None = None, shapes=None):
  """Eval batches: no shuffle, no text drop, no first-frame condition, last batch padded."""
  if config.data.source == "synthetic":
    pi, pc = _process(process_index, process_count)
    synthetic = SyntheticIterator(config, seed=int(config.train.seed) + 1, process_index=pi,
                                  process_count=pc, shapes=shapes)
    batches = [_no_drops_batch(synthetic.batch(step)) for step in range(int(config.eval.batches))]
    return EvalBatches(batches, len(batches), mesh)
  split = split or config.data.eval_split
  source = open_source(config, split, shapes)
  ds = eval_dataset(config, source, process_index=process_index, process_count=process_count,
                    spec=batch_spec_of(config, shapes))
  return EvalBatches(ds, _eval_batch_count(len(source), int(config.train.batch_size)), mesh)


def _no_drops_batch(batch: dict) -> dict:
  return {**batch, "drop_text": np.zeros_like(batch["drop_text"]),
          "use_first_frame": np.zeros_like(batch["use_first_frame"]),
          "example_valid": np.ones_like(batch["drop_text"])}
