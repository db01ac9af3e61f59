"""T5 / umT5 text encoder: parity with transformers, sharded and bf16 loading, refusals, registry.

tests/fixtures/t5/ was written by tests/fixtures/make_t5_fixture.py (transformers'
T5EncoderModel and UMT5EncoderModel with tiny random weights, HF safetensors layout, a tiny
tokenizer.json); torch is not needed here.
"""
import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jova_jax import text
from jova_jax.text import t5
from tests.conftest import REPO, load

FIXTURES = os.path.join(REPO, "tests", "fixtures", "t5")
MODELS = ("flan", "umt5")  # flan: one model.safetensors; umt5: 2 shards + index


@pytest.fixture(scope="module")
def ref():
  data = np.load(os.path.join(FIXTURES, "parity.npz"))
  return dict(data, sentences=[str(s) for s in data["sentences"]],
              max_length=int(data["max_length"]))


@pytest.fixture(scope="module", params=MODELS)
def model(request):
  return request.param, t5.T5Encoder(os.path.join(FIXTURES, request.param), width=None)


def copy_weights(tmp_path, name="flan"):
  """A writable copy of a fixture weights_dir; returns (weights_dir, its t5/ folder)."""
  shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)
  return str(tmp_path / name), tmp_path / name / "t5"


def test_relative_buckets_match_hf_at_xxl_settings(ref):
  buckets = t5.relative_position_bucket(ref["bucket_offsets"], num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(buckets, ref["buckets"])


def test_parity_with_transformers(model, ref):
  name, encoder = model
  assert encoder.cfg.bias_per_layer == (name == "umt5")
  ids, mask = encoder.tokenize(ref["sentences"], ref["max_length"])
  np.testing.assert_array_equal(ids, ref["ids"])
  np.testing.assert_array_equal(mask, ref["mask"])
  emb, emb_mask = encoder.encode(ref["sentences"], ref["max_length"])
  hidden = ref[f"hidden_{name}"]
  assert emb.shape == hidden.shape == (5, ref["max_length"], 32) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb_mask, ref["mask"])
  np.testing.assert_allclose(emb[ref["mask"]], hidden[ref["mask"]], atol=1e-4)
  assert not emb[~ref["mask"]].any()  # padded positions are zeroed


def test_fixture_exercises_the_log_buckets_and_per_layer_bias(ref):
  """The parity data tells apart a port with the wrong bucket clip or bias sharing."""
  encoder = t5.T5Encoder(os.path.join(FIXTURES, "umt5"), width=None)
  ids, mask = encoder.tokenize(ref["sentences"], ref["max_length"])
  wrong_clip = dataclasses.replace(encoder.cfg, max_distance=128)
  emb = np.asarray(t5.forward(encoder.params, jnp.asarray(ids), jnp.asarray(mask), wrong_clip))
  assert np.abs(emb - ref["hidden_umt5"])[mask].max() > 1e-2
  shared = dict(encoder.params, layers=[encoder.params["layers"][0]] + [
      {k: v for k, v in layer.items() if k != "bias"} for layer in encoder.params["layers"][1:]])
  emb = np.asarray(t5.forward(shared, jnp.asarray(ids), jnp.asarray(mask), encoder.cfg))
  assert np.abs(emb - ref["hidden_umt5"])[mask].max() > 1e-2


def test_padding_to_longest_and_max_length(model, ref):
  _, encoder = model
  short, long = ref["sentences"][0], ref["sentences"][1]
  alone, alone_mask = encoder.encode([short])
  n = int(alone_mask.sum())
  assert alone_mask.all() and encoder.tokenize([short])[0][0, -1] == 1  # ends with </s>
  emb, mask = encoder.encode([short, long])
  long_tokens = encoder.tokenize([long])[1].sum()
  assert long_tokens > ref["max_length"]  # no cut without max_length
  assert mask.shape == (2, long_tokens) and mask.sum(1).tolist() == [n, long_tokens]
  np.testing.assert_allclose(emb[0, :n], alone[0], atol=1e-5)  # padding does not leak in
  ids, mask = encoder.tokenize([long], max_length=6)
  assert mask.all() and ids[0, -1] == 1  # a cut prompt keeps its </s>
  with pytest.raises(ValueError, match="max_length=1 must be at least 2"):
    encoder.tokenize([short], max_length=1)


def test_bf16_weights_widen_to_f32_and_bf16_compute(tmp_path, ref):
  weights_dir, folder = copy_weights(tmp_path)
  path = str(folder / "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  rounded = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  safetensors.numpy.save_file(rounded, path, metadata={"format": "pt"})
  encoder = t5.T5Encoder(weights_dir, width=None)
  q = encoder.params["layers"][0]["q"]
  assert q.dtype == jnp.float32
  np.testing.assert_array_equal(
      q, rounded["encoder.block.0.layer.0.SelfAttention.q.weight"].astype(np.float32).T)
  emb, mask = encoder.encode(ref["sentences"], ref["max_length"])
  error_bf16_weights = np.abs(emb - ref["hidden_flan"])[mask].max()
  assert 1e-4 < error_bf16_weights < 0.1  # rounded weights: close, not equal

  fast = t5.T5Encoder(os.path.join(FIXTURES, "flan"), compute_dtype="bfloat16", width=None)
  assert fast.params["layers"][0]["wo"].dtype == jnp.bfloat16
  emb, mask = fast.encode(ref["sentences"], ref["max_length"])
  assert emb.dtype == np.float32
  np.testing.assert_allclose(emb[mask], ref["hidden_flan"][mask], atol=0.15)


def test_embedding_under_encoder_embed_tokens(tmp_path, ref):
  weights_dir, folder = copy_weights(tmp_path)
  path = str(folder / "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  safetensors.numpy.save_file(tensors, path)
  emb, mask = t5.T5Encoder(weights_dir, width=None).encode(ref["sentences"], ref["max_length"])
  np.testing.assert_allclose(emb[mask], ref["hidden_flan"][mask], atol=1e-4)


def test_missing_or_misshapen_tensor_is_refused(tmp_path):
  weights_dir, folder = copy_weights(tmp_path, "umt5")
  index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
  bad = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
  gone = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
  for shard in set(index.values()):
    path = str(folder / shard)
    tensors = safetensors.numpy.load_file(path)
    if bad in tensors:
      tensors[bad] = tensors[bad].T.copy()
    tensors.pop(gone, None)
    safetensors.numpy.save_file(tensors, path)
  del index[gone]
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
  with pytest.raises(ValueError) as error:
    t5.T5Encoder(weights_dir, width=None)
  message = str(error.value)
  assert str(folder / "model.safetensors.index.json") in message
  assert f"{bad!r} in {folder / index[bad]} has shape (32, 64), expected (64, 32)" in message
  assert f"{gone!r} is missing (expected shape (32, 4))" in message


def test_unknown_or_absent_weights_are_refused(tmp_path):
  weights_dir, folder = copy_weights(tmp_path)
  (folder / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
  with pytest.raises(ValueError, match=f"{folder / 'model.safetensors'} is not a safetensors"):
    t5.T5Encoder(weights_dir, width=None)
  os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
  with pytest.raises(ValueError, match=rf"no model.safetensors .* in {folder} \(found: "
                                       rf"config.json, pytorch_model.bin, tokenizer.json\)"):
    t5.T5Encoder(weights_dir, width=None)
  os.remove(folder / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match=f"tokenizer.json not found in {folder}$"):
    t5.T5Encoder(weights_dir, width=None)
  (folder / "spiece.model").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="only spiece.model is there: write tokenizer.json"):
    t5.T5Encoder(weights_dir, width=None)


def test_config_json_is_checked(tmp_path):
  weights_dir, folder = copy_weights(tmp_path)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(config, feed_forward_proj="relu")))
  with pytest.raises(ValueError, match="feed_forward_proj='relu', only 'gated-gelu'"):
    t5.T5Encoder(weights_dir, width=None)
  (folder / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
  with pytest.raises(ValueError, match="model_type='bert', expected 't5'"):
    t5.T5Encoder(weights_dir, width=None)


def test_registry_builds_t5_from_weights_dir():
  config = load("jova_24b")
  assert (config.text.encoder, config.text.width) == ("t5", 4096)
  config.weights_dir = ""
  with pytest.raises(FileNotFoundError, match="set config.weights_dir"):
    text.get_text_encoder(config)
  # The tiny fixture is found under <weights_dir>/t5/ and its width checked against 4096.
  with pytest.raises(ValueError, match=r"config.json has d_model=32, expected width 4096"):
    text.get_text_encoder(config, weights_dir=os.path.join(FIXTURES, "flan"))


def test_benchmark_runs_on_loaded_and_random_weights(capsys):
  encoder = t5.T5Encoder(os.path.join(FIXTURES, "flan"), width=None)
  figures = t5.benchmark(encoder.cfg, encoder.params, batch_size=2, max_length=8, repeats=1)
  assert figures["prompts_per_s"] > 0 and figures["tokens_per_s"] == 8 * figures["prompts_per_s"]
  t5.benchmark(encoder.cfg, batch_size=1, max_length=8, compute_dtype="bfloat16", repeats=1)
  assert "bfloat16) encode at batch 1 x 8 tokens" in capsys.readouterr().out
