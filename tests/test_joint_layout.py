"""The shard-major joint sequence: each context shard holds its own video slice; split undoes join."""
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax.model import joint_layout
from jova_jax.model.layout_collectives import layout_collectives

LENGTHS = [19, 8, 8, 20]  # audio, text_a, text_v, video of configs/tiny.py


def _segments(batch=2, width=3):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal((batch, n, width)), jnp.float32) for n in LENGTHS]


def test_each_shard_holds_its_video_slice_and_an_even_share_of_the_rest():
  segments = _segments()
  joint = joint_layout.join(segments, 4)
  rest = jnp.concatenate(segments[:3], axis=1)
  assert joint.shape == (2, 36 + 20, 3)  # 35 audio + text tokens padded to 36
  by_shard = np.asarray(joint).reshape(2, 4, 14, 3)
  for i in range(4):
    np.testing.assert_array_equal(by_shard[:, i, 9:], segments[3][:, 5 * i:5 * (i + 1)])
    np.testing.assert_array_equal(by_shard[:, i, :9][:, :35 - 9 * i], rest[:, 9 * i:9 * (i + 1)])
  np.testing.assert_array_equal(by_shard[:, 3, 8], 0)  # the one padding token


def test_split_inverts_join_and_from_plain_matches_join():
  segments = _segments()
  for shards in (1, 2, 4):
    joint = joint_layout.join(segments, shards)
    for got, want in zip(joint_layout.split(joint, LENGTHS, shards), segments):
      np.testing.assert_array_equal(got, want)
    plain = jnp.concatenate(segments, axis=1)
    np.testing.assert_array_equal(joint_layout.from_plain(plain, LENGTHS, shards), joint)
  mask = [jnp.ones((2, n), bool) for n in LENGTHS]
  assert int(joint_layout.join(mask, 4).sum()) == 2 * sum(LENGTHS)  # padding is masked (False)


# Each strategy's own collectives, which the layout cannot remove.
_OWN = {"all_gather": {"all-gather", "reduce-scatter"}, "ulysses": {"all-to-all", "all-gather"},
        "ring": {"collective-permute", "all-gather"}}


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
def test_shard_major_order_moves_no_video_tokens_around_attention(strategy):
  """Plain order: XLA reshuffles the joint sequence with all-to-alls and permutes in every block.
  Shard-major: only the strategy's own collectives and one all-gather of the audio/text output."""
  plain = layout_collectives(strategy, shard_major=False)
  shard_major = layout_collectives(strategy, shard_major=True)
  assert set(plain) - _OWN[strategy], plain
  assert set(shard_major) <= _OWN[strategy], shard_major
  assert sum(shard_major.values()) < sum(plain.values())
