"""Joint attention: every context strategy and kernel against the dense float32 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jova_jax.model import attention, attention_kernels
from jova_jax.model.attention import attention_flops, joint_attention, reference_attention
from jova_jax.model.embeddings import apply_rope
from jova_jax.model.layers import rms_norm

AXES = ("data", "fsdp", "context", "tensor")
TOL = 1e-5
LENGTH = 37  # not a multiple of 2, 4, 8 or of the chunk


def make_mesh(shape):
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 4)


def make_inputs(batch=4, length=LENGTH, heads=8, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
             for _ in range(3))
  valid = np.ones((batch, length), bool)
  for row in range(batch):  # text padding: an invalid run in the middle, different per row
    start = 2 + 5 * row
    valid[row, start:start + 3 + row] = False
  valid[-1, -4:] = False
  return q, k, v, jnp.asarray(valid)


def output_and_grads(fn, q, k, v, valid):
  """fn's output and d(weighted sum of output)/d(q, k, v); the weights make every row count differently."""
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape).astype(q.dtype)
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, valid), q, k, v)
  return out, vjp(weights)


def assert_matches_reference(fn, inputs, mesh=None, atol=TOL, reference=reference_attention):
  expected = jax.jit(lambda *a: output_and_grads(reference, *a))(*inputs)
  run = jax.jit(lambda *a: output_and_grads(fn, *a))
  if mesh is None:
    found = run(*inputs)
  else:
    with jax.set_mesh(mesh):
      found = run(*inputs)
  names = ("output", "dq", "dk", "dv")
  for name, want, got in zip(names, (expected[0], *expected[1]), (found[0], *found[1])):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol, rtol=0, err_msg=name)


# (mesh shape, batch): context 2 also shards batch over fsdp and heads over tensor; on context 4 the
# batch of 3 does not divide data=2, so it is replicated there.
MESHES = {"ctx2_fsdp2_tp2": ((1, 2, 2, 2), 4), "ctx4_data2_batch3": ((2, 1, 4, 1), 3),
          "ctx8": ((1, 1, 8, 1), 4)}
COLLECTIVE = {"all_gather": "all_gather", "ulysses": "all_to_all", "ring": "collective_permute"}


@pytest.mark.parametrize("kernel", ["xla", "chunked", "cpu"])
@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_strategy_matches_reference(mesh_name, strategy, kernel):
  shape, batch = MESHES[mesh_name]
  mesh = make_mesh(shape)
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy=strategy, kernel=kernel, chunk=5)
  inputs = make_inputs(batch=batch)
  assert_matches_reference(fn, inputs, mesh)
  with jax.set_mesh(mesh):  # the strategy really partitioned (no silent fallback to the local kernel)
    lowered = jax.jit(fn).lower(*inputs).as_text()
  assert COLLECTIVE[strategy] in lowered


@pytest.mark.parametrize("strategy", ["none", "ring"])
def test_chunked_backward_in_bfloat16(strategy):
  """The custom VJP casts to bfloat16 only as matmul inputs, accumulating in float32 like the forward."""
  q, k, v, valid = make_inputs(batch=2, heads=2)
  inputs = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), valid)
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy=strategy, kernel="chunked", chunk=4)
  assert_matches_reference(fn, inputs, make_mesh((1, 2, 4, 1)), atol=0.02)  # ~2 bfloat16 ulps at |x| <= 1.7


@pytest.mark.parametrize("kernel", ["xla", "cpu"])
def test_none_strategy_under_mesh_matches_reference(kernel):
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy="none", kernel=kernel)
  assert_matches_reference(fn, make_inputs(), make_mesh((1, 2, 2, 2)))


def rope_angles_for(q, seed=1):
  """(L, D/2) angles spread over several turns, different for every position and channel pair."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-7, 7, (q.shape[1], q.shape[-1] // 2)), jnp.float32)


def qk_norm_for(q, segments=3, seed=3):
  """QK norms with `segments` runs of rows, each with its own scales."""
  rng = np.random.default_rng(seed)
  length, dim = q.shape[1], q.shape[-1]
  segment = jnp.asarray(np.arange(length) * segments // length, jnp.int32)
  q_scales, k_scales = (jnp.asarray(rng.uniform(0.5, 1.5, (segments, dim)), jnp.float32)
                        for _ in range(2))
  return attention.QKNorm(segment, q_scales, k_scales, 1e-6)


def prepared_reference(qk_norm, q_angles, k_angles=None):
  """The dense reference on q and k normalised by rms_norm and rotated by apply_rope."""
  k_angles = q_angles if k_angles is None else k_angles
  rows = lambda scales, segment: scales[segment][None, :, None, :]

  def reference(q, k, v, valid):
    if qk_norm is not None:
      q = rms_norm(q, rows(qk_norm.q_scales, qk_norm.segment[:q.shape[1]]), qk_norm.eps)
      k = rms_norm(k, rows(qk_norm.k_scales, qk_norm.segment), qk_norm.eps)
    return reference_attention(apply_rope(q, q_angles), apply_rope(k, k_angles), v, valid)
  return reference


# The 'cpu' kernel normalises and rotates q and k itself where the sequence is whole (no mesh,
# or strategy 'none' under one); everywhere else joint_attention does before the kernel.
@pytest.mark.parametrize("kernel,strategy,mesh_shape", [
    ("cpu", "none", None), ("cpu", "none", (1, 2, 2, 2)), ("cpu", "all_gather", (1, 2, 2, 2)),
    ("xla", "none", None), ("chunked", "ring", (1, 1, 8, 1)), ("xla", "ulysses", (1, 2, 2, 2))])
def test_qk_norm_and_rope_match_applying_them_first(kernel, strategy, mesh_shape, monkeypatch):
  inputs = make_inputs()
  angles, qk_norm = rope_angles_for(inputs[0]), qk_norm_for(inputs[0])
  if kernel == "cpu" and strategy == "none":  # the kernel's own norm and rotation, not these
    monkeypatch.setattr(attention, "apply_rope", None)
    monkeypatch.setattr(attention.QKNorm, "apply", None)
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, qk_norm=qk_norm, rope=angles,
                                              strategy=strategy, kernel=kernel, chunk=5)
  assert_matches_reference(fn, inputs, make_mesh(mesh_shape) if mesh_shape else None,
                           reference=prepared_reference(qk_norm, angles))


def test_context_size_one_falls_back_to_local_kernel():
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy="ring", kernel="chunked", chunk=8)
  assert_matches_reference(fn, make_inputs(), make_mesh((1, 8, 1, 1)))


@pytest.mark.parametrize("chunk", [6, 16])
def test_chunked_kernel_with_chunk_smaller_than_length(chunk):
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, kernel="chunked", chunk=chunk)
  assert_matches_reference(fn, make_inputs(batch=2, heads=2))


def test_chunked_kernel_rejects_keys_not_tiled_by_chunk():
  q, k, v, valid = make_inputs(batch=1, heads=1)
  with pytest.raises(ValueError, match="key length 37 is not a multiple of the chunk 5"):
    attention_kernels.chunked_attention(q, k, v, valid, chunk=5)


def test_splash_kernel_in_interpret_mode_matches_reference():
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, kernel="splash")
  assert_matches_reference(fn, make_inputs(batch=2, heads=2))


def test_splash_at_context_1_runs_per_shard(monkeypatch):
  """data=2 x fsdp=2 x tensor=2, context=1: splash sees one sample and one head per device, not the
  whole gathered batch (a Pallas call left to XLA's partitioner would be)."""
  shapes = []

  def recording_splash(q, k, v, kv_valid):
    shapes.append(q.shape)
    return splash(q, k, v, kv_valid)

  splash = attention_kernels.splash_attention
  monkeypatch.setattr(attention_kernels, "splash_attention", recording_splash)
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy="ring", kernel="splash")
  assert_matches_reference(fn, make_inputs(batch=4, heads=2), make_mesh((2, 2, 1, 2)))
  assert shapes and set(shapes) == {(1, 128, 1, 8)}  # 37 tokens padded to one 128 tile


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses"])
def test_splash_kernel_inside_shard_map(strategy):
  # batch 1 on fsdp=2 is replicated: checks the gradients of replicated inputs without the vma check.
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy=strategy, kernel="splash")
  assert_matches_reference(fn, make_inputs(batch=1, heads=2), make_mesh((1, 2, 2, 1)))


def test_ring_with_splash_kernel_folds_chunked_blocks():
  fn = lambda q, k, v, valid: joint_attention(q, k, v, valid, strategy="ring", kernel="splash", chunk=8)
  assert_matches_reference(fn, make_inputs(batch=2, heads=2), make_mesh((1, 1, 2, 4)))


def test_ulysses_needs_heads_divisible_by_context():
  q, k, v, valid = make_inputs(heads=4)
  fn = lambda *a: joint_attention(*a, strategy="ulysses", kernel="xla")
  with jax.set_mesh(make_mesh((1, 1, 8, 1))):
    with pytest.raises(ValueError, match=r"heads=4 .* context size 8"):
      jax.jit(fn).lower(q, k, v, valid)


def test_unknown_names_are_rejected():
  q, k, v, valid = make_inputs(batch=1, heads=1)
  with pytest.raises(ValueError, match="parallel.context_strategy"):
    joint_attention(q, k, v, valid, strategy="tree")
  with pytest.raises(ValueError, match="parallel.attention_kernel"):
    joint_attention(q, k, v, valid, kernel="flash")


def test_cudnn_kernel_needs_half_precision():
  q, k, v, valid = make_inputs(batch=1, heads=1)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    joint_attention(q, k, v, valid, kernel="cudnn")


def test_attention_flops():
  assert attention_flops(2, 10, 3, 4) == 4 * 2 * 10 * 10 * 3 * 4
