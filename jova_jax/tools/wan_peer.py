"""Our train step next to diffusers' WanTransformer3DModel sized to match, in one process:

  python -m jova_jax.tools.wan_peer --config=configs/demo.py [--rounds=20] [--compile=yes|no]
  make bench-peer        # builds .venv-dev (requirements-dev.txt: torch, diffusers) and runs it

The peer has our width, heads, MLP width, block count (dual + single), video patch, latent
channels (in: noisy + condition + mask, out: clean) and text width; its latent grid has our
height and width, and its frame count and text length are chosen so its tokens per sample
(video + text) and its FLOPs per step are those of ours (match_sizes: within 2% each on the
demo). One peer step = forward + MSE loss + backward + global-norm clipping + AdamW (fused)
+ EMA, float32, torch on 2 threads; ours is `bench train`'s compiled step (it has an EMA).
Every part of both sides takes turns each round (bench.round_times, after a warm-up), so a
machine busy with other work slows them all alike; the table gives medians, and each verdict
line also the step ratio taken round by round, whose range shows the noise. FLOPs are
analytic on both sides (model/summary.py and peer_forward_flops; backward = 2x forward); the
peer's are checked against torch's FlopCounterMode. Needs torch and diffusers
(requirements-dev.txt); the size matching (match_sizes, peer_forward_flops) does not.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import statistics

import jax
from absl import app, flags

from jova_jax import cli, config_lib, host_memory
from jova_jax.tools import bench
from jova_jax.errors import UserError
from jova_jax.model import summary

# torch's OpenMP threads spin between parallel regions by default: on a machine shared with
# other jobs (or with XLA's threads in this process) that made the peer's step up to 10x slower
# and its times scatter (docs/performance.md). Set before torch loads its OpenMP runtime;
# OMP_WAIT_POLICY=ACTIVE in the environment restores spinning. (Not on import as a library.)
if __name__ == "__main__":
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
  import torch
except ImportError:  # match_sizes and peer_forward_flops need no torch
  torch = None

THREADS = 2
EMA_DECAY = 0.999


@dataclasses.dataclass(frozen=True)
class PeerSizes:
  """WanTransformer3DModel's arguments and the latent / text shape of one sample."""
  hidden: int
  heads: int
  ffn: int
  layers: int
  patch: tuple
  in_channels: int
  out_channels: int
  text_dim: int
  freq_dim: int
  frames: int
  height: int
  width: int
  text_len: int

  @property
  def video_tokens(self) -> int:
    pt, ph, pw = self.patch
    return (self.frames // pt) * (self.height // ph) * (self.width // pw)

  @property
  def tokens(self) -> int:
    return self.video_tokens + self.text_len


def peer_forward_flops(p: PeerSizes, batch: int = 1) -> float:
  """Matmul + attention FLOPs of one forward (2 per multiply-add), as summary.forward_flops
  counts ours: per block self-attention q/k/v/out and attention over the video tokens,
  cross-attention q/out on the video tokens, k/v on the text and its attention, the MLP."""
  h, n, l = p.hidden, p.video_tokens, p.text_len
  block = (2 * n * (4 * h * h + 2 * h * p.ffn) + 4 * n * n * h    # self-attention + MLP
           + 2 * n * 2 * h * h + 2 * l * 2 * h * h + 4 * n * l * h)  # cross-attention
  patch = math.prod(p.patch)
  embed = 2 * n * h * patch * (p.in_channels + p.out_channels)  # patch embedding + proj_out
  embed += 2 * l * (p.text_dim * h + h * h)                     # text embedder (2 layers)
  embed += 2 * (p.freq_dim * h + h * h + h * 6 * h)             # time embedder + projection
  return float(batch * (p.layers * block + embed))


def match_sizes(config) -> PeerSizes:
  """Our model's sizes; the frame count and text length minimising |FLOPs ratio - 1| +
  |tokens ratio - 1| against ours (per sample)."""
  m, spec = config.model, config_lib.run_spec(config)
  s = spec.shapes
  t, h, w, cv = s.video
  cin = cv * (2 if m.i2v else 1) + (m.i2v_mask_channels if m.i2v else 0)
  base = PeerSizes(hidden=m.hidden, heads=m.heads, ffn=int(m.hidden * m.mlp_ratio),
                   layers=m.dual_blocks + m.single_blocks, patch=tuple(m.video_patch),
                   in_channels=cin, out_channels=cv, text_dim=config.text.width,
                   freq_dim=m.freq_dim, frames=t, height=h, width=w, text_len=s.text_tokens)
  flops, tokens = summary.forward_flops(spec.model), s.joint_tokens
  pt = m.video_patch[0]
  candidates = (dataclasses.replace(base, frames=f, text_len=n)
                for f in range(pt, 4 * t + 1, pt) for n in range(1, 4 * tokens + 1))
  return min(candidates, key=lambda p: abs(peer_forward_flops(p) / flops - 1)
             + abs(p.tokens / tokens - 1))


# --------------------------------------------------------------------------- the torch peer

@dataclasses.dataclass
class Peer:
  model: object
  opt: object
  ema: list
  batches: list
  clip_norm: float


def build_peer(sizes: PeerSizes, config, seed: int = 0) -> Peer:
  """The diffusers model in train mode, AdamW with our hyperparameters, an EMA copy and two
  random batches of our batch size."""
  from diffusers import WanTransformer3DModel
  torch.manual_seed(seed)
  model = WanTransformer3DModel(
      patch_size=sizes.patch, num_attention_heads=sizes.heads,
      attention_head_dim=sizes.hidden // sizes.heads, in_channels=sizes.in_channels,
      out_channels=sizes.out_channels, text_dim=sizes.text_dim, freq_dim=sizes.freq_dim,
      ffn_dim=sizes.ffn, num_layers=sizes.layers).train()
  t = config.train
  opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                          weight_decay=t.weight_decay, fused=True)
  ema = [p.detach().clone() for p in model.parameters()]
  batches = [peer_batch(sizes, int(t.batch_size), seed + i) for i in range(2)]
  return Peer(model, opt, ema, batches, float(t.clip_norm))


def peer_batch(sizes: PeerSizes, batch: int, seed: int) -> dict:
  g = torch.Generator().manual_seed(seed)
  grid = (sizes.frames, sizes.height, sizes.width)
  randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
  return {"x0": randn(batch, sizes.out_channels, *grid),
          "noise": randn(batch, sizes.out_channels, *grid),
          "cond": randn(batch, sizes.in_channels - sizes.out_channels, *grid),
          "text": randn(batch, sizes.text_len, sizes.text_dim),
          "sigma": torch.rand(batch, generator=g)}


def peer_loss(model, b: dict):
  """Flow matching: the model sees x_sigma (+ the condition channels), predicts the velocity."""
  sigma = b["sigma"].view(-1, 1, 1, 1, 1)
  x = (1 - sigma) * b["x0"] + sigma * b["noise"]
  x = torch.cat([x, b["cond"]], dim=1)
  out = model(x, b["sigma"] * 1000, b["text"], return_dict=False)[0]
  return ((out - (b["noise"] - b["x0"])) ** 2).mean()


def peer_fns(peer: Peer, loss_fn, name: str) -> dict:
  """Timed calls: forward (no grad), forward+backward, and the whole train step."""
  counter = {"i": 0}

  def batch():
    counter["i"] += 1
    return peer.batches[counter["i"] % 2]

  def forward():
    with torch.no_grad():
      return loss_fn(peer.model, batch()).item()

  def forward_backward():
    peer.opt.zero_grad(set_to_none=True)
    loss = loss_fn(peer.model, batch())
    loss.backward()
    return loss.item()

  def step():
    loss = forward_backward()
    optimizer_update(peer)
    ema_update(peer)
    return loss

  return {f"{name} forward": forward, f"{name} forward+backward": forward_backward,
          f"{name} step": step}


def optimizer_update(peer: Peer) -> None:
  """Global-norm clipping and AdamW on the gradients the last backward left."""
  if peer.clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(peer.model.parameters(), peer.clip_norm, foreach=True)
  peer.opt.step()


def ema_update(peer: Peer) -> None:
  with torch.no_grad():
    torch._foreach_lerp_(peer.ema, list(peer.model.parameters()), 1.0 - EMA_DECAY)


def counted_forward_flops(peer: Peer) -> float:
  """torch's FlopCounterMode over one eager forward of one sample (its table lacks the CPU
  attention kernel: counted here with its formula for the other kernels)."""
  from torch.utils import flop_counter
  def cpu_sdpa(q, k, v, *_, out_shape=None, **__):
    return flop_counter.sdpa_flop_count(q, k, v)
  mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
  one = {k: v[:1] for k, v in peer.batches[0].items()}
  counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
  with torch.no_grad(), counter:
    peer_loss(peer.model, one)
  return float(counter.get_total_flops())


# --------------------------------------------------------------------------- ours, and the run

def ours_fns(config) -> dict:
  """`bench train --breakdown`'s compiled train step and its timed parts."""
  fns, _, _ = bench.train_step_fns(config, breakdown=True)
  return {f"ours {name}": fn for name, fn in fns.items()}


def measure(config, rounds: int, compiled: bool) -> tuple[PeerSizes, Peer, dict]:
  """(peer sizes, peer, {name: seconds of each round}) with every part of both sides interleaved."""
  torch.set_num_threads(THREADS)
  sizes = match_sizes(config)
  peer = build_peer(sizes, config)
  fns = ours_fns(config)
  fns.update(peer_fns(peer, peer_loss, "eager"))
  if compiled:
    fns.update(peer_fns(peer, torch.compile(peer_loss), "compiled"))
  fns["peer clip+AdamW"] = lambda: optimizer_update(peer)  # the optimizer is eager in both
  fns["peer EMA"] = lambda: ema_update(peer)
  for fn in fns.values():  # a second warm-up: torch.compile may recompile on its second call
    jax.block_until_ready(fn())
  return sizes, peer, bench.round_times(fns, rounds)


def rows(spec: config_lib.RunSpec, sizes: PeerSizes, seconds: dict) -> list:
  """(side, part, seconds, FLOPs or None) for the table. backward = (forward+backward) -
  forward, as bench --breakdown; ours' optimizer+EMA (the step's update tail) and the peer's
  clipping+AdamW and EMA are each timed on their own."""
  batch = spec.batch_size
  out = []
  for side, fwd_flops in (("ours", summary.forward_flops(spec.model, batch)),
                          ("eager", peer_forward_flops(sizes, batch)),
                          ("compiled", peer_forward_flops(sizes, batch))):
    if f"{side} step" not in seconds:
      continue
    fwd, grad, step = (seconds[f"{side} {k}"] for k in ("forward", "forward+backward", "step"))
    out += [(side, "forward", fwd, fwd_flops), (side, "backward", grad - fwd, 2 * fwd_flops)]
    if side == "ours":
      out.append((side, "optimizer+EMA", seconds["ours optimizer+EMA"], None))
    else:
      out += [(side, "clip+AdamW", seconds["peer clip+AdamW"], None),
              (side, "EMA", seconds["peer EMA"], None)]
    out.append((side, "step", step, 3 * fwd_flops))
    if side != "ours":
      out.append((side, "step without EMA", step - seconds["peer EMA"], 3 * fwd_flops))
  return out


def step_ratios(times: dict, side: str) -> list[float]:
  """Our step time over the peer side's, round by round: both met the same load in a round, so
  their spread shows what the machine's noise does to the verdict."""
  return [ours / theirs for ours, theirs in zip(times["ours step"], times[f"{side} step"])]


def format_report(config, sizes: PeerSizes, peer: Peer, times: dict, counted: float) -> str:
  """The table of medians, then each peer side's step ratio: of the medians, and round by round."""
  import diffusers
  seconds = bench.medians(times)
  spec = config_lib.run_spec(config)
  s, batch = spec.shapes, spec.batch_size
  ours, theirs = summary.train_step_flops(spec.model, batch), 3 * peer_forward_flops(sizes, batch)
  n_params = sum(p.numel() for p in peer.model.parameters())
  lines = [
      f"peer: diffusers {diffusers.__version__} WanTransformer3DModel, torch {torch.__version__}"
      f", float32, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
      f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, malloc: "
      f"{host_memory.allocator(os.environ)} (both sides); ours: jax {jax.__version__} on "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
      f"peer sizes: hidden {sizes.hidden}, heads {sizes.heads} (head_dim "
      f"{sizes.hidden // sizes.heads}), ffn {sizes.ffn}, layers {sizes.layers}, patch "
      f"{sizes.patch}, in/out channels {sizes.in_channels}/{sizes.out_channels}, text_dim "
      f"{sizes.text_dim}, {n_params / 1e6:.2f}M params (ours "
      f"{sum(summary.param_table(config).values()) / 1e6:.2f}M)",
      f"peer sample: latent (C, T, H, W) = ({sizes.in_channels}, {sizes.frames}, "
      f"{sizes.height}, {sizes.width}) -> {sizes.video_tokens} video + {sizes.text_len} text "
      f"= {sizes.tokens} tokens (ours {s.joint_tokens}: video {s.video_tokens}, audio "
      f"{s.audio_tokens}, text 2 x {s.text_tokens})",
      f"FLOPs per step (batch {batch}): ours {ours:.3e}, peer {theirs:.3e} "
      f"({100 * (theirs / ours - 1):+.1f}%); peer counted by FlopCounterMode (forward x 3) "
      f"{3 * batch * counted:.3e}",
      f"{'side':<9} {'part':<17} {'ms':>8} {'GFLOP/s':>8}"]
  for side, part, t, flops in rows(spec, sizes, seconds):
    rate = f"{flops / t / 1e9:8.1f}" if flops and t > 0 else f"{'-':>8}"
    lines.append(f"{side:<9} {part:<17} {t * 1e3:8.1f} {rate}")
  for side in ("eager", "compiled"):
    if f"{side} step" in seconds:
      r = seconds["ours step"] / seconds[f"{side} step"]
      paired = step_ratios(times, side)
      lines.append(f"ours / peer {side}: step time {r:.2f}x, FLOP rate "
                   f"{ours / seconds['ours step'] / (theirs / seconds[f'{side} step']):.2f}x; "
                   f"round by round {statistics.median(paired):.2f}x (range {min(paired):.2f}-"
                   f"{max(paired):.2f} over {len(paired)} rounds)")
  return "\n".join(lines)


def main():
  # Flags are defined here, not at import (the tests import this module).
  from ml_collections import config_flags
  config_flag = config_flags.DEFINE_config_file("config", None, "Config file.")
  rounds = flags.DEFINE_integer("rounds", 20, "Timed rounds after the warm-up (medians).")
  compile_flag = flags.DEFINE_enum("compile", "yes", ["yes", "no"],
                                   "Also time the peer under torch.compile.")

  def run(argv):
    del argv
    config = config_flag.value
    if torch is None or importlib.util.find_spec("diffusers") is None:
      raise UserError("the peer needs torch and diffusers (requirements-dev.txt): "
                      "`make bench-peer` installs them into .venv-dev and runs this")
    if config is None:
      raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    print(f"load average before: {os.getloadavg()}", flush=True)
    sizes, peer, times = measure(config, rounds.value, compile_flag.value == "yes")
    print(format_report(config, sizes, peer, times, counted_forward_flops(peer)))
    print(f"load average after: {os.getloadavg()}")

  cli.run(run)


if __name__ == "__main__":
  main()
