"""JoVA: two towers (video, audio) of M dual-stream then N single-stream blocks, joined by one
joint self-attention per block (docs/design.md section 1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jova_jax import config_lib
from jova_jax.model import embeddings as emb
from jova_jax.model import joint_layout, lora
from jova_jax.model.blocks import SEGMENTS, BlockConfig, JointBlock
from jova_jax.model.layers import Dense, layer_norm, modulate
from jova_jax.parallel import remat
from jova_jax.parallel.rules import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) + zero-initialised projection back to patch values."""

  def __init__(self, hidden: int, out_dim: int, eps: float, dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.modulation = Dense(hidden, (2, hidden), ("embed", "modulation", "mlp"), rngs=rngs,
                            dtype=dtype, zero_init=True)
    self.proj = Dense(hidden, out_dim, ("embed", "patch"), rngs=rngs, dtype=dtype, zero_init=True)

  def __call__(self, x, c):
    m = self.modulation(jax.nn.silu(c)).astype(jnp.float32)
    return self.proj(modulate(layer_norm(x, self.eps), m[:, 0], m[:, 1]))


class TextProjection(nnx.Module):
  def __init__(self, text_dim: int, hidden: int, dtype, *, rngs: nnx.Rngs):
    self.fc1 = Dense(text_dim, hidden, ("text_embed", "embed"), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(hidden, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def _stacked_blocks(cfg: BlockConfig, single: bool, count: int, rngs: nnx.Rngs):
  """`count` blocks with params stacked on a leading `layers` axis (run with nnx.scan)."""
  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(r):
    return JointBlock(cfg, single, rngs=r)
  return make(rngs)


def _store_params_in(model: nnx.Module, dtype) -> None:
  """model.param_dtype: float params are stored (and checkpointed, optimised, averaged) in
  dtype; every layer still computes in model.compute_dtype, norms and softmax in float32."""
  if dtype == jnp.float32:
    return
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param) and jnp.issubdtype(node.get_value().dtype, jnp.floating):
      node.set_value(node.get_value().astype(dtype))  # `x[...] = ` would keep the old dtype


class JoVA(nnx.Module):
  """Predicts flow velocities for noisy video and audio latents given text.

  Inputs (all batch-first): video (B,T',H',W',Cv), audio (B,La,Ca), text (B,Lt,Dt) with
  text_mask (B,Lt), sigma_video (B,), sigma_audio (B,); optional first_frame (B,H',W',Cv) with
  use_first_frame (B,) for I2V, drop_text (B,) for classifier-free guidance, audio_valid (B,La).
  Returns (velocity_video, velocity_audio) in the input shapes, float32.
  """

  def __init__(self, spec: config_lib.ModelSpec, *, rngs: nnx.Rngs):
    """spec: the typed model config (config_lib.model_spec / run_spec(...).model)."""
    if not isinstance(spec, config_lib.ModelSpec):
      raise TypeError(f"JoVA takes a config_lib.ModelSpec (config_lib.model_spec(config)), "
                      f"got {type(spec).__name__}")
    self.shapes = spec.shapes
    self.dtype = DTYPES[spec.compute_dtype]
    self.video_patch = tuple(spec.video_patch)
    self.audio_patch = int(spec.audio_patch)
    self.i2v = bool(spec.i2v)
    self.i2v_mask_channels = int(spec.i2v_mask_channels)
    self.head_dim = spec.head_dim
    self.rope_theta = float(spec.rope_theta)
    self.per_video_frame = spec.per_video_frame
    self.remat = spec.remat
    self.scan_unroll = int(spec.scan_unroll)
    remat.policy(spec.remat)  # fail at construction on an unknown policy
    hidden, eps, text_width = spec.hidden, spec.norm_eps, spec.text_width
    t, h, w, cv = self.shapes.video
    la, ca = self.shapes.audio
    pt, ph, pw = self.video_patch
    video_in = cv * (2 if self.i2v else 1) + (self.i2v_mask_channels if self.i2v else 0)
    self.video_in = Dense(pt * ph * pw * video_in, hidden, ("patch", "embed"), rngs=rngs,
                          dtype=self.dtype)
    self.audio_in = Dense(self.audio_patch * ca, hidden, ("patch", "embed"), rngs=rngs,
                          dtype=self.dtype)
    self.text_video = TextProjection(text_width, hidden, self.dtype, rngs=rngs)
    self.text_audio = TextProjection(text_width, hidden, self.dtype, rngs=rngs)
    # Replaces the whole prompt (one valid token) when text is dropped for CFG.
    self.null_text = nnx.Param(jax.random.normal(rngs.params(), (text_width,)) * 0.02,
                               axes=("text_embed",))
    self.sigma_video = emb.SigmaEmbedding(spec.freq_dim, hidden, rngs=rngs)
    self.sigma_audio = emb.SigmaEmbedding(spec.freq_dim, hidden, rngs=rngs)
    block_cfg = BlockConfig(
        hidden=hidden, heads=spec.heads, mlp_dim=spec.mlp_dim, eps=eps, dtype=self.dtype,
        context_strategy=spec.context_strategy, attention_kernel=spec.attention_kernel,
        attention_chunk=spec.attention_chunk)
    self.dual_blocks = _stacked_blocks(block_cfg, False, spec.dual_blocks, rngs)
    self.single_blocks = _stacked_blocks(block_cfg, True, spec.single_blocks, rngs)
    self.final_video = FinalLayer(hidden, pt * ph * pw * cv, eps, self.dtype, rngs=rngs)
    self.final_audio = FinalLayer(hidden, self.audio_patch * ca, eps, self.dtype, rngs=rngs)
    if lora.enabled(spec.lora):
      lora.attach(self, spec.lora, rngs)
    _store_params_in(self, jnp.dtype(spec.param_dtype))

  # -------------------------------------------------------------------------- inputs
  def _video_input(self, video, first_frame, use_first_frame):
    if not self.i2v:
      return video
    b, t, h, w, c = video.shape
    if first_frame is None:
      first_frame = jnp.zeros((b, h, w, c), video.dtype)
      use_first_frame = jnp.zeros((b,), bool)
    on = use_first_frame.astype(video.dtype)[:, None, None, None]
    cond = jnp.zeros_like(video).at[:, 0].set(first_frame * on)
    mask = jnp.zeros((b, t, h, w, self.i2v_mask_channels), video.dtype).at[:, 0].set(jnp.broadcast_to(on, (b, h, w, self.i2v_mask_channels)))
    return jnp.concatenate([video, cond, mask], axis=-1)

  def _text_input(self, text, text_mask, drop_text):
    text_mask = text_mask.astype(bool)
    if drop_text is None:
      return text, text_mask
    null = jnp.broadcast_to(self.null_text[...].astype(text.dtype), text.shape)
    null_mask = jnp.zeros_like(text_mask).at[:, 0].set(True)
    d = drop_text.astype(bool)
    return (jnp.where(d[:, None, None], null, text),
            jnp.where(d[:, None], null_mask, text_mask))

  # -------------------------------------------------------------------------- forward
  def __call__(self, video, audio, text, text_mask, sigma_video, sigma_audio, *,
               first_frame=None, use_first_frame=None, drop_text=None, audio_valid=None):
    b, t, h, w, _ = video.shape
    pt, ph, pw = self.video_patch
    grid_tokens = (t // pt, h // ph, w // pw)
    text, text_mask = self._text_input(text, text_mask, drop_text)
    xv = self.video_in(emb.patchify_video(self._video_input(video, first_frame, use_first_frame),
                                          self.video_patch))
    xa = self.audio_in(emb.patchify_audio(audio, self.audio_patch))
    xs = {"audio": xa, "text_a": self.text_audio(text), "text_v": self.text_video(text),
          "video": constrain(xv, ("act_batch", "act_video_length", "act_embed"))}
    cond = {"video": self.sigma_video(sigma_video), "audio": self.sigma_audio(sigma_audio)}
    if audio_valid is None:
      audio_tokens_valid = jnp.ones(xa.shape[:2], bool)
    else:
      audio_tokens_valid = audio_valid.reshape(b, -1, self.audio_patch).any(-1)
    # The joint sequence in the order where each context shard holds its own video tokens.
    shards = joint_layout.context_shards(xv.shape[1])
    kv_valid = joint_layout.join([audio_tokens_valid, text_mask, text_mask,
                                  jnp.ones(xv.shape[:2], bool)], shards)
    angles = emb.joint_rope_angles(
        audio_tokens=xa.shape[1], text_tokens=text.shape[1], video_grid=grid_tokens,
        video_patch=self.video_patch, audio_patch=self.audio_patch,
        per_video_frame=self.per_video_frame, head_dim=self.head_dim, theta=self.rope_theta)
    angles = joint_layout.from_plain(angles, [xa.shape[1], text.shape[1], text.shape[1], xv.shape[1]],
                                     shards, axis=0)

    xs = self._run_blocks(self.dual_blocks, xs, cond, angles, kv_valid)
    xs = self._run_blocks(self.single_blocks, xs, cond, angles, kv_valid)

    out_v = self.final_video(xs["video"], cond["video"]).astype(jnp.float32)
    out_a = self.final_audio(xs["audio"], cond["audio"]).astype(jnp.float32)
    return (emb.unpatchify_video(out_v, self.video_patch, (t, h, w)),
            emb.unpatchify_audio(out_a, self.audio_patch))

  def _run_blocks(self, blocks, xs, cond, angles, kv_valid):
    use_remat, policy = remat.policy(self.remat)
    # LoRA dropout while training: each scanned layer draws its masks from its own key.
    key = lora.dropout_key()
    layers = jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0]
    keys = jax.random.split(key, layers) if key is not None else jnp.zeros((layers,))

    def body(carry, block, layer_key):
      with lora.dropout_scope(layer_key if key is not None else None):
        return block(carry, cond, angles, kv_valid), None

    if use_remat:
      body = nnx.remat(body, policy=policy, prevent_cse=False)
    xs, _ = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                     unroll=self.scan_unroll)(xs, blocks, keys)
    return xs


_AUDIO_FROM_VIDEO = {"sigma_audio": "sigma_video", "text_audio": "text_video",
                     "final_audio": "final_video", "audio_in": "video_in"}
_STREAM_FROM_VIDEO = {"audio": "video", "text_a": "text_v"}


def _video_source(path):
  """The video-tower param that an audio-tower param is copied from (None if not audio)."""
  if path[0] in _AUDIO_FROM_VIDEO:
    return (_AUDIO_FROM_VIDEO[path[0]],) + path[1:]
  if path[0] in ("dual_blocks", "single_blocks") and path[1] in _STREAM_FROM_VIDEO:
    return (path[0], _STREAM_FROM_VIDEO[path[1]]) + path[2:]
  return None


def copy_video_tower_to_audio(model: JoVA) -> list[str]:
  """Initialises the audio tower as a copy of the video tower (the paper starts from a
  pretrained video model), for every weight whose shape matches. Returns the copied names."""
  state = nnx.state(model, nnx.Param)
  flat = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
  values = {tuple(k.key for k in path): v for path, v in flat.items()}
  copied = []
  for dst in values:
    src = _video_source(dst)
    if src in values and values[src].shape == values[dst].shape:
      values[dst] = values[src]
      copied.append("/".join(map(str, dst)))
  nested = nnx.to_pure_dict(state)
  for key, value in values.items():
    node = nested
    for part in key[:-1]:
      node = node[part]
    node[key[-1]] = value
  nnx.replace_by_pure_dict(state, nested)
  nnx.update(model, state)
  return copied


def param_logical_axes(model_or_state):
  """pytree of logical-name tuples matching nnx.state(model, nnx.Param); stacked block params
  get a leading 'layers' axis."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
      model_or_state, nnx.Param)

  def names(var):
    axes = tuple(var.get_metadata().get("axes", ()))
    ndim = len(var.shape)
    if ndim == len(axes) + 1:
      axes = ("layers",) + axes
    if ndim != len(axes):
      raise ValueError(f"param of shape {var.shape} has logical axes {axes}")
    return axes
  return jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


__all__ = ["JoVA", "copy_video_tower_to_audio", "param_logical_axes", "SEGMENTS"]
