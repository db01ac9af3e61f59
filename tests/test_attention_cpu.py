"""The C++ CPU attention kernel (kernels/attention_cpu): equal to the dense float32 reference in its
output and gradients, what 'auto' picks on CPU in float32 only, and a missing compiler falls back to
the 'xla' kernel. Its sharded use (inside shard_map, per strategy) is in test_attention.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax.kernels import attention_cpu
from jova_jax.model import attention_kernels
from jova_jax.model.attention import joint_attention, reference_attention
from jova_jax.model.embeddings import apply_rope
from tests.conftest import assert_falls_back_without_a_compiler
from tests.test_attention import assert_matches_reference, make_inputs, make_mesh, rope_angles_for


def test_the_kernel_builds_here():
  assert attention_cpu.available()  # CI has a compiler: the rest of this file must not skip it


@pytest.mark.parametrize("length,head_dim", [(150, 48), (37, 8), (70, 20)])
def test_output_and_gradients_match_the_reference(length, head_dim):
  # 150 rows: two full 64-row query blocks and a tail; 8 and 20: head dims not a multiple of the
  # 16 lanes; 37 and 70 keys: a partial last vector of keys.
  inputs = make_inputs(batch=2, length=length, heads=3, head_dim=head_dim)
  assert_matches_reference(attention_cpu.attention, inputs)


def test_fewer_queries_than_keys():
  # all_gather context parallelism keeps the queries local: Lq != Lk.
  q, k, v, valid = make_inputs(batch=2, length=40, heads=2, head_dim=16)
  assert_matches_reference(attention_cpu.attention, (q[:, :13], k, v, valid))


@pytest.mark.parametrize("queries", [70, 13])
def test_rope_inside_the_kernel_matches_rotating_first(queries):
  # Different angles for queries and keys (Lq < Lk as under all_gather), a head dim of 20 (its
  # pairs straddle the 16 lanes), the dense reference fed apply_rope's rotated q and k.
  q, k, v, valid = make_inputs(batch=2, length=70, heads=3, head_dim=20)
  q = q[:, :queries]
  q_angles, k_angles = rope_angles_for(q, seed=1), rope_angles_for(k, seed=2)
  reference = lambda q, k, v, valid: reference_attention(apply_rope(q, q_angles),
                                                         apply_rope(k, k_angles), v, valid)
  assert_matches_reference(lambda *a: attention_cpu.attention(*a, rope=(q_angles, k_angles)),
                           (q, k, v, valid), reference=reference)


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
