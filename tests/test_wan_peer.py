"""jova_jax.tools.wan_peer: the diffusers Wan peer sized to our config (tokens and FLOPs within
2%), and one interleaved round of both train steps (that part needs requirements-dev.txt's
torch and diffusers: `.venv-dev/bin/python -m pytest tests/test_wan_peer.py`)."""
import dataclasses

import pytest

from jova_jax import config_lib
from jova_jax.model import summary
from jova_jax.tools import wan_peer
from tests.conftest import load


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_peer_matches_our_sizes_tokens_and_flops(name):
  config = load(name)
  sizes = wan_peer.match_sizes(config)
  m, s = config.model, config_lib.latent_shapes(config)
  assert (sizes.hidden, sizes.heads, sizes.layers) == (m.hidden, m.heads,
                                                       m.dual_blocks + m.single_blocks)
  assert sizes.ffn == int(m.hidden * m.mlp_ratio)
  assert (sizes.height, sizes.width, sizes.out_channels) == s.video[1:]
  assert abs(sizes.tokens / s.joint_tokens - 1) <= 0.02
  model = config_lib.run_spec(config).model
  assert abs(wan_peer.peer_forward_flops(sizes) / summary.forward_flops(model) - 1) <= 0.02


def test_demo_peer_is_the_issue_16_reference():
  """The sizes docs/performance.md reports: 22 latent frames of 8x8 (352 video tokens) + 50
  text tokens = our 402, FLOPs +0.5%."""
  sizes = wan_peer.match_sizes(load("demo"))
  assert (sizes.frames, sizes.video_tokens, sizes.text_len) == (22, 352, 50)


def test_peer_flops_by_hand():
  """One block without text and no embeddings but the patch one: the terms one by one."""
  p = wan_peer.PeerSizes(hidden=8, heads=2, ffn=16, layers=1, patch=(1, 1, 1), in_channels=1,
                         out_channels=1, text_dim=4, freq_dim=2, frames=3, height=1, width=1,
                         text_len=0)
  h, n = 8, 3
  block = 2 * n * (4 * h * h + 2 * h * 16) + 4 * n * n * h + 2 * n * 2 * h * h
  embed = 2 * n * h * 2 + 2 * (2 * h + h * h + 6 * h * h)
  assert wan_peer.peer_forward_flops(p) == block + embed
  assert wan_peer.peer_forward_flops(p, batch=3) == 3 * (block + embed)
  longer = dataclasses.replace(p, text_len=5)
  assert wan_peer.peer_forward_flops(longer) > wan_peer.peer_forward_flops(p)


def test_step_ratios_pair_the_rounds():
  """A slow round slows both sides: its ratio is taken within the round, not across medians."""
  times = {"ours step": [1.0, 3.0, 1.2], "compiled step": [2.0, 6.0, 1.0]}
  assert wan_peer.step_ratios(times, "compiled") == pytest.approx([0.5, 0.5, 1.2])


def test_one_round_of_both_steps():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  config = load("tiny")
  sizes, peer, times = wan_peer.measure(config, rounds=1, compiled=False)
  counted = wan_peer.counted_forward_flops(peer)
  assert counted == pytest.approx(wan_peer.peer_forward_flops(sizes), rel=1e-6)
  assert {"ours step", "eager step", "eager forward+backward", "peer clip+AdamW",
          "peer EMA"} <= set(times)
  assert all(len(t) == 1 and t[0] > 0 for t in times.values())
  report = wan_peer.format_report(config, sizes, peer, times, counted)
  ratio = times["ours step"][0] / times["eager step"][0]
  assert f"ours / peer eager: step time {ratio:.2f}x" in report
  assert f"round by round {ratio:.2f}x (range {ratio:.2f}-{ratio:.2f} over 1 rounds)" in report
  assert "compiled" not in report
