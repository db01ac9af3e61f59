"""The C++ CPU attention kernel (kernels/attention_cpu): equal to the dense float32 reference in its
output and gradients, what 'auto' picks on CPU in float32 only, and a missing compiler falls back to
the 'xla' kernel. Its sharded use (inside shard_map, per strategy) is in test_attention.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax.kernels import attention_cpu
from jova_jax.model import attention_kernels
from jova_jax.model.attention import joint_attention
from tests.conftest import assert_falls_back_without_a_compiler
from tests.test_attention import (assert_matches_reference, make_inputs, make_mesh,
                                  prepared_reference, qk_norm_for, rope_angles_for)


def test_the_kernel_builds_here():
  assert attention_cpu.available()  # CI has a compiler: the rest of this file must not skip it


@pytest.fixture(params=["saved", "recomputed"])
def probabilities(request, monkeypatch):
  """Both backwards: reading the forward's saved probabilities, and recomputing them from the row
  log-sum-exp, as calls beyond SAVED_PROBABILITIES_BYTES do."""
  if request.param == "recomputed":
    monkeypatch.setattr(attention_cpu, "SAVED_PROBABILITIES_BYTES", 0)
  return request.param


def test_probabilities_are_saved_up_to_the_limit(monkeypatch):
  # 2 examples, 3 heads, 13 queries, 37 keys (rounded up to 48).
  assert attention_cpu.saved_probabilities_shape(2, 3, 13, 37) == (2, 3, 13, 48)
  monkeypatch.setattr(attention_cpu, "SAVED_PROBABILITIES_BYTES", 4 * 2 * 3 * 13 * 48 - 1)
  assert attention_cpu.saved_probabilities_shape(2, 3, 13, 37) == (0,)


@pytest.mark.parametrize("length,head_dim", [(150, 48), (37, 8), (70, 20)])
def test_output_and_gradients_match_the_reference(length, head_dim, probabilities):
  # 150 rows: two full 64-row query blocks and a tail; 8 and 20: head dims not a multiple of the
  # 16 lanes; 37 and 70 keys: a partial last vector of keys.
  inputs = make_inputs(batch=2, length=length, heads=3, head_dim=head_dim)
  assert_matches_reference(attention_cpu.attention, inputs)


def test_fewer_queries_than_keys(probabilities):
  # all_gather context parallelism keeps the queries local: Lq != Lk.
  q, k, v, valid = make_inputs(batch=2, length=40, heads=2, head_dim=16)
  assert_matches_reference(attention_cpu.attention, (q[:, :13], k, v, valid))


@pytest.mark.parametrize("queries", [70, 13])
@pytest.mark.parametrize("with_norm", [False, True])
def test_norm_and_rope_inside_the_kernel_match_applying_them_first(queries, with_norm,
                                                                    probabilities):
  # Different angles for queries and keys (Lq < Lk as under all_gather), a head dim of 20 (its
  # pairs straddle the 16 lanes), the dense reference fed q and k normalised and rotated first;
  # the gradients also with respect to the norms' scales.
  q, k, v, valid = make_inputs(batch=2, length=70, heads=3, head_dim=20)
  q = q[:, :queries] * 3.0  # rms far from 1: the norm matters
  q_angles, k_angles = rope_angles_for(q, seed=1), rope_angles_for(k, seed=2)
  qk_norm = qk_norm_for(k) if with_norm else None
  scales = (qk_norm.q_scales, qk_norm.k_scales) if with_norm else ()

  def by_kernel(q, k, v, *scales):
    norm = (qk_norm.segment[:queries], scales[0], qk_norm.segment, scales[1], qk_norm.eps) \
        if with_norm else None
    return attention_cpu.attention(q, k, v, valid, rope=(q_angles, k_angles), norm=norm)

  def by_reference(q, k, v, *scales):
    norm = qk_norm._replace(q_scales=scales[0], k_scales=scales[1]) if with_norm else None
    return prepared_reference(norm, q_angles, k_angles)(q, k, v, valid)

  def value_and_grads(attend):
    def loss(*args):
      out = attend(*args)
      return jnp.sum(jnp.sin(out) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(3 + len(scales)))))(q, k, v, *scales)

  want, got = value_and_grads(by_reference), value_and_grads(by_kernel)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for index, (w, g) in enumerate(zip(want[1], got[1])):  # q, k, v, then the scales
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * float(jnp.max(jnp.abs(w))),
                               err_msg=f"gradient {index}")


@pytest.mark.parametrize("with_norm", [False, True])
def test_segments_given_apart_match_the_reference_on_the_joined_sequence(with_norm, probabilities):
  """segment_attention reads each segment's QKV projection and adds its bias itself: equal to the
  dense reference on the joined, biased q, k, v, with the gradients of every segment's projection,
  bias and norm scales, where a padding row (its key masked) comes out 0: self-attention, whose
  padding rows the kernel skips. Segments of 5, 37 and 28 rows: a segment shorter than a vector,
  one that straddles a 64-row query block, the keys' partial last vector."""
  rng = np.random.default_rng(7)
  lengths, batch, heads, dim = (5, 37, 28), 2, 3, 20
  qkv = tuple(jnp.asarray(rng.standard_normal((batch, n, 3, heads, dim)) * 2, jnp.float32)
              for n in lengths)
  bias = tuple(jnp.asarray(rng.standard_normal((3, heads, dim)), jnp.float32) for _ in lengths)
  _, _, _, valid = make_inputs(batch=batch, length=sum(lengths), heads=heads, head_dim=dim)
  assert not valid.all(axis=1).any()  # every example has padding rows to skip
  angles = rope_angles_for(jnp.zeros((1, sum(lengths), 1, dim)), seed=4)
  segment = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths), jnp.int32)
  qk_norm = qk_norm_for(jnp.zeros((1, sum(lengths), 1, dim)), segments=len(lengths))
  qk_norm = qk_norm._replace(segment=segment)
  scales = (qk_norm.q_scales, qk_norm.k_scales) if with_norm else ()

  def by_kernel(qkv, bias, *scales):
    norm = (segment, scales[0], segment, scales[1], qk_norm.eps) if with_norm else None
    return jnp.concatenate(attention_cpu.segment_attention(qkv, bias, valid, rope=angles, norm=norm),
                           axis=1)

  def by_reference(qkv, bias, *scales):
    joined = jnp.concatenate([x + b for x, b in zip(qkv, bias)], axis=1)
    norm = qk_norm._replace(q_scales=scales[0], k_scales=scales[1]) if with_norm else None
    out = prepared_reference(norm, angles)(joined[:, :, 0], joined[:, :, 1], joined[:, :, 2], valid)
    return jnp.where(valid[:, :, None, None], out, 0.0)

  def value_and_grads(attend):
    def loss(*args):
      out = attend(*args)
      return jnp.sum(jnp.sin(out) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(2 + len(scales)))))(qkv, bias, *scales)

  want, got = value_and_grads(by_reference), value_and_grads(by_kernel)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for index, (w, g) in enumerate(zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1]))):
    assert g.shape == w.shape, index
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * float(jnp.max(jnp.abs(w))),
                               err_msg=f"gradient {index}")


def test_segments_of_mismatched_shapes_are_refused():
  qkv = (jnp.zeros((1, 4, 3, 2, 8)), jnp.zeros((1, 6, 3, 2, 6)))
  bias = (jnp.zeros((3, 2, 8)), jnp.zeros((3, 2, 6)))
  with pytest.raises(ValueError, match=r"one B, H, D.*found \(1, 6, 3, 2, 6\)"):
    attention_cpu.segment_attention(qkv, bias, jnp.ones((1, 10), bool))


def test_norm_tables_of_the_wrong_shape_are_refused():
  q, k, v, valid = make_inputs(batch=1, length=10, heads=1, head_dim=8)
  segment = jnp.zeros((10,), jnp.int32)
  with pytest.raises(ValueError, match=r"k norm needs a segment per row \(10,\) and scales "
                                       r"\(S, D = 8\), found \(10,\) and \(2, 6\)"):
    attention_cpu.attention(q, k, v, valid, norm=(segment, jnp.ones((2, 8)), segment,
                                                  jnp.ones((2, 6)), 1e-6))


def test_rope_angles_of_the_wrong_shape_are_refused():
  q, k, v, valid = make_inputs(batch=1, length=10, heads=1, head_dim=8)
  with pytest.raises(ValueError, match=r"\(Lq, D/2\) = \(10, 4\).*found \(10, 3\)"):
    attention_cpu.attention(q, k, v, valid, rope=(jnp.zeros((10, 3)), jnp.zeros((10, 4))))


def test_an_example_without_valid_keys_is_uniform_like_the_xla_kernel():
  q, k, v, valid = make_inputs(batch=2, length=20, heads=2, head_dim=8)
  valid = valid.at[1].set(False)
  out = jax.jit(attention_cpu.attention)(q, k, v, valid)
  np.testing.assert_allclose(np.asarray(out[1]), np.broadcast_to(v[1].mean(0), out[1].shape),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(attention_kernels.xla_attention(q, k, v, valid)),
                             atol=1e-5)


def test_vmap_runs_the_kernel_per_member():
  q, k, v, valid = make_inputs(batch=2, length=24, heads=2, head_dim=8)
  stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v, valid)]
  out = jax.vmap(attention_cpu.attention)(*stacked)
  np.testing.assert_allclose(np.asarray(out[1]),
                             np.asarray(attention_kernels.xla_attention(*[x[1] for x in stacked])),
                             atol=1e-5)


def test_auto_picks_the_kernel_on_one_cpu_device_in_float32_only():
  assert attention_kernels.resolve_kernel("auto", jnp.float32) == "cpu"
  assert attention_kernels.resolve_kernel("auto", jnp.bfloat16) == "xla"
  with jax.set_mesh(make_mesh((1, 1, 1, 1))):
    assert attention_kernels.resolve_kernel("auto", jnp.float32) == "cpu"
  with jax.set_mesh(make_mesh((1, 2, 2, 2))):  # the fake devices keep the XLA kernel
    assert attention_kernels.resolve_kernel("auto", jnp.float32) == "xla"


def test_on_a_one_device_mesh_the_kernel_runs_without_shard_map_or_all_reduces():
  """A shard_map over one device would add no-op all-reduces of dq, dk and dv to the backward."""
  inputs = make_inputs(batch=2, length=37, heads=3, head_dim=8)
  mesh = make_mesh((1, 1, 1, 1))
  kernel = lambda *a: joint_attention(*a, kernel="cpu")  # noqa: E731
  assert_matches_reference(kernel, inputs, mesh=mesh)
  with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(kernel(*a) ** 2), argnums=(0, 1, 2)))
    program = grads.lower(*inputs).compile().as_text()
  assert "jova_attention" in program and "all-reduce" not in program


def test_half_precision_is_refused_with_the_config_key():
  q, k, v, valid = make_inputs(batch=1, heads=1)
  with pytest.raises(ValueError, match="attention_kernel='cpu' needs model.compute_dtype float32"):
    joint_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), valid,
                    kernel="cpu")


def test_without_a_compiler_auto_keeps_the_xla_kernel_and_says_why(tmp_path):
  code = ("import jax.numpy as jnp; from jova_jax.model import attention_kernels as k; "
          "print('auto ->', k.resolve_kernel('auto', jnp.float32))")
  assert_falls_back_without_a_compiler(
      code, tmp_path, "auto -> xla", "CPU attention kernel unavailable, using the 'xla' attention kernel")
