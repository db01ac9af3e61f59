"""MiniLM text encoder: parity with the PyTorch reference fixture, masks, weight checks, registry.

tests/fixtures/minilm_parity.npz was written by tests/fixtures/make_minilm_fixture.py
(transformers BertModel + its pure-Python BertTokenizer); torch is not needed here.
"""
import os

import numpy as np
import pytest
import safetensors.numpy

from jova_jax import text
from jova_jax.text import minilm
from tests.conftest import REPO, load

FIXTURE = os.path.join(REPO, "tests", "fixtures", "minilm_parity.npz")


@pytest.fixture(scope="module")
def encoder():
  return text.get_text_encoder(load("tiny"))


def test_parity_with_pytorch_reference(encoder):
  ref = np.load(FIXTURE)
  sentences = [str(s) for s in ref["sentences"]]
  ids, mask = encoder.tokenize(sentences)
  np.testing.assert_array_equal(ids, ref["ids"])
  np.testing.assert_array_equal(mask, ref["mask"])
  emb, emb_mask = encoder.encode(sentences)
  assert emb.shape == ref["hidden"].shape and emb.dtype == np.float32
  np.testing.assert_array_equal(emb_mask, ref["mask"])
  np.testing.assert_allclose(emb[ref["mask"]], ref["hidden"][ref["mask"]], atol=1e-4)
  assert not emb[~ref["mask"]].any()  # padded positions are zeroed


def test_padded_batch_masks_and_max_length(encoder):
  short, long = "hello", "a much longer prompt about a man speaking softly to the camera"
  alone, alone_mask = encoder.encode([short])
  assert alone_mask.tolist() == [[True, True, True]]  # [CLS] hello [SEP]
  emb, mask = encoder.encode([short, long])
  long_tokens = len(encoder.tokenize([long])[0][0])
  assert mask.shape == (2, long_tokens) and mask.sum(1).tolist() == [3, long_tokens]
  np.testing.assert_allclose(emb[0, :3], alone[0], atol=1e-5)  # padding does not leak in

  emb, mask = encoder.encode([short, long], max_length=6)
  assert emb.shape == (2, 6, 384) and mask.sum(1).tolist() == [3, 6]
  ids, _ = encoder.tokenize([long], max_length=6)
  assert ids[0, 0] == 101 and ids[0, -1] == 102  # cut prompts keep [CLS] ... [SEP]
  emb, mask = encoder.encode([short], max_length=8)
  assert emb.shape == (1, 8, 384) and mask.sum() == 3 and not emb[0, 3:].any()


def test_misshapen_or_missing_tensor_is_refused(tmp_path):
  weights, tokenizer = minilm.find_files()
  tensors = safetensors.numpy.load_file(weights)
  name = "encoder.layer.3.intermediate.dense.weight"
  tensors[name] = tensors[name].T.copy()
  del tensors["embeddings.LayerNorm.bias"]
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  os.symlink(tokenizer, tmp_path / "tokenizer.json")
  config = load("tiny")
  config.weights_dir = str(tmp_path)
  with pytest.raises(ValueError) as error:
    text.get_text_encoder(config)
  message = str(error.value)
  assert str(tmp_path / "model.safetensors") in message
  assert f"{name!r} has shape (384, 1536), expected (1536, 384)" in message
  assert "'embeddings.LayerNorm.bias' is missing" in message


def test_weights_dir_without_files_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"model.safetensors, tokenizer.json not found"):
    text.get_text_encoder(load("tiny"), weights_dir=str(tmp_path))
