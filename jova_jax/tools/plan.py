"""Memory and step-time plan for one config on one mesh, before renting the machines.

  python -m jova_jax.plan --config=configs/jova_24b.py --mesh=data=1,fsdp=64,context=4,tensor=1 \
      --chip=v5p [--batch_size=256] [--mfu=0.4] [--config.train.grad_accum=4]

Prints per device: parameters, gradients, AdamW mu+nu, the EMA copy, FSDP gather buffers and
activations under config.model.remat, the total against the chip's HBM, and the FLOPs and step
time of one optimizer step at a stated MFU. The accounting is analytic (shapes and the
logical-axis table only), so it runs anywhere in seconds.

With libtpu importable and a TPU chip named, it also compiles the trainer's real train step
ahead of time for a TPU topology of that many chips (no TPU needed, docs/design.md section 6)
and prints XLA's memory_analysis next to the estimate. libtpu can live outside the venv:
`pip install --target DIR libtpu==0.0.42.1` then `PYTHONPATH=DIR python -m jova_jax.plan ...`.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from jax.sharding import AbstractMesh

from jova_jax import config_lib
from jova_jax.model import attention, summary
from jova_jax.model import sharded
from jova_jax.parallel import mesh as mesh_lib, remat, rules
from jova_jax.training import finetune, optim, state as train_state

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s per JAX device (a v5p megacore chip is one device)
  tpu_generation: str | None = None  # jax.experimental.topologies name, for the AOT compile


CHIPS = {
    "v5p": Chip(95 * GIB, 459e12, "v5p"),
    "v6e": Chip(32 * GIB, 918e12, "v6e"),
    "h100": Chip(80 * GIB, 989e12),
    "h200": Chip(141 * GIB, 989e12),
}
# Physical slice shapes for a chip count (a v5p-N slice has N/2 chips: 2 TensorCores per chip).
_TPU_SHAPES = {
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
}
# XLA keeps scratch, fusion temporaries and fragmentation slack beyond what we count here.
USABLE_HBM_FRACTION = 0.9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ============================================================================ parameters
def _shards_of(mesh_axes, mesh_shape) -> int:
  if mesh_axes is None:
    return 1
  axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return math.prod(mesh_shape[a] for a in axes)


def planned_model(config, mesh_shape: dict,
                  spec: config_lib.RunSpec | None = None) -> sharded.AbstractModel:
  """The planned run's model: training/state.abstract_state on an AbstractMesh of mesh_shape
  (no devices needed)."""
  mesh = AbstractMesh(tuple(int(mesh_shape[a]) for a in rules.MESH_AXES), rules.MESH_AXES)
  return train_state.abstract_state(config, mesh, spec).model


def param_counts(model: sharded.AbstractModel, mesh_shape: dict, select=None) -> tuple[int, int]:
  """(total params, params held by one device) of the params whose path `select` accepts
  (default all): each dim split by its logical axes' mesh sizes, rounded up as XLA pads
  uneven shards."""
  params, axes = finetune.flatten(model.params), finetune.flatten(model.axes)
  total = per_device = 0
  for path, leaf in params.items():
    if select is not None and not select(path):
      continue
    names = axes[path]
    total += math.prod(leaf.shape)
    spec = rules.logical_to_spec(names)
    per_device += math.prod(-(-dim // _shards_of(part, mesh_shape))
                            for dim, part in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim))
  return total, per_device


def state_bytes(config, model: sharded.AbstractModel, mesh_shape: dict) -> dict[str, int]:
  """Per-device bytes of the train state: the trainable params, their AdamW mu (train.mu_dtype)
  + nu and EMA (in the params' dtype), plus the gradients that exist during the update (and their
  running sum over micro-batches when train.grad_accum > 1); frozen params (train.trainable,
  LoRA's base) in train.frozen_dtype, without any of those."""
  trainable = finetune.is_trainable(config)
  _, per_device = param_counts(model, mesh_shape, trainable)
  _, frozen = param_counts(model, mesh_shape, lambda path: not trainable(path))
  p = per_device * _DTYPE_BYTES[config.model.param_dtype]
  ema = p if float(config.train.ema_decay) > 0 else 0
  rows = {"frozen params": frozen * _DTYPE_BYTES[config.train.frozen_dtype]} if frozen else {}
  mu_dtype = optim.mu_dtype(config)  # None: the params'
  mu = per_device * mu_dtype.itemsize if mu_dtype else p
  rows.update({"params": p, "optimizer (mu+nu)": mu + p, "ema": ema, "gradients": p})
  if int(config.train.grad_accum) > 1:
    rows["gradient accumulator"] = p
  return rows


# ============================================================================ DCN traffic
def dcn_bytes(config, model: sharded.AbstractModel, mesh_shape: dict) -> dict[str, float]:
  """Bytes one device sends across slices (DCN) per optimizer step, ring collectives, by
  cause (empty with one slice). dcn_data slices: the float32 gradient all-reduce of its
  shard, once per step. dcn_fsdp slices: per micro-batch, the params gathered for the forward
  and again for the backward (compute dtype) and the gradients reduce-scattered (float32),
  each a (slices - 1) x its-shard exchange over DCN."""
  dcn = mesh_lib.dcn_shape(config)
  _, shard = param_counts(model, mesh_shape)
  grad = shard * _DTYPE_BYTES[config.model.param_dtype]
  rows = {}
  if dcn["data"] > 1:
    rows["gradient all-reduce"] = 2 * (dcn["data"] - 1) / dcn["data"] * grad
  if dcn["fsdp"] > 1:
    accum, s = int(config.train.grad_accum), dcn["fsdp"] - 1
    rows["fsdp param gathers"] = 2 * accum * s * shard * _DTYPE_BYTES[config.model.compute_dtype]
    rows["fsdp gradient reduce-scatters"] = accum * s * grad
  return rows


# ============================================================================ activations
def _bytes_per_token_layer(config, tensor: int) -> dict[str, float]:
  """What one block keeps per token for the backward pass, by remat policy.

  carry: the block input (the residual stream, compute dtype), saved by the layer scan always.
  save_dots: plus the projection / FFN matmul outputs (dots without batch dims: qkv, out, fc1,
  fc2); attention itself is recomputed. none: every intermediate of the block with a flash-style
  kernel (no L x L logits): layer-norm inputs and the adaLN-gated sums in float32, the rest in
  the compute dtype; head / mlp sized tensors split over `tensor`.
  """
  m = config.model
  cd = _DTYPE_BYTES[m.compute_dtype]
  h, f = m.hidden, int(m.hidden * m.mlp_ratio)
  carry = h * cd
  dots = (3 * h / tensor + h + f / tensor + h) * cd
  # compute dtype: 2 norms + 2 modulates (4h), qkv, q/k normed, q/k roped, attention out (8h/t),
  # out + fc2 (2h), fc1 + gelu input + gelu tanh (3f/t); float32: 2 norm inputs, 2 gated sums,
  # q/k norm inputs (2h/t).
  every = (4 * h + 8 * h / tensor + 2 * h + 3 * f / tensor) * cd + (4 * h + 2 * h / tensor) * 4
  return {"none": carry + every, "full": carry, "save_dots": carry + dots,
          "offload_dots": carry, "_every": every}


def activation_bytes(config, model: sharded.AbstractModel, mesh_shape: dict,
                     batch_size: int) -> dict[str, float]:
  """Per-device activation bytes of one micro-batch: saved tensors x layers, the backward
  working set of one recomputed block, and the FSDP all-gather buffers of two blocks."""
  m = config.model
  remat.policy(m.remat)  # refuses an unknown policy with the key's name
  s = model.spec.shapes
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  micro = batch_size // int(config.train.grad_accum)
  samples = micro / batch_shards
  tokens = samples * (math.ceil(s.video_tokens / mesh_shape["context"]) + s.audio_tokens +
                      2 * s.text_tokens)
  per = _bytes_per_token_layer(config, mesh_shape["tensor"])
  layers = m.dual_blocks + m.single_blocks
  out = {"activations saved": tokens * per[m.remat] * layers}
  if m.remat != "none":
    out["backward working set"] = tokens * per["_every"]
  # Each scanned block's weights are gathered over fsdp x context in the compute dtype (the next
  # one prefetched), and its float32 gradient exists whole before the reduce-scatter.
  block_params = max(sum(math.prod(x.shape[1:]) for x in finetune.flatten(model.params[k]).values())
                     for k in ("dual_blocks", "single_blocks"))  # the larger (dual) block
  out["fsdp gather buffers"] = block_params / mesh_shape["tensor"] * (
      2 * _DTYPE_BYTES[m.compute_dtype] + 4)
  return out


# ============================================================================ FLOPs
def step_flops(m: config_lib.ModelSpec, batch_size: int) -> dict[str, float]:
  """Model FLOPs of one optimizer step (3 x forward, what MFU counts) and the hardware FLOPs
  with the remat policy's recomputation."""
  s = m.shapes
  model = summary.train_step_flops(m, batch_size)
  forward = summary.forward_flops(m, batch_size)
  attention_fwd = (m.dual_blocks + m.single_blocks) * attention.attention_flops(
      batch_size, s.joint_tokens, m.heads, m.hidden // m.heads)
  recompute = {"none": 0.0, "full": forward, "save_dots": attention_fwd,
               "offload_dots": attention_fwd}[m.remat]
  return {"model": model, "hardware": model + recompute}


# ============================================================================ the plan
@dataclasses.dataclass
class Plan:
  mesh_shape: dict
  chip: str
  batch_size: int
  total_params: int
  rows: dict  # name -> bytes per device
  flops: dict
  mfu: float
  dcn: dict  # name -> bytes each device sends across slices per step (dcn_bytes)
  trainable_params: int | None = None  # None: all params train

  @property
  def devices(self) -> int:
    return math.prod(self.mesh_shape.values())

  @property
  def total_bytes(self) -> float:
    return sum(self.rows.values())

  @property
  def fits(self) -> bool:
    return self.total_bytes <= USABLE_HBM_FRACTION * CHIPS[self.chip].hbm_bytes

  @property
  def step_seconds(self) -> float:
    return self.flops["model"] / (self.devices * CHIPS[self.chip].peak_flops * self.mfu)


def make_plan(config, mesh_shape: dict, chip: str, mfu: float = 0.4) -> Plan:
  if chip not in CHIPS:
    raise ValueError(f"--chip={chip!r}: expected one of {sorted(CHIPS)}")
  spec = config_lib.run_spec(config, mesh_shape)  # batch % grad_accum included
  model = planned_model(config, mesh_shape, spec)
  batch = spec.batch_size
  total, _ = param_counts(model, mesh_shape)
  trainable, _ = param_counts(model, mesh_shape, finetune.is_trainable(config))
  rows = {**state_bytes(config, model, mesh_shape),
          **activation_bytes(config, model, mesh_shape, batch)}
  return Plan(dict(mesh_shape), chip, batch, total, rows, step_flops(spec.model, batch), mfu,
              dcn_bytes(config, model, mesh_shape), trainable if trainable < total else None)


def format_plan(plan: Plan, config) -> str:
  chip = CHIPS[plan.chip]
  m = config.model
  micro = plan.batch_size // int(config.train.grad_accum)
  lines = [
      f"config: {plan.total_params / 1e9:.2f} B params, remat={m.remat}, "
      f"compute {m.compute_dtype}, batch {plan.batch_size} (grad_accum "
      f"{config.train.grad_accum}: samples per batch shard per micro-batch: "
      f"{micro / (plan.mesh_shape['data'] * plan.mesh_shape['fsdp']):g}), context_strategy="
      f"{config.parallel.context_strategy}",
      *([f"trainable: {plan.trainable_params:,} params ({plan.trainable_params / plan.total_params:.3%})"
         f", the rest frozen in {config.train.frozen_dtype}"] if plan.trainable_params else []),
      f"mesh: {plan.mesh_shape} = {plan.devices} devices of {plan.chip} "
      f"({chip.hbm_bytes / GIB:.0f} GiB HBM each)",
      f"{'per device':<28} {'GiB':>9}"]
  for name, value in plan.rows.items():
    lines.append(f"{name:<28} {value / GIB:>9.2f}")
  usable = USABLE_HBM_FRACTION * chip.hbm_bytes
  lines.append(f"{'total':<28} {plan.total_bytes / GIB:>9.2f}   "
               f"{'fits' if plan.fits else 'DOES NOT FIT'} in {usable / GIB:.1f} GiB "
               f"({USABLE_HBM_FRACTION:.0%} of HBM)")
  f = plan.flops
  lines.append(f"FLOPs per step: {f['model']:.3e} model, {f['hardware']:.3e} with remat "
               f"recompute; step time {plan.step_seconds:.2f} s at {plan.mfu:.0%} MFU "
               f"({chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak per device)")
  dcn = plan.dcn
  if dcn:
    total = sum(dcn.values())
    lines.append(f"DCN per step, sent by each device: {total / GIB:.2f} GiB ("
                 + ", ".join(f"{k} {v / GIB:.2f}" for k, v in dcn.items())
                 + f"), {total / plan.step_seconds / 1e9:.2f} GB/s over the step time")
  return "\n".join(lines)


# ============================================================================ AOT compile
def topology_name(chip: str, devices: int) -> str:
  gen = CHIPS[chip].tpu_generation
  shapes = _TPU_SHAPES.get(gen, {})
  if devices not in shapes:
    raise ValueError(f"no {chip} slice shape known for {devices} chips (known: {sorted(shapes)}); "
                     f"pass --topology, e.g. --topology={gen}:{next(iter(shapes.values()))}")
  return f"{gen}:{shapes[devices]}"


def compile_for_tpu(config, topology: str, num_slices: int = 1):
  """Compiles the trainer's train step for num_slices TPU slices of `topology` with no TPU
  attached (several: the mesh.dcn_* axes span them, mesh_lib.make_mesh).

  Returns the compiled executable (for memory_analysis()). The attention kernel is
  pinned to splash: 'auto' would resolve on this host's backend and pick the L x L XLA kernel.
  """
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  from jova_jax.training import state as train_state, steps as train_steps

  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                      **({"num_slices": num_slices} if num_slices > 1 else {}))
  config = config.copy_and_resolve_references()
  if config.parallel.attention_kernel == "auto":
    config.parallel.attention_kernel = "splash"
  mesh = mesh_lib.make_mesh(config, devices=topo.devices)
  return train_steps.compile_train_step(train_state.build_program(config, mesh))


def format_memory_analysis(mem) -> str:
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
          mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return (f"compiled memory_analysis per device (GiB): arguments "
          f"{mem.argument_size_in_bytes / GIB:.2f}, outputs {mem.output_size_in_bytes / GIB:.2f}, "
          f"aliased {mem.alias_size_in_bytes / GIB:.2f}, temporaries "
          f"{mem.temp_size_in_bytes / GIB:.2f}, code {mem.generated_code_size_in_bytes / GIB:.2f}; "
          f"peak ~ {peak / GIB:.2f}")


# ============================================================================ CLI
def parse_mesh(text: str) -> dict[str, int]:
  sizes = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name not in rules.MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected comma-separated axis=size over "
                       f"{rules.MESH_AXES}, e.g. data=1,fsdp=64,context=4,tensor=1")
    sizes[name] = int(value)
  return sizes


def resolve_mesh(config, mesh_flag: str, devices: int | None) -> dict[str, int]:
  """The flag's sizes over config.mesh (per slice, times mesh.dcn_*); a -1 axis needs
  --devices."""
  config.mesh.update(parse_mesh(mesh_flag) if mesh_flag else {})
  dcn = mesh_lib.dcn_shape(config)
  sizes = {a: int(config.mesh[a]) * dcn[a] for a in rules.MESH_AXES}
  if devices is None:
    if -1 in sizes.values():
      raise ValueError(f"mesh {sizes} has a -1 axis: pass --devices=N or give every size in --mesh")
    devices = int(np.prod(list(sizes.values())))
  return mesh_lib.mesh_shape(config, devices)
