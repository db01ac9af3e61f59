"""Prepared dataset (writer, finalize, metadata) and the grain pipeline, on tiny random data."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P

from jova_jax.config_lib import latent_shapes
from jova_jax.data import batch_spec
from jova_jax.data import features as F
from jova_jax.data import pipeline as PL
from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.parallel import rules
from jova_jax.parallel.mesh import make_mesh
from tests.conftest import load
from tests.datasets import make_examples

NUM_TRAIN, NUM_EVAL = 16, 10
KEYS = batch_spec.MODEL_KEYS + batch_spec.BOOKKEEPING_KEYS


def tiny_config(dataset_dir=""):
  c = load("tiny")
  c.mesh.update(data=2, fsdp=4)
  c.data.dir = str(dataset_dir)
  c.data.read_threads = 1
  return c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  directory = tmp_path_factory.mktemp("ds")
  config = tiny_config(directory)
  examples = {"train": make_examples(config, NUM_TRAIN, 0), "eval": make_examples(config, NUM_EVAL, 1)}
  F.write_dataset(directory, config, examples)
  return directory, examples


def expected_row(example, max_length):
  """Independent reference for one decoded example: float16 storage, zero-padded text."""
  emb = example["text_emb"].astype(np.float16).astype(np.float32)
  n = min(len(emb), max_length)
  text = np.zeros((max_length, emb.shape[1]), np.float32)
  text[:n] = emb[:n]
  return {"video": example["video_latent"].astype(np.float16).astype(np.float32),
          "audio": example["audio_latent"].astype(np.float16).astype(np.float32),
          "mouth_mask": example["mouth_mask"].astype(np.float32),
          "text": text, "text_mask": np.array([i < n for i in range(max_length)])}


def local_batches(dataset_iter, n):
  it = iter(dataset_iter)
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ writer, metadata, round trip

def test_round_trip_padding_and_sharding(dataset):
  directory, examples = dataset
  config = tiny_config(directory)
  mesh = make_mesh(config)
  it = PL.make_train_iterator(config, mesh)
  batches = [next(it) for _ in range(2)]  # 2 x 8 = one epoch of 16
  seen = []
  for batch in batches:
    assert sorted(batch) == sorted(KEYS)
    shapes = latent_shapes(config)
    assert batch["video"].shape == (8, *shapes.video) and batch["video"].dtype == np.float32
    assert batch["text"].shape == (8, 8, config.text.width) and batch["text_mask"].dtype == bool
    for key, value in batch.items():
      assert value.sharding.spec == P(("data", "fsdp")), key
      assert len(value.addressable_shards) == 8
      for shard in value.addressable_shards:  # device k holds global row k
        assert shard.data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(value)[shard.index])
    for row, index in enumerate(np.asarray(batch["record_index"])):
      want = expected_row(examples["train"][index], config.text.max_length)
      for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(batch[key][row]), value, err_msg=key)
      seen.append(int(index))
  assert sorted(seen) == list(range(NUM_TRAIN))  # one epoch visits every record once
  assert "tensorflow" not in sys.modules


def test_dataset_layout_and_metadata(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  names = sorted(os.listdir(directory))
  assert "jova-train.array_record-00000-of-00001" in names and "dataset_info.json" in names
  assert not os.path.exists(os.path.join(directory, F.PENDING_DIR))
  metadata = F.read_metadata(directory)
  assert metadata["counts"] == {"train": NUM_TRAIN, "eval": NUM_EVAL}
  assert metadata["video_latent_shape"] == [5, 4, 4, 48] and metadata["audio_latent_shape"] == [19, 80]
  F.check_metadata(metadata, config, directory)
  builder = tfds.builder_from_directory(str(directory))
  assert builder.info.splits["train"].num_examples == NUM_TRAIN
  record = builder.as_data_source("train")[3]
  assert record["clip_id"] == b"clip0_3" and record["video_latent"].dtype == np.float16


def test_check_metadata_names_key_and_values(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  metadata = F.default_metadata(config)
  metadata["video_latent_shape"] = [17, 8, 8, 192]
  metadata["fps"] = 25.0
  with pytest.raises(F.DatasetError) as e:
    F.check_metadata(metadata, config, "/x/ds")
  msg = str(e.value)
  assert "dataset /x/ds: " in msg
  assert "video_latent_shape is [17,8,8,192] but config (video.*, model.*) expects [5,4,4,48]" in msg
  assert "fps is 25.0 but config (video.fps) expects 8.0" in msg
  del metadata["text_encoder"]
  with pytest.raises(F.DatasetError, match=r"text_encoder.width is missing .*expects 384"):
    F.check_metadata(metadata, config, "/x/ds")


def test_two_writers_match_one_writer(tmp_path):
  config = tiny_config()
  examples = make_examples(config, 10, 2)
  features = F.dataset_features(config)
  one, two = tmp_path / "one", tmp_path / "two"
  F.write_dataset(one, config, {"train": examples})
  reports = []
  for job, part in (("job-00000", examples[:6]), ("job-00001", examples[6:])):
    writer = F.ShardWriter(two, "train", job, features)
    for example in part:
      writer.write(example)
    reports.append(writer.close())
  assert [r["num_examples"] for r in reports] == [6, 4]
  crashed = F.ShardWriter(two, "train", "job-00002", features)  # never closed: a crashed job
  crashed.write(examples[0])
  a = tfds.builder_from_directory(str(one)).as_data_source("train")
  for _ in range(2):  # finalizing again changes nothing
    F.finalize(two, features, F.default_metadata(config))
    assert sorted(n for n in os.listdir(two) if n.startswith("jova-")) == [
        "jova-train.array_record-00000-of-00002", "jova-train.array_record-00001-of-00002"]
    assert F.read_metadata(two)["counts"] == {"train": 10}
    b = tfds.builder_from_directory(str(two)).as_data_source("train")
    assert len(a) == len(b) == 10
    for i in range(10):
      assert a[i]["clip_id"] == b[i]["clip_id"] == examples[i]["clip_id"].encode()
      for key in ("video_latent", "audio_latent", "mouth_mask", "text_emb"):
        np.testing.assert_array_equal(a[i][key], b[i][key])


def test_writer_rejects_bad_example(tmp_path):
  config = tiny_config()
  example = make_examples(config, 1, 3)[0]
  example["audio_latent"] = example["audio_latent"][:5]
  writer = F.ShardWriter(tmp_path, "train", "job", F.dataset_features(config))
  with pytest.raises(F.DatasetError, match=r"job\.array_record: example 0 .*clip3_0.*audio_latent"):
    writer.write(example)


# ------------------------------------------------------------------ pipeline behaviour

def test_resume_is_exact(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  config.data.update(p_uncond=0.5, p_i2v=0.5)
  mesh = make_mesh(config)
  k = 3  # 6 batches of 8 cross the 16-record epoch boundary
  it = PL.make_train_iterator(config, mesh, seed=7)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it) for _ in range(k)]
  resumed = PL.make_train_iterator(config, mesh, seed=7)
  resumed.set_state(state)
  for want in rest:
    got = next(resumed)
    for key in ("record_index", "drop_text", "use_first_frame", "video"):
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  # Another seed gives another order.
  first = np.asarray(next(PL.make_train_iterator(config, mesh, seed=7))["record_index"])
  other = np.asarray(next(PL.make_train_iterator(config, mesh, seed=8))["record_index"])
  assert not np.array_equal(first, other)


def test_process_slices_are_disjoint_and_cover(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  source = PL.open_source(config, "train")
  per_process = []
  for process_index in range(2):
    ds = PL.train_dataset(config, source, seed=0, process_index=process_index, process_count=2)
    batches = local_batches(ds, NUM_TRAIN // 8)  # local batch 4: first epoch's half each
    assert batches[0]["video"].shape[0] == 4
    per_process.append(np.concatenate([b["record_index"] for b in batches]))
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(np.concatenate(per_process)) == list(range(NUM_TRAIN))
  # Eval: 10 examples padded to 2 global batches (16 rows), split between the processes; the
  # padding rows (real ones marked example_valid False) repeat records 0..5.
  eval_source = PL.open_source(config, "eval")
  evals = [list(PL.eval_dataset(config, eval_source, process_index=i, process_count=2))
           for i in range(2)]
  rows = [list(np.concatenate([b["record_index"] for b in batches])) for batches in evals]
  assert rows == [[0, 2, 4, 6, 8, 0, 2, 4], [1, 3, 5, 7, 9, 1, 3, 5]]
  valid = [list(np.concatenate([b["example_valid"] for b in batches])) for batches in evals]
  assert valid == [[True] * 5 + [False] * 3] * 2


def test_drop_frequencies(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  config.data.update(p_uncond=0.5, p_i2v=0.5)
  source = PL.open_source(config, "train")
  batches = local_batches(PL.train_dataset(config, source, seed=3, process_count=1, process_index=0),
                          50)
  drop = np.concatenate([b["drop_text"] for b in batches])
  first = np.concatenate([b["use_first_frame"] for b in batches])
  assert len(drop) == 400
  assert 0.4 < drop.mean() < 0.6 and 0.4 < first.mean() < 0.6
  assert 0.15 < (drop & first).mean() < 0.35  # drawn independently
  config.data.update(p_uncond=0.0, p_i2v=1.0)
  batch = local_batches(PL.train_dataset(config, source, seed=3, process_count=1, process_index=0),
                        1)[0]
  assert batch["use_first_frame"].all() and not batch["drop_text"].any()
  config.model.i2v = False  # no first-frame condition whatever p_i2v says
  batch = local_batches(PL.train_dataset(config, source, seed=3, process_count=1, process_index=0),
                        1)[0]
  assert not batch["use_first_frame"].any()


def test_eval_iterator_one_ordered_pass(dataset):
  directory, examples = dataset
  config = tiny_config(directory)
  config.data.update(p_uncond=1.0, p_i2v=1.0)
  batches = list(PL.make_eval_iterator(config, make_mesh(config)))
  assert len(batches) == 2  # 10 examples: 8, then 2 and 6 padding rows that repeat 0..5
  batch = batches[0]
  np.testing.assert_array_equal(np.asarray(batch["record_index"]), np.arange(8))
  np.testing.assert_array_equal(np.asarray(batches[1]["record_index"]), [8, 9, 0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(np.asarray(batches[1]["example_valid"]), np.arange(8) < 2)
  assert np.asarray(batch["example_valid"]).all()
  assert not np.asarray(batch["drop_text"]).any() and not np.asarray(batch["use_first_frame"]).any()
  np.testing.assert_array_equal(np.asarray(batch["audio"][5]),
                                expected_row(examples["eval"][5], 8)["audio"])


def test_multiprocess_workers_match_in_process(dataset):
  directory, _ = dataset
  config = tiny_config(directory)
  mesh = make_mesh(config)
  inline = PL.make_train_iterator(config, mesh)
  want = [next(inline) for _ in range(3)]
  config.data.worker_count = 1
  workers = PL.make_train_iterator(config, mesh)
  for w in want:
    got = next(workers)
    for key in KEYS:
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(w[key]), err_msg=key)
  state = json.loads(json.dumps(workers.get_state()))
  after = next(workers)
  resumed = PL.make_train_iterator(config, mesh)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(resumed)["record_index"]),
                                np.asarray(after["record_index"]))


# ------------------------------------------------------------------ errors

def test_errors_name_the_path_and_key(dataset, tmp_path):
  directory, _ = dataset
  mesh = make_mesh(tiny_config())
  missing = tmp_path / "nope"
  with pytest.raises(F.DatasetError, match=f"{missing} \\(data.dir\\) does not exist"):
    PL.make_train_iterator(tiny_config(missing), mesh)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(F.DatasetError, match=f"{empty} .*no dataset_info.json"):
    PL.make_train_iterator(tiny_config(empty), mesh)
  with pytest.raises(F.DatasetError, match=r"no split 'valid'; it has \['eval', 'train'\]"):
    PL.make_train_iterator(tiny_config(directory), mesh, split="valid")
  wrong_shape = tiny_config(directory)
  wrong_shape.video.latent_channels = 96
  with pytest.raises(F.DatasetError, match=r"video_latent_shape is \[5,4,4,48\] but config "
                                           r"\(video.\*, model.\*\) expects \[5,4,4,96\]"):
    PL.make_train_iterator(wrong_shape, mesh)
  wrong_width = tiny_config(directory)
  wrong_width.text.width = 256
  with pytest.raises(F.DatasetError, match=r"text_encoder.width is 384 but config \(text.width\) "
                                           r"expects 256"):
    PL.make_train_iterator(wrong_width, mesh)


def test_schema_mismatch_with_matching_metadata(tmp_path):
  # metadata.json agrees with the config but features.json (the stored schema) does not.
  config = tiny_config(tmp_path)
  other = tiny_config()
  other.text.width = 32
  F.write_dataset(tmp_path, other, {"train": make_examples(other, 2, 4)},
                  metadata=F.default_metadata(config))
  with pytest.raises(F.DatasetError, match=r"features.json.*'text_emb' is \[None,32\] float16 but the "
                                           r"config expects \[None,384\] float16"):
    PL.open_source(config, "train")


def test_corrupt_record_names_file_and_index(dataset, tmp_path):
  directory, _ = dataset
  corrupt = tmp_path / "corrupt"
  shutil.copytree(directory, corrupt)
  shard = corrupt / "jova-train.array_record-00000-of-00001"
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 2000] = b"\xff" * 2000
  shard.write_bytes(bytes(data))
  config = tiny_config(corrupt)
  it = PL.make_train_iterator(config, make_mesh(config))
  with pytest.raises(F.DatasetError, match=rf"split 'train' record \d+ \(record \d+ of file {shard}\) "
                                           r"is unreadable"):
    for _ in range(NUM_TRAIN // 8):
      next(it)


# ------------------------------------------------------------------ synthetic source

def test_synthetic_shapes_and_determinism(dataset):
  directory, _ = dataset
  real_config = tiny_config(directory)
  mesh = make_mesh(real_config)
  real = next(PL.make_train_iterator(real_config, mesh))
  config = tiny_config()
  config.data.source = "synthetic"
  it = PL.make_train_iterator(config, mesh, seed=5)
  batches = [next(it) for _ in range(3)]
  for key in KEYS:
    assert batches[0][key].shape == real[key].shape and batches[0][key].dtype == real[key].dtype, key
    assert batches[0][key].sharding.spec == P(("data", "fsdp"))
  mask = np.asarray(batches[0]["mouth_mask"])
  assert set(np.unique(mask)) == {0.0, 1.0}
  text, text_mask = np.asarray(batches[0]["text"]), np.asarray(batches[0]["text_mask"])
  assert (text[~text_mask] == 0).all() and (text[text_mask] != 0).all()
  again = PL.make_train_iterator(config, mesh, seed=5)
  again.set_state(json.loads(json.dumps(it.get_state())))
  assert again.get_state() == {"source": "synthetic", "seed": 5, "state": {"step": 3}}
  resumed = PL.make_train_iterator(config, mesh, seed=5)
  resumed.set_state({"source": "synthetic", "seed": 5, "state": {"step": 2}})
  np.testing.assert_array_equal(np.asarray(next(resumed)["video"]), np.asarray(batches[2]["video"]))
  other = next(PL.make_train_iterator(config, mesh, seed=6))
  assert not np.array_equal(np.asarray(other["video"]), np.asarray(batches[0]["video"]))
  # Two processes' rows make up the one-process batch.
  halves = [SyntheticIterator(config, seed=5, process_index=i, process_count=2).batch(1)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["audio"] for h in halves]),
                                np.asarray(batches[1]["audio"]))
  evals = list(PL.make_eval_iterator(config, mesh))
  assert len(evals) == config.eval.batches
  assert not np.asarray(evals[0]["drop_text"]).any()
  assert evals[0]["video"].shape == batches[0]["video"].shape
  with pytest.raises(ValueError, match="state is for data.source='tfds'"):
    resumed.set_state({"source": "tfds", "seed": 5, "state": {"next_index": 0}})
  with pytest.raises(ValueError, match=r"state is for seed 4 \(train.seed\) but this iterator uses seed 5"):
    resumed.set_state({"source": "synthetic", "seed": 4, "state": {"step": 0}})


# ------------------------------------------------------------------ the batch table
def test_every_batch_source_follows_the_batch_table(dataset):
  """The pipeline's decode, synthetic data and the trainer's abstract batch all give the keys,
  per-example shapes and dtypes of data/batch_spec.example_spec."""
  from jova_jax.training import state as train_state
  config = tiny_config(dataset[0])
  table = PL.batch_spec_of(config)
  source = PL.open_source(config, "train")
  decoded = PL.decode(0, source[0], spec=table, norm=source.latent_norm)
  synthetic = SyntheticIterator(config, seed=0).example(0, 0)
  for name, example in (("decode", decoded), ("synthetic", synthetic)):
    for key, value in example.items():
      assert (value.shape, value.dtype) == table[key], (name, key)
  assert set(batch_spec.MODEL_KEYS) <= set(synthetic) and set(decoded) <= set(synthetic)
  mesh = make_mesh(config)
  abstract = train_state.build_program(config, mesh).abstract_batch()
  assert sorted(abstract) == sorted(batch_spec.MODEL_KEYS)
  for key, leaf in abstract.items():
    assert (leaf.shape[1:], leaf.dtype) == table[key], key
    assert leaf.sharding == rules.batch_sharding(mesh), key
