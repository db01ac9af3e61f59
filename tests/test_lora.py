"""LoRA and frozen-subset fine-tuning: the model with fresh adapters equals its base,
merged equals unmerged, training moves only what train.trainable / LoRA allows, the optimizer
holds only adapter leaves, and a sharded LoRA step equals the single-device one.
(The train -> LoRA -> sample -> merge path on a dataset: tests/test_lora_e2e.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jova_jax import config_lib
from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.model import lora, sharded
from jova_jax.model.jova import JoVA
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import finetune, state as train_state, steps as train_steps
from tests.conftest import load


def lora_config(rank=4, targets=("qkv", "out", "mlp", "embedders"), **train):
  c = load("tiny")
  c.model.lora.update(rank=rank, alpha=8.0, targets=targets)
  c.train.update(**train)
  return c


def config_without_lora(config):
  c = config.copy_and_resolve_references()
  c.model.lora.rank = 0
  return c


def _inputs(config, seed=0):
  batch = SyntheticIterator(config, seed=seed).batch(0)
  b = 2
  sig = jnp.asarray([0.3, 0.8], jnp.float32)
  args = (batch["video"][:b], batch["audio"][:b], batch["text"][:b], batch["text_mask"][:b],
          sig, sig)
  return args, dict(first_frame=batch["video"][:b, 0], use_first_frame=jnp.asarray([True, False]))


def _forward(config, params, args, kwargs):
  graphdef, _, _ = sharded.split_abstract(config)
  return jax.jit(lambda p: sharded.apply(graphdef, p, *args, **kwargs))(params)


def _params(config, seed=0):
  """Fresh params, every leaf but the adapters' B moved off its init (the zero-initialised
  adaLN gates and output layers would hide any difference in the outputs)."""
  flat = finetune.flatten(jax.jit(lambda: nnx.to_pure_dict(
      nnx.state(JoVA(config_lib.model_spec(config), rngs=nnx.Rngs(params=seed)), nnx.Param)))())
  keys = iter(jax.random.split(jax.random.key(seed + 100), len(flat)))
  return finetune.unflatten({k: v if k.endswith("lora/b") else
                             v + 0.05 * jax.random.normal(next(keys), v.shape)
                             for k, v in flat.items()})


def _adapter_paths(tree):
  return sorted(k for k in finetune.flatten(tree) if finetune.ADAPTER.search(k))


def _with_random_b(params, seed=1):
  flat = finetune.flatten(params)
  keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
  return finetune.unflatten({k: (0.05 * jax.random.normal(next(keys), v.shape)
                                 if k.endswith("lora/b") else v) for k, v in flat.items()})


def test_fresh_adapters_leave_the_outputs_of_the_base():
  base_cfg, cfg = load("tiny"), lora_config()
  base = _params(base_cfg)
  adapted = finetune.flatten(_params(cfg, seed=7))  # random adapters A; B at zero
  paths = _adapter_paths(adapted)
  # every stream's qkv/out/fc1/fc2 in both stacks (4 + 2 streams) and 6 embedders, A and B each
  assert len(paths) == 2 * (4 * 4 + 2 * 4 + 6)
  assert all(float(jnp.abs(adapted[p]).max()) > 0 for p in paths if p.endswith("/a"))
  params = finetune.combine(base, finetune.unflatten({p: adapted[p] for p in paths}))
  args, kwargs = _inputs(cfg)
  want = _forward(base_cfg, base, args, kwargs)
  got = _forward(cfg, params, args, kwargs)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The adapters are live: nonzero B moves the outputs.
  moved = _forward(cfg, _with_random_b(params), args, kwargs)
  assert float(jnp.abs(moved[0] - want[0]).max()) > 1e-3


def test_merged_equals_unmerged():
  cfg = lora_config()
  params = _with_random_b(_params(cfg))
  merged = lora.merge_adapters(params, scale=cfg.model.lora.alpha / cfg.model.lora.rank)
  assert _adapter_paths(merged) == []
  base_cfg = load("tiny")
  assert jax.tree.structure(merged) == jax.tree.structure(_params(base_cfg))
  args, kwargs = _inputs(cfg)
  unmerged_out = _forward(cfg, params, args, kwargs)
  merged_out = _forward(base_cfg, merged, args, kwargs)
  for u, m in zip(unmerged_out, merged_out):
    scale = float(jnp.abs(u).max())
    np.testing.assert_allclose(np.asarray(m), np.asarray(u), rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------- train steps

def _steps(config, devices, steps=2, state=None):
  """(initial state, state after `steps` train steps) on a mesh over `devices`, numpy."""
  mesh = mesh_lib.make_mesh(config, devices=devices)
  program = train_state.build_program(config, mesh)
  if state is None:  # a fresh state on a base with open gates (see _params)
    state = jax.device_get(train_state.init_state(program))
    base = finetune.flatten(_params(config_without_lora(config)))
    state["frozen"] = finetune.frozen_like(finetune.unflatten(
        {k: base[k] for k in finetune.flatten(state["frozen"])}), config)
  state0 = jax.device_put(state, program.state_shardings)
  step = train_steps.compile_train_step(program)
  data = SyntheticIterator(config, seed=3)
  out = state0
  host0 = jax.device_get(state0)
  for i in range(steps):
    batch = jax.device_put(train_state.model_inputs(data.batch(i)), program.batch_sharding)
    with jax.set_mesh(mesh):
      out, metrics = step(out, batch)
  assert np.isfinite(float(metrics["loss"]))
  return host0, jax.device_get(out)


def _lora_train_config(**mesh):
  # Adam's eps at 1e-3: an entry with a near-zero gradient would otherwise take a full step
  # of either sign, turning float reordering between meshes into differences of order lr.
  c = lora_config(rank=4, lr=1e-2, warmup_steps=0, weight_decay=0.0, batch_size=4, eps=1e-3)
  c.data.source = "synthetic"
  c.model.lora.dropout = 0.1
  c.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1), **mesh)
  return c


def test_lora_steps_move_only_adapters_and_optimizer_holds_only_them():
  config = _lora_train_config(fsdp=4)
  before, after = _steps(config, jax.devices()[:4])
  trainable = finetune.flatten(after["params"])
  assert trainable and all(finetune.ADAPTER.search(k) for k in trainable)
  assert set(finetune.flatten(after["frozen"])) == set(finetune.flatten(_params(load("tiny"))))
  # Optimizer state: only adapter-shaped leaves (mu and nu per adapter, plus scalar counts).
  opt_leaves = [x for x in jax.tree.leaves(after["opt_state"]) if np.ndim(x)]
  assert len(opt_leaves) == 2 * len(trainable)
  assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in trainable.values())
  for key, value in finetune.flatten(after["frozen"]).items():
    np.testing.assert_array_equal(value, finetune.flatten(before["frozen"])[key], err_msg=key)
  moved = [k for k, v in trainable.items()
           if not np.array_equal(v, finetune.flatten(before["params"])[k])]
  assert sorted(moved) == sorted(trainable)  # every A and B moved (B off zero)


@pytest.mark.slow  # two train-step compiles: ~30 s on an idle 2-core machine
def test_sharded_lora_steps_equal_single_device():
  single_cfg = _lora_train_config()
  start, single = _steps(single_cfg, jax.devices()[:1])
  sharded_cfg = _lora_train_config(fsdp=4, tensor=2)
  _, split = _steps(sharded_cfg, jax.devices(), state=start)
  # Compared to a thousandth of one step (lr).
  for key, value in finetune.flatten(single["params"]).items():
    np.testing.assert_allclose(finetune.flatten(split["params"])[key], value, rtol=0,
                               atol=1e-3 * single_cfg.train.lr, err_msg=key)


def test_bfloat16_frozen_base_and_a_frozen_subset_without_lora():
  config = load("tiny")
  config.data.source = "synthetic"
  config.mesh.update(data=1, fsdp=8)
  config.train.update(trainable="^single_blocks/", frozen_dtype="bfloat16", warmup_steps=0)
  before, after = _steps(config, jax.devices(), steps=1)
  assert set(after["params"]) == {"single_blocks"}
  assert {x.dtype for x in jax.tree.leaves(after["frozen"])} == {jnp.dtype(jnp.bfloat16)}
  assert "single_blocks" not in after["frozen"] and "dual_blocks" in after["frozen"]
  for key, value in finetune.flatten(after["frozen"]).items():
    np.testing.assert_array_equal(value, finetune.flatten(before["frozen"])[key], err_msg=key)
  assert not np.array_equal(after["params"]["single_blocks"]["video"]["qkv"]["kernel"],
                            before["params"]["single_blocks"]["video"]["qkv"]["kernel"])


@pytest.mark.parametrize("key,value,expected", [
    ("train.trainable", "(", "train.trainable='(': expected a regular expression"),
    ("train.trainable", "^nothing_here", "train.trainable='^nothing_here': expected a pattern "
     "that matches at least one param path"),
    ("model.lora.targets", ("qkv", "gate"), "model.lora.targets=('qkv', 'gate'): expected one of "
     "qkv, out, mlp, embedders"),
    ("train.frozen_dtype", "int8", "train.frozen_dtype='int8': expected one of float32"),
])
def test_bad_fine_tuning_keys_are_refused_by_key_and_value(key, value, expected):
  config = lora_config()
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
    finetune.partition(config, _params(load("tiny")))
  assert expected in str(info.value) and "\n" not in str(info.value)


def test_adapters_are_sharded_like_their_base_weight():
  axes = finetune.flatten(sharded.split_abstract(lora_config())[2])
  assert axes["dual_blocks/video/qkv/kernel"] == ("layers", "embed", None, "heads", "kv")
  assert axes["dual_blocks/video/qkv/lora/a"] == ("layers", "embed", "lora_rank")
  assert axes["dual_blocks/video/qkv/lora/b"] == ("layers", "lora_rank", None, "heads", "kv")
  assert axes["single_blocks/audio/fc2/lora/a"] == ("layers", "mlp", "lora_rank")
  assert axes["video_in/lora/b"] == ("lora_rank", "embed")


def test_fingerprint_is_mesh_independent_and_sees_one_changed_value():
  params = _params(load("tiny"))
  mesh = mesh_lib.make_mesh(_lora_train_config(fsdp=4, tensor=2), devices=jax.devices())
  shardings = sharded.param_shardings(load("tiny"), mesh)
  spread = jax.device_put(params, shardings)
  assert finetune.fingerprint(spread) == finetune.fingerprint(params)
  flat = finetune.flatten(params)
  flat["video_in/kernel"] = flat["video_in/kernel"].at[3, 5].add(1e-6)
  assert finetune.fingerprint(finetune.unflatten(flat)) != finetune.fingerprint(params)


def test_plan_counts_frozen_base_apart_from_adapter_state():
  from jova_jax.tools import plan
  config = lora_config(rank=8)
  config.train.frozen_dtype = "bfloat16"
  shape = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
  result = plan.make_plan(config, shape, "v5p")
  adapters = sum(np.prod(v.shape) for k, v in finetune.flatten(_params(config)).items()
                 if finetune.ADAPTER.search(k))
  base = sum(np.prod(v.shape) for v in jax.tree.leaves(_params(load("tiny"))))
  assert result.trainable_params == adapters and result.total_params == adapters + base
  assert result.rows["frozen params"] == 2 * base  # bfloat16, no optimizer state or EMA
  assert result.rows["params"] == 4 * adapters
  assert result.rows["optimizer (mu+nu)"] == 8 * adapters
