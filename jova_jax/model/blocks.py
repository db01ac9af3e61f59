"""Dual-stream and single-stream JoVA blocks: per-stream weights, ONE joint self-attention.

Segments of the joint sequence, in order: audio, text_a (text for the audio tower), text_v
(text for the video tower), video; on a context mesh interleaved per shard (joint_layout.py).
A dual-stream block gives each segment its own weights; a single-stream block shares weights
within [audio ; text_a] and within [text_v ; video]. All per-token work (norms, adaLN, QKV, FFN)
is the same whether two segments are concatenated or run apart with shared weights, so both
block kinds run segment by segment and meet only in the attention.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jova_jax.kernels import attention_cpu
from jova_jax.model import attention, joint_layout
from jova_jax.model.layers import Dense, RMSNorm, layer_norm, modulate
from jova_jax.parallel.rules import constrain

SEGMENTS = ("audio", "text_a", "text_v", "video")
# Which tower's sigma modulates a segment; in a single-stream block also whose weights it uses.
TOWER_OF = {"audio": "audio", "text_a": "audio", "text_v": "video", "video": "video"}
# Segments whose rows may be padding (a prompt shorter than the text length).
TEXT_SEGMENTS = ("text_a", "text_v")
# Activation sharding: video tokens over `context`, the rest replicated over it.
_ACT = {"video": ("act_batch", "act_video_length", "act_embed")}
_ACT_OTHER = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  hidden: int
  heads: int
  mlp_dim: int
  eps: float
  dtype: jnp.dtype
  context_strategy: str = "none"
  attention_kernel: str = "auto"
  attention_chunk: int = 512

  @property
  def head_dim(self):
    return self.hidden // self.heads


class Stream(nnx.Module):
  """One stream's weights: adaLN modulation, QKV with RMS QK-norm, output projection, FFN."""

  def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
    h, d = cfg.hidden, cfg.head_dim
    self.cfg = cfg
    # adaLN-Zero: the block starts as the identity, gates open during training.
    self.modulation = Dense(h, (6, h), ("embed", "modulation", "mlp"), rngs=rngs, dtype=cfg.dtype,
                            zero_init=True)
    self.qkv = Dense(h, (3, cfg.heads, d), ("embed", None, "heads", "kv"), rngs=rngs, dtype=cfg.dtype)
    self.q_norm = RMSNorm(d, "kv", eps=cfg.eps)
    self.k_norm = RMSNorm(d, "kv", eps=cfg.eps)
    self.out = Dense((cfg.heads, d), h, ("heads", "kv", "embed"), rngs=rngs, dtype=cfg.dtype)
    self.fc1 = Dense(h, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=cfg.dtype)
    self.fc2 = Dense(cfg.mlp_dim, h, ("mlp", "embed"), rngs=rngs, dtype=cfg.dtype)

  def mods(self, c):
    """(B, hidden) conditioning -> 6 x (B, hidden): shift/scale/gate for attention and FFN."""
    m = self.modulation(jax.nn.silu(c)).astype(jnp.float32)
    return [m[:, i] for i in range(6)]

  def qkv_input(self, x, mods):
    """What the QKV projection reads: x layer-normed and modulated."""
    return modulate(layer_norm(x, self.cfg.eps), mods[0], mods[1])

  def finish(self, x, attn_out, mods, rows_valid=None):
    """rows_valid: None, or (B, L) marking the rows that are read (Dense)."""
    x = x + (mods[2][:, None, :] * self.out(attn_out, rows_valid)).astype(x.dtype)
    y = modulate(layer_norm(x, self.cfg.eps), mods[3], mods[4])
    y = self.fc2(jax.nn.gelu(self.fc1(y, rows_valid), approximate=True), rows_valid)
    return x + (mods[5][:, None, :] * y).astype(x.dtype)


class JointBlock(nnx.Module):
  """One block of both towers. `single=False`: four streams; `single=True`: two."""

  def __init__(self, cfg: BlockConfig, single: bool, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.single = single
    names = ("audio", "video") if single else SEGMENTS
    for name in names:
      setattr(self, name, Stream(cfg, rngs=rngs))

  def stream(self, segment: str) -> Stream:
    return getattr(self, TOWER_OF[segment] if self.single else segment)

  def qk_norm(self, lengths, shards: int) -> attention.QKNorm:
    """Each segment's QK-norm scales, and which segment each row of the joint sequence is in."""
    segment = joint_layout.join([np.full(length, i, np.int32) for i, length in enumerate(lengths)],
                                shards, axis=0)
    norms = [(self.stream(seg).q_norm, self.stream(seg).k_norm) for seg in SEGMENTS]
    return attention.QKNorm(segment, jnp.stack([q.scale[...] for q, _ in norms]),
                            jnp.stack([k.scale[...] for _, k in norms]), norms[0][0].eps)

  def __call__(self, xs: dict, cond: dict, angles, kv_valid):
    """xs: segment -> (B, L_seg, hidden); cond: tower -> (B, hidden); angles (L, D/2) and kv_valid
    (B, L) in the joint_layout order of the segments."""
    mods = {seg: self.stream(seg).mods(cond[TOWER_OF[seg]]) for seg in SEGMENTS}
    inputs = [self.stream(seg).qkv_input(xs[seg], mods[seg]) for seg in SEGMENTS]
    lengths = [xs[seg].shape[1] for seg in SEGMENTS]
    shards = joint_layout.context_shards(lengths[-1])
    # The text streams' layers skip their padding rows where they can (layers.contract): a padding
    # token's key is masked, so no valid row reads what they hold.
    segment_valid = dict(zip(SEGMENTS, joint_layout.split(kv_valid, lengths, shards)))
    rows_valid = {seg: segment_valid[seg] if seg in TEXT_SEGMENTS else None for seg in SEGMENTS}
    qk_norm = self.qk_norm(lengths, shards)
    if attention.segments_apart(self.cfg.dtype, self.cfg.attention_kernel):
      # The kernel reads each segment's projection and adds its bias where they lie.
      projections = [self.stream(seg).qkv for seg in SEGMENTS]
      outs = attention_cpu.segment_attention(
          [p.unbiased(y, rows_valid[seg]) for seg, p, y in zip(SEGMENTS, projections, inputs)],
          [p.bias[...] for p in projections],
          kv_valid, rope=angles,
          norm=(qk_norm.segment, qk_norm.q_scales, qk_norm.segment, qk_norm.k_scales, qk_norm.eps))
    else:
      qkvs = [self.stream(seg).qkv(y, rows_valid[seg]) for seg, y in zip(SEGMENTS, inputs)]
      q, k, v = (joint_layout.join([qkv[:, :, i] for qkv in qkvs], shards) for i in range(3))
      out = attention.joint_attention(q, k, v, kv_valid, qk_norm=qk_norm, rope=angles,
                                      strategy=self.cfg.context_strategy,
                                      kernel=self.cfg.attention_kernel,
                                      chunk=self.cfg.attention_chunk)
      outs = joint_layout.split(out, lengths, shards)
    new = {}
    for seg, seg_out in zip(SEGMENTS, outs):
      y = self.stream(seg).finish(xs[seg], seg_out, mods[seg], rows_valid[seg])
      new[seg] = constrain(y, _ACT.get(seg, _ACT_OTHER))
    return new
