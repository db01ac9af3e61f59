"""JoVA model: cross-modal interaction, RoPE, construction errors, tower copy, summary."""
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jova_jax import config_lib
from jova_jax.kernels import dense_rows_cpu
from jova_jax.model import embeddings as emb
from jova_jax.model import jova, summary
from jova_jax.model.blocks import BlockConfig, JointBlock
from tests.conftest import load


def _randomize(module, seed=0, scale=0.3):
  """adaLN-Zero starts every block as the identity; random weights make interaction visible."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)]
  nnx.update(module, jax.tree.unflatten(treedef, new))


def _block_inputs(hidden=32, seed=1):
  k = jax.random.split(jax.random.key(seed), 6)
  lens = {"audio": 5, "text_a": 4, "text_v": 4, "video": 6}
  xs = {s: jax.random.normal(kk, (2, n, hidden)) for kk, (s, n) in zip(k, lens.items())}
  cond = {"audio": jax.random.normal(k[4], (2, hidden)), "video": jax.random.normal(k[5], (2, hidden))}
  text_valid = jnp.array([[True, True, False, True], [True, True, True, True]])
  kv_valid = jnp.concatenate([jnp.ones((2, 5), bool), text_valid, text_valid, jnp.ones((2, 6), bool)], 1)
  angles = emb.joint_rope_angles(audio_tokens=5, text_tokens=4, video_grid=(2, 1, 3),
                                 video_patch=(1, 2, 2), audio_patch=1, per_video_frame=2.0,
                                 head_dim=16, theta=10000.0)
  return xs, cond, angles, kv_valid


@pytest.mark.parametrize("single", [False, True])
def test_joint_attention_is_the_only_and_real_interaction(single):
  cfg = BlockConfig(hidden=32, heads=2, mlp_dim=64, eps=1e-6, dtype=jnp.float32)
  block = JointBlock(cfg, single, rngs=nnx.Rngs(0))
  _randomize(block)
  xs, cond, angles, kv_valid = _block_inputs()
  base = block(xs, cond, angles, kv_valid)

  bump = jax.random.normal(jax.random.key(9), (32,))  # not a constant: LayerNorm removes those

  def changed(segment, index):
    x2 = dict(xs)
    x2[segment] = xs[segment].at[:, index].add(bump)
    return block(x2, cond, angles, kv_valid)

  out = changed("audio", 2)
  assert float(jnp.max(jnp.abs(out["video"] - base["video"]))) > 1e-4
  out = changed("video", 4)
  assert float(jnp.max(jnp.abs(out["audio"] - base["audio"]))) > 1e-4
  # Text token 2 of row 0 is padding: nothing else may move.
  x2 = dict(xs)
  for seg in ("text_a", "text_v"):
    x2[seg] = xs[seg].at[0, 2].add(5.0 * bump)
  out = block(x2, cond, angles, kv_valid)
  for seg in ("audio", "video"):
    np.testing.assert_allclose(out[seg], base[seg], atol=1e-6)
  for seg in ("text_a", "text_v"):
    np.testing.assert_allclose(np.delete(np.asarray(out[seg][0]), 2, axis=0),
                               np.delete(np.asarray(base[seg][0]), 2, axis=0), atol=1e-6)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("mesh_shape", [None, (1, 1, 1, 1)])
def test_the_cpu_kernel_block_equals_the_xla_kernel_block(single, mesh_shape):
  # The 'cpu' kernel applies the QK norms (one scale per stream) and RoPE itself, also inside
  # shard_map under a mesh: the block's output and every param's gradient must not change.
  def output_and_grads(kernel):
    cfg = BlockConfig(hidden=32, heads=2, mlp_dim=64, eps=1e-6, dtype=jnp.float32,
                      attention_kernel=kernel)
    block = JointBlock(cfg, single, rngs=nnx.Rngs(0))
    _randomize(block)
    xs, cond, angles, kv_valid = _block_inputs()
    graph, params = nnx.split(block, nnx.Param)

    def loss(params):
      out = nnx.merge(graph, params)(xs, cond, angles, kv_valid)
      return sum(jnp.sum(jnp.sin(y)) for y in out.values())
    run = jax.jit(jax.value_and_grad(loss))
    mesh = mesh_shape and jax.make_mesh(mesh_shape, ("data", "fsdp", "context", "tensor"),
                                        axis_types=(jax.sharding.AxisType.Auto,) * 4,
                                        devices=jax.devices()[:1])
    with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
      # On one device the 'cpu' kernel takes each stream's QKV projection where it lies.
      assert ("jova_segment_attention_backward" in run.lower(params).as_text()) == (kernel == "cpu")
      return run(params)

  (want, want_grads), (got, got_grads) = output_and_grads("xla"), output_and_grads("cpu")
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  flat_want, flat_got = nnx.to_flat_state(want_grads), nnx.to_flat_state(got_grads)
  assert [path for path, _ in flat_want] == [path for path, _ in flat_got]
  for (path, w), (_, g) in zip(flat_want, flat_got):
    largest = float(jnp.max(jnp.abs(w[...])))
    assert largest > 0, path  # every param (the QK-norm scales too) gets a gradient
    # float32 sums in another order: errors relative to the array's largest entry.
    np.testing.assert_allclose(np.asarray(g[...]), np.asarray(w[...]), atol=1e-5 * largest,
                               rtol=0, err_msg=str(path))


def test_rope_scores_depend_only_on_relative_position():
  head_dim = 24
  k = jax.random.split(jax.random.key(0), 2)
  q = jax.random.normal(k[0], (1, 1, 1, head_dim))
  kk = jax.random.normal(k[1], (1, 1, 1, head_dim))

  def score(pq, pk):
    aq = emb.rope_angles(*[jnp.array([p], jnp.float32) for p in pq], head_dim, 10000.0)
    ak = emb.rope_angles(*[jnp.array([p], jnp.float32) for p in pk], head_dim, 10000.0)
    return float(jnp.sum(emb.apply_rope(q, aq) * emb.apply_rope(kk, ak)))

  s1 = score((1.0, 2.0, 3.0), (4.0, 0.0, 5.0))
  s2 = score((11.0, 7.0, 3.5), (14.0, 5.0, 5.5))  # same offsets (3, -2, 2)
  s3 = score((1.0, 2.0, 3.0), (5.0, 0.0, 5.0))    # different offset
  assert abs(s1 - s2) < 1e-4
  assert abs(s1 - s3) > 1e-3


def test_audio_and_video_at_the_same_instant_share_the_temporal_rotation():
  c = load("demo")
  per_frame = config_lib.audio_positions_per_video_frame(c)
  assert per_frame == pytest.approx(31.25 * 1 / 8.0)
  s = config_lib.latent_shapes(c)
  head_dim = c.model.hidden // c.model.heads
  grid = (s.video[0], s.video[1] // 2, s.video[2] // 2)
  angles = np.asarray(emb.joint_rope_angles(
      audio_tokens=s.audio_tokens, text_tokens=s.text_tokens, video_grid=grid,
      video_patch=(1, 2, 2), audio_patch=1, per_video_frame=per_frame, head_dim=head_dim,
      theta=10000.0))
  dt = config_lib.rope_split(head_dim)[0] // 2
  video_start = s.audio_tokens + 2 * s.text_tokens
  tokens_per_frame = grid[1] * grid[2]
  # 8 fps, 31.25 audio latents/s: audio latent 125 is at 4 s = video frame 32; use an instant
  # inside the clip: audio 0 <-> frame 0, and audio j <-> frame j / per_frame when integral.
  for frame in range(grid[0]):
    j = frame * per_frame
    if j != int(j) or int(j) >= s.audio_tokens:
      continue
    np.testing.assert_allclose(angles[int(j), :dt], angles[video_start + frame * tokens_per_frame, :dt],
                               atol=1e-5)
  # Exact check at a fractional instant: interpolate positions directly.
  pos = emb.audio_time_positions(s.audio_tokens, 1, per_frame)
  np.testing.assert_allclose(pos[25], 25 / per_frame)
  # Audio is rotated only on the time band; text not at all.
  assert np.all(angles[: s.audio_tokens, dt:] == 0)
  assert np.all(angles[s.audio_tokens:video_start] == 0)


def test_audio_video_same_instant_with_patches():
  # Wan-like layout: 4x temporal compression at 16 fps, MMAudio 31.25/s, audio patch 2.
  per_frame = 31.25 * 4 / 16.0
  pos = emb.audio_time_positions(10, 2, per_frame)
  # token 5 starts at audio latent 10 = 0.32 s = latent frame 10 / 7.8125 = 1.28
  assert pos[5] == pytest.approx(10 / per_frame)


def test_bad_configs_fail_at_construction_naming_the_keys():
  c = load("tiny")
  c.model.heads = 3
  with pytest.raises(config_lib.ConfigError, match=r"model.hidden=64 .*model.heads=3"):
    jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))
  c = load("tiny")
  c.model.update(hidden=16, heads=4)  # head_dim 4 < 6
  with pytest.raises(config_lib.ConfigError, match="head_dim=4 "):
    jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))
  c = load("tiny")
  c.model.video_patch = (1, 3, 3)
  with pytest.raises(config_lib.ConfigError, match=r"video_patch=\(1, 3, 3\)"):
    jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))
  c = load("tiny")
  with pytest.raises(config_lib.ConfigError, match="mesh tensor=8"):
    config_lib.validate(c, {"data": 1, "fsdp": 1, "context": 1, "tensor": 8})
  c = load("tiny")
  c.model.remat = "sometimes"
  with pytest.raises(ValueError, match="model.remat='sometimes'"):
    jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))


def test_audio_tower_copied_from_video_tower():
  model = jova.JoVA(config_lib.model_spec(load("tiny")), rngs=nnx.Rngs(0))
  copied = jova.copy_video_tower_to_audio(model)
  assert "dual_blocks/audio/qkv/kernel" in copied and "single_blocks/audio/fc1/kernel" in copied
  np.testing.assert_array_equal(model.dual_blocks.audio.qkv.kernel[...],
                                model.dual_blocks.video.qkv.kernel[...])
  np.testing.assert_array_equal(model.dual_blocks.text_a.out.kernel[...],
                                model.dual_blocks.text_v.out.kernel[...])
  np.testing.assert_array_equal(model.sigma_audio.fc1.kernel[...], model.sigma_video.fc1.kernel[...])
  # Input projections differ in shape (video patch vs audio frame): left alone.
  assert "audio_in/kernel" not in copied


def test_every_param_has_logical_axes_from_the_table():
  from jova_jax.parallel import rules
  model = jova.JoVA(config_lib.model_spec(load("tiny")), rngs=nnx.Rngs(0))
  axes = jova.param_logical_axes(model)
  for names in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)):
    rules.logical_to_spec(names)  # raises on a name missing from the table
  assert model.dual_blocks.video.qkv.kernel.shape[0] == 1  # stacked: layers axis first


def _count_by_formula(c):
  """Independent count: per stream 4h^2 + 2h*mlp (+biases) + adaLN 6h^2 + norms."""
  m = c.model
  h, mlp, d = m.hidden, int(m.hidden * m.mlp_ratio), m.hidden // m.heads
  stream = (h * 3 * h + 3 * h) + (h * h + h) + (h * mlp + mlp) + (mlp * h + h) + (h * 6 * h + 6 * h) + 2 * d
  blocks = stream * (4 * m.dual_blocks + 2 * m.single_blocks)
  s = config_lib.latent_shapes(c)
  t, _, _, cv = s.video
  ca = s.audio[1]
  p = int(np.prod(m.video_patch))
  cin = cv * 2 + m.i2v_mask_channels
  embed = (p * cin * h + h) + (ca * h + h)
  text = 2 * ((c.text.width * h + h) + (h * h + h)) + c.text.width
  sigma = 2 * ((m.freq_dim * h + h) + (h * h + h))
  final = (h * 2 * h + 2 * h) + (h * p * cv + p * cv) + (h * 2 * h + 2 * h) + (h * ca + ca)
  return blocks + embed + text + sigma + final


def test_jova_24b_summary_is_abstract_and_counts_right(capsys):
  c = load("jova_24b")
  start = time.perf_counter()
  table = summary.param_table(c)
  assert sum(table.values()) == _count_by_formula(c)
  assert 24e9 < sum(table.values()) < 25e9  # two ~12B Waver towers
  print(summary.format_summary(c), f"\n{time.perf_counter() - start:.1f}s")
  assert "24.57 B" in capsys.readouterr().out


def test_flop_formula_matches_xla_cost_analysis(monkeypatch):
  c = load("tiny")  # one block of each kind: XLA counts a scanned loop body once
  # XLA counts no FLOPs in a custom call: XLA's attention, and its dots for the text streams.
  c.parallel.attention_kernel = "xla"
  monkeypatch.setattr(dense_rows_cpu, "applies", lambda *args: False)
  model = jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))
  s = config_lib.latent_shapes(c)
  args = (jnp.zeros((1,) + s.video), jnp.zeros((1,) + s.audio),
          jnp.zeros((1, s.text_tokens, c.text.width)), jnp.ones((1, s.text_tokens), bool),
          jnp.ones((1,)), jnp.ones((1,)))
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).lower(state, *args).compile()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  ours = summary.forward_flops(config_lib.model_spec(c), batch=1)
  # XLA also counts elementwise ops (norms, RoPE, softmax); matmuls dominate.
  assert 0.8 < ours / xla["flops"] < 1.05, (ours, xla["flops"])


def test_layer_norm_equals_the_textbook_formula_and_its_gradient():
  """layers.layer_norm takes the mean as a product (so XLA writes the residual stream out once);
  values and gradients equal the reduction formula."""
  from jova_jax.model.layers import layer_norm

  def reference(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  x = jax.random.normal(jax.random.key(3), (2, 7, 48)) * 3.0 + 1.5
  w = jax.random.normal(jax.random.key(4), x.shape)
  np.testing.assert_allclose(layer_norm(x, 1e-6), reference(x), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda x: jnp.sum(f(x, 1e-6) * w))(x) for f in (layer_norm, reference)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)
