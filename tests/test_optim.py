"""Gradient accumulation, the weight-decay mask and the learning-rate schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax.training import optim, state as train_state, steps as train_steps
from tests.conftest import load


def _loss(params, batch, key):
  noise = jax.random.normal(key, ())  # key-dependent, like the flow-matching noise
  err = batch["x"] @ params["w"] - batch["y"]
  return jnp.mean(err ** 2) * (1.0 + 0.1 * noise), {"loss": jnp.mean(err ** 2)}


def test_accumulated_grads_average_interleaved_micro_batches():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k[0], (3,))}
  batch = {"x": jax.random.normal(k[1], (8, 3)), "y": jax.random.normal(k[2], (8,))}
  key = jax.random.key(5)
  (loss, metrics), grads = jax.jit(
      lambda p, b: train_steps.accumulated_grads(_loss, p, b, key, 4))(params, batch)
  # Independent reference: micro-batch i = rows i::4 with key fold_in(key, i), then the mean.
  refs = [jax.value_and_grad(_loss, has_aux=True)(
      params, {n: v[i::4] for n, v in batch.items()}, jax.random.fold_in(key, i)) for i in range(4)]
  np.testing.assert_allclose(grads["w"], np.mean([r[1]["w"] for r in refs], 0), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean([r[0][0] for r in refs]), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], np.mean([r[0][1]["loss"] for r in refs]), rtol=1e-5)


def test_one_micro_batch_is_the_plain_gradient():
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  batch = {"x": jnp.eye(3), "y": jnp.zeros(3)}
  key = jax.random.key(1)
  _, grads = train_steps.accumulated_grads(_loss, params, batch, key, 1)
  _, ref = jax.value_and_grad(_loss, has_aux=True)(params, batch, key)
  np.testing.assert_array_equal(grads["w"], ref["w"])


def test_decay_mask_spares_biases_norms_and_embeddings():
  params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)},
            "null_text": jnp.ones(4), "stacked": {"kernel": jnp.ones((3, 2, 2))}}
  mask = optim.decay_mask(params)
  assert mask == {"fc": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "null_text": False, "stacked": {"kernel": True}}


def test_decay_mask_spares_scanned_blocks_norm_scales_and_biases():
  """The model's own params: stacked (scanned) blocks make QK-norm scales and biases 2-D."""
  from jova_jax.model import sharded
  _, params, _ = sharded.split_abstract(load("tiny"))
  mask = optim.decay_mask(params)
  stream = mask["dual_blocks"]["video"]
  assert params["dual_blocks"]["video"]["q_norm"]["scale"].ndim == 2
  assert not stream["q_norm"]["scale"] and not stream["k_norm"]["scale"]
  assert not stream["qkv"]["bias"] and stream["qkv"]["kernel"] and stream["fc1"]["kernel"]
  assert not mask["null_text"] and mask["video_in"]["kernel"]


def test_logged_lr_is_the_applied_one_after_a_skipped_step():
  """A non-finite step applies nothing, so the schedule must not advance for it."""
  from jova_jax.parallel import mesh as mesh_lib
  c = load("tiny")
  c.train.update(lr=1.0, warmup_steps=10, batch_size=1)
  c.mesh.update(data=1, fsdp=1, context=1, tensor=1)
  program = train_state.build_program(c, mesh_lib.make_mesh(c, devices=jax.devices()[:1]))
  state = train_state.init_state(program)
  step = jax.jit(train_steps.make_train_step(program))
  batch = {k: jnp.zeros(x.shape, x.dtype) for k, x in program.abstract_batch().items()}
  bad = dict(batch, video=jnp.full_like(batch["video"], jnp.nan))
  lrs = []
  for b in (batch, bad, batch):
    state, metrics = step(state, b)
    lrs.append(float(metrics["lr"]))
  assert int(metrics["nonfinite"]) == 0 and int(state["step"]) == 3
  # Trainer steps 0, 1 (skipped), 2 apply the schedule's steps 0, 1, 1.
  assert lrs == pytest.approx([0.0, 0.1, 0.1])


def test_learning_rate_warms_up_then_decays():
  c = load("tiny")
  c.train.update(lr=1.0, warmup_steps=10, steps=110, schedule="cosine", min_lr_ratio=0.1)
  lr = optim.learning_rate(c)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine to 0.1
  assert float(lr(110)) == pytest.approx(0.1, abs=1e-3)
  c.train.schedule = "constant"
  assert float(optim.learning_rate(c)(100)) == pytest.approx(1.0)


def _optax_step(tx, params, opt_state, ema, grads, decay):
  """The reference: make_optimizer's optax chain, apply_updates, then the EMA."""
  import optax
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, jax.tree.map(
      lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


@pytest.mark.parametrize("clip_norm,mu_dtype", [(0.0, "params"), (1.0, "params"),
                                                (1.0, "bfloat16")])
@pytest.mark.parametrize("fused_cpu", [False, True], ids=["xla", "cpu_kernel"])
def test_fused_update_equals_optax_adamw_then_the_ema(clip_norm, mu_dtype, fused_cpu):
  import optax
  c = load("tiny")
  c.train.update(lr=1e-2, warmup_steps=2, clip_norm=clip_norm, weight_decay=0.1,
                 mu_dtype=mu_dtype)
  k = jax.random.split(jax.random.key(0), 3)
  params = {"fc": {"kernel": jax.random.normal(k[0], (4, 5)),
                   "bias": jax.random.normal(k[1], (5,))},
            "norm": {"scale": jnp.ones(5)}}
  tx = optim.make_optimizer(c)
  fused = jax.jit(lambda p, s, e, g, d: optim.adamw_ema_update(
      c, s, p, e, g, optax.tree.norm(g), jnp.bool_(True), d, fused_cpu))
  ref, ours = (params, tx.init(params), params), (params, tx.init(params), params)
  for i in range(6):  # gradients alternately under and over the clip norm
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(k[2], i), x.shape)
                         * (3.0 if i % 2 else 0.1), params)
    ref = jax.jit(lambda p, s, e, g, d: _optax_step(tx, p, s, e, g, d))(*ref, grads, 0.9)
    ours = fused(*ours, grads, jnp.float32(0.9))
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-9)
  adam = optim.adam_state(ours[1])
  assert int(adam.count) == 6
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {
      jnp.dtype(jnp.float32 if mu_dtype == "params" else mu_dtype)}


@pytest.mark.parametrize("mu_dtype", ["params", "bfloat16"])
@pytest.mark.parametrize("fused_cpu", [False, True], ids=["xla", "cpu_kernel"])
def test_a_skipped_update_leaves_every_value_bit_for_bit(fused_cpu, mu_dtype):
  """Non-finite gradients, also on the very first step (count 0: no bias correction to divide
  by), change neither params, moments, EMA nor the counts."""
  import optax
  c = load("tiny")
  c.train.update(lr=1e-2, warmup_steps=0, clip_norm=1.0, weight_decay=0.1, mu_dtype=mu_dtype)
  params = {"fc": {"kernel": jnp.arange(6.0).reshape(2, 3) - 2.5, "bias": jnp.ones(3)}}
  tx = optim.make_optimizer(c)
  update = jax.jit(lambda p, s, e, g, ok: optim.adamw_ema_update(
      c, s, p, e, g, optax.tree.norm(g), ok, jnp.float32(0.9), fused_cpu))
  ema = jax.tree.map(lambda x: x * 0.5, params)
  state = (params, tx.init(params), ema)
  bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
  for before in (state, update(*state, jax.tree.map(jnp.ones_like, params), jnp.bool_(True))):
    after = update(*before, bad, jnp.bool_(False))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
      np.testing.assert_array_equal(a, b)

