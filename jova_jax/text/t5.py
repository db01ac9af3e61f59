"""`t5`: the T5 v1.1 / umT5 encoder stack (flan-t5-xxl, umt5-xxl) ported to plain jax.numpy.

Pre-norm blocks with RMS norms (no bias, no mean), attention without the 1/sqrt(d) scale and
with a learned relative-position bias (bidirectional log buckets), a gated-GELU FFN (tanh
GELU, as HF's 'gated-gelu'), and a final RMS norm. T5 learns the bias in layer 0 only and
shares it; umT5 learns one per layer. Padded keys are masked; padded outputs are zeroed.

Files, from `<weights_dir>/t5/` (the HF layout, read with no torch):
  config.json                     HF T5Config / UMT5Config (model_type 't5' or 'umt5')
  model.safetensors, or model.safetensors.index.json + the shards it names
  tokenizer.json                  HF `tokenizers` (appends </s>); no sentencepiece needed
Only the encoder tensors are read (a full encoder-decoder checkpoint is fine); bf16 or f16
tensors are widened to float32 on load, then held in `compute_dtype`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from jova_jax import weights
from jova_jax.text import base

WIDTH = 4096  # flan-t5-xxl and umt5-xxl
SUBDIR = "t5"
CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"
SINGLE_FILE, INDEX_FILE = weights.SINGLE_FILE, weights.INDEX_FILE
EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # either, tied in HF checkpoints
_HIGHEST = jax.lax.Precision.HIGHEST  # offline encoding: exact float32 even on TPU/GPU


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The HF config.json fields the encoder needs (HF defaults where a field may be absent)."""
  model_type: str
  vocab_size: int
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  num_layers: int
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  pad_token_id: int = 0

  @property
  def bias_per_layer(self) -> bool:
    return self.model_type == "umt5"

  @classmethod
  def from_json(cls, path: str) -> "T5Config":
    with open(path) as f:
      raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type not in ("t5", "umt5"):
      raise ValueError(f"text encoder 't5': {path} has model_type={model_type!r}, expected "
                       f"'t5' (T5 v1.1, flan-t5) or 'umt5'")
    # HF's default differs per family; only the gated GELU of T5 v1.1 / umT5 is ported.
    ffn = raw.get("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu")
    if ffn != "gated-gelu":
      raise ValueError(f"text encoder 't5': {path} has feed_forward_proj={ffn!r}, only "
                       f"'gated-gelu' (T5 v1.1, flan-t5, umT5) is supported")
    if raw.get("is_encoder_decoder") is False and raw.get("is_decoder"):
      raise ValueError(f"text encoder 't5': {path} describes a decoder, not an encoder")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")
               if k not in raw]
    if missing:
      raise ValueError(f"text encoder 't5': {path} lacks {', '.join(missing)}")
    return cls(
        model_type=model_type, vocab_size=raw["vocab_size"], d_model=raw["d_model"],
        d_kv=raw["d_kv"], num_heads=raw["num_heads"], d_ff=raw["d_ff"],
        num_layers=raw["num_layers"],
        num_buckets=raw.get("relative_attention_num_buckets", 32),
        max_distance=raw.get("relative_attention_max_distance", 128),
        eps=raw.get("layer_norm_epsilon", 1e-6), pad_token_id=raw.get("pad_token_id", 0))


# The published shapes (google/flan-t5-xxl, google/umt5-xxl config.json).
FLAN_T5_XXL = T5Config(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, num_heads=64,
                       d_ff=10240, num_layers=24)
UMT5_XXL = dataclasses.replace(FLAN_T5_XXL, model_type="umt5", vocab_size=256384)


def expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
  """HF encoder tensor names -> shapes (torch Linear weights are (out, in)); the embedding is
  listed under 'shared.weight'."""
  inner = cfg.num_heads * cfg.d_kv
  shapes = {"shared.weight": (cfg.vocab_size, cfg.d_model),
            "encoder.final_layer_norm.weight": (cfg.d_model,)}
  for i in range(cfg.num_layers):
    attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
    shapes.update({
        attn + "layer_norm.weight": (cfg.d_model,),
        attn + "SelfAttention.q.weight": (inner, cfg.d_model),
        attn + "SelfAttention.k.weight": (inner, cfg.d_model),
        attn + "SelfAttention.v.weight": (inner, cfg.d_model),
        attn + "SelfAttention.o.weight": (cfg.d_model, inner),
        ffn + "layer_norm.weight": (cfg.d_model,),
        ffn + "DenseReluDense.wi_0.weight": (cfg.d_ff, cfg.d_model),
        ffn + "DenseReluDense.wi_1.weight": (cfg.d_ff, cfg.d_model),
        ffn + "DenseReluDense.wo.weight": (cfg.d_model, cfg.d_ff),
    })
    if i == 0 or cfg.bias_per_layer:
      shapes[attn + "SelfAttention.relative_attention_bias.weight"] = (cfg.num_buckets,
                                                                       cfg.num_heads)
  return shapes


def load_params(folder: str, cfg: T5Config, compute_dtype=jnp.float32) -> dict:
  """Reads and checks the encoder tensors; returns the jax.numpy parameter tree."""
  source = weights.SafetensorsFolder(folder, "text encoder 't5'")
  rename = {}  # expected name -> name in the files
  embed = next((k for k in EMBED_KEYS if k in source), None)
  if embed is not None:
    rename["shared.weight"] = embed
  errors = []
  for name, shape in expected_shapes(cfg).items():
    stored = rename.get(name, name)
    if stored not in source:
      also = f" (or {EMBED_KEYS[1]!r})" if name == EMBED_KEYS[0] else ""
      errors.append(f"tensor {name!r}{also} is missing (expected shape {shape})")
    elif source.shape(stored) != shape:
      errors.append(f"tensor {stored!r} in {source.where(stored)} has shape "
                    f"{source.shape(stored)}, expected {shape}")
  if errors:
    raise ValueError(f"text encoder 't5': bad weights in {source.origin}:\n  - "
                     + "\n  - ".join(errors))

  return build_params(lambda name: source.get(rename.get(name, name)), cfg, compute_dtype)


def build_params(read, cfg: T5Config, compute_dtype=jnp.float32) -> dict:
  """The parameter tree from read(HF tensor name) -> array: Linear weights transposed to
  (in, out) and held in compute_dtype; norms and position biases float32."""

  def get(name, transpose=False):
    # Widen bf16/f16 to f32 first (ml_dtypes arrays), then hold in the compute dtype.
    array = read(name).astype(np.float32)
    return jnp.asarray(array.T if transpose else array, compute_dtype)

  def norm(name):  # float32: they act on the float32 residual stream
    return jnp.asarray(read(name).astype(np.float32))

  layers = []
  for i in range(cfg.num_layers):
    attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
    layer = dict(
        attn_norm=norm(attn + "layer_norm.weight"),
        q=get(attn + "SelfAttention.q.weight", True), k=get(attn + "SelfAttention.k.weight", True),
        v=get(attn + "SelfAttention.v.weight", True), o=get(attn + "SelfAttention.o.weight", True),
        ffn_norm=norm(ffn + "layer_norm.weight"),
        wi_0=get(ffn + "DenseReluDense.wi_0.weight", True),
        wi_1=get(ffn + "DenseReluDense.wi_1.weight", True),
        wo=get(ffn + "DenseReluDense.wo.weight", True))
    if i == 0 or cfg.bias_per_layer:
      layer["bias"] = norm(attn + "SelfAttention.relative_attention_bias.weight")
    layers.append(layer)
  return dict(embed=get("shared.weight"), layers=layers,
              final_norm=norm("encoder.final_layer_norm.weight"))


def relative_position_bucket(relative: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of key - query offsets: half the buckets per direction, exact
  below num_buckets/4, log-spaced up to max_distance, clipped beyond. float32 math as HF's."""
  half = num_buckets // 2
  max_exact = half // 2
  distance = np.abs(relative)
  scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)))
  large = max_exact + (scaled * np.float32(half - max_exact)).astype(np.int32)
  large = np.minimum(large, half - 1)
  return np.where(relative > 0, half, 0) + np.where(distance < max_exact, distance, large)


def _rms_norm(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps) * scale


def _linear(x, w):
  """x (f32) @ w in w's dtype, accumulated in f32."""
  return jnp.matmul(x.astype(w.dtype), w, precision=_HIGHEST, preferred_element_type=jnp.float32)


def forward(params, ids, mask, cfg: T5Config):
  """ids (B,L) int32, mask (B,L) bool -> last hidden states (B,L,d_model) f32, pads zeroed."""
  b, length = ids.shape
  x = params["embed"][ids].astype(jnp.float32)
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  buckets = relative_position_bucket(offsets, cfg.num_buckets, cfg.max_distance)
  key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  position_bias = None
  for layer in params["layers"]:
    if "bias" in layer:  # every layer for umT5, layer 0 (then shared) for T5
      position_bias = jnp.transpose(layer["bias"][buckets], (2, 0, 1))[None]
    h = _rms_norm(x, layer["attn_norm"], cfg.eps)
    q, k, v = (_linear(h, layer[n]).reshape(b, length, cfg.num_heads, cfg.d_kv)
               for n in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST)  # no 1/sqrt(d) in T5
    probs = jax.nn.softmax(logits + position_bias + key_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_HIGHEST)
    x = x + _linear(context.reshape(b, length, -1), layer["o"])
    h = _rms_norm(x, layer["ffn_norm"], cfg.eps)
    gated = jax.nn.gelu(_linear(h, layer["wi_0"]), approximate=True) * _linear(h, layer["wi_1"])
    x = x + _linear(gated, layer["wo"])
  return _rms_norm(x, params["final_norm"], cfg.eps) * mask[..., None]


_forward = jax.jit(forward, static_argnames="cfg")


class T5Encoder(base.TextEncoder):
  """T5 v1.1 / umT5 encoder from `<weights_dir>/t5/`; `width` (None: any) is checked against
  config.json's d_model before the weights are read (the registry passes config.text.width)."""
  name = "t5"
  width = WIDTH

  def __init__(self, weights_dir: str | None = None, compute_dtype="float32",
               width: int | None = WIDTH):
    if not weights_dir:
      raise FileNotFoundError(
          f"text encoder 't5' needs pretrained files: set config.weights_dir (or --weights_dir) "
          f"to a folder whose {SUBDIR}/ holds {CONFIG_FILE}, {SINGLE_FILE} (or {INDEX_FILE} and "
          f"its shards) and {TOKENIZER_FILE}")
    folder = os.path.join(weights_dir, SUBDIR)
    missing = [f for f in (CONFIG_FILE, TOKENIZER_FILE)
               if not os.path.isfile(os.path.join(folder, f))]
    if missing:
      hint = ""
      if TOKENIZER_FILE in missing and os.path.isfile(os.path.join(folder, "spiece.model")):
        hint = (f"; only spiece.model is there: write {TOKENIZER_FILE} once with transformers + "
                f"sentencepiece, T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)")
      raise FileNotFoundError(
          f"text encoder 't5': {', '.join(missing)} not found in {folder}{hint}")
    self.folder = folder
    self.cfg = T5Config.from_json(os.path.join(folder, CONFIG_FILE))
    if width is not None and self.cfg.d_model != width:
      raise ValueError(f"text encoder 't5': {os.path.join(folder, CONFIG_FILE)} has "
                       f"d_model={self.cfg.d_model}, expected width {width}")
    self.width = self.cfg.d_model
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.params = load_params(folder, self.cfg, self.compute_dtype)
    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
    self.tokenizer.no_padding()  # we pad ourselves, to the longest or to max_length

  def config(self) -> dict:
    return dict(name=self.name, width=self.width, model_type=self.cfg.model_type,
                num_layers=self.cfg.num_layers, vocab_size=self.cfg.vocab_size)

  def tokenize(self, texts: list[str], max_length: int | None = None):
    """(ids (B,L) int32, mask (B,L) bool): tokens then </s>, right-padded with pad_token_id.
    Cut prompts keep their </s> (the tokenizer reserves room for it)."""
    if isinstance(texts, str):
      raise TypeError("text encoder 't5': encode takes a list of strings, got one string")
    if max_length is not None:
      if max_length < 2:
        raise ValueError(f"text encoder 't5': max_length={max_length} must be at least 2 "
                         f"(one token and </s>)")
      self.tokenizer.enable_truncation(max_length)
    else:
      self.tokenizer.no_truncation()
    encodings = self.tokenizer.encode_batch(list(texts))
    return base.pad_encodings(encodings, max_length, self.cfg.pad_token_id)

  def embed(self, ids, mask):
    return _forward(self.params, ids, mask, self.cfg)


def benchmark(cfg: T5Config = UMT5_XXL, params: dict | None = None, batch_size: int = 8,
              max_length: int = 512, compute_dtype="bfloat16", repeats: int = 3) -> dict:
  """Prints and returns prompts/s and tokens/s of the encoder forward at a full batch of
  max_length tokens; with no params, random weights of cfg's shapes (timing only)."""
  if params is None:
    shapes = expected_shapes(cfg)
    tensors = jax.jit(lambda key: {  # one program, not one compile per tensor shape
        name: 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)
        for i, (name, shape) in enumerate(shapes.items())})(jax.random.key(0))
    params = build_params(tensors.pop, cfg, compute_dtype)
  ids = jax.random.randint(jax.random.key(1), (batch_size, max_length), 0, cfg.vocab_size)
  mask = jnp.ones((batch_size, max_length), bool)
  _forward(params, ids, mask, cfg).block_until_ready()  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    _forward(params, ids, mask, cfg).block_until_ready()
  seconds = (time.perf_counter() - start) / repeats
  figures = dict(prompts_per_s=batch_size / seconds,
                 tokens_per_s=batch_size * max_length / seconds)
  dtype = params["layers"][0]["q"].dtype
  print(f"t5 ({cfg.model_type}, d_model {cfg.d_model}, {cfg.num_layers} layers, {dtype}) "
        f"encode at batch {batch_size} x {max_length} tokens on {jax.devices()[0].platform}: "
        f"{figures['prompts_per_s']:.2f} prompts/s, {figures['tokens_per_s']:.0f} tokens/s")
  return figures
