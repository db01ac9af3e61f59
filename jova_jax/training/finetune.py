"""Fine-tuning: which params train (`train.trainable`, LoRA adapters) and which stay frozen, and
the base a LoRA run refers to instead of saving it (docs/design.md section 8).

The train state holds the trainable params in "params" (with their optimizer state and EMA)
and the frozen ones apart in "frozen" (in `train.frozen_dtype`; absent when nothing is frozen,
so a plain run's state is unchanged). A run with frozen params but no LoRA saves "frozen" with
its checkpoints; a LoRA run saves only the adapters and records its base in the config as
`model.lora.base` = {path (the base's step dir), step, fingerprint}; the frozen params are read
from there again on resume, sampling and merging, and must match the fingerprint.
"""
from __future__ import annotations

import hashlib
import os
import re

import jax
import jax.numpy as jnp
from absl import logging

from jova_jax.config_lib import ConfigError
from jova_jax.errors import UserError
from jova_jax.model import lora
from jova_jax.training import checkpoint

ADAPTER = re.compile(r"(^|/)lora/[ab]$")  # the param paths of LoRA adapters
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ------------------------------------------------------------------ nested dicts by path

def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a/b/c': leaf} of a nested dict (anything but a dict is a leaf)."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def combine(*trees: dict) -> dict:
  """The union of nested dicts with disjoint leaves (trainable + frozen = all params)."""
  flat = {}
  for tree in trees:
    flat.update(flatten(tree))
  return unflatten(flat)


# ------------------------------------------------------------------ the partition

def uses_base(config) -> bool:
  """A LoRA run: its checkpoints refer to a base instead of holding the frozen params."""
  return lora.enabled(config.model.get("lora"))


def is_trainable(config):
  """path -> bool from train.trainable and model.lora (see configs/base.py)."""
  pattern = str(config.train.get("trainable", "") or "")
  try:
    regex = re.compile(pattern) if pattern else None
  except re.error as e:
    raise ConfigError(f"train.trainable={pattern!r}: expected a regular expression, found "
                      f"one that does not compile ({e})") from e
  adapters = uses_base(config)
  if adapters and not (config.model.lora.targets and config.model.lora.towers):
    raise ConfigError(f"model.lora.targets={tuple(config.model.lora.targets)}, model.lora.towers="
                      f"{tuple(config.model.lora.towers)}: expected at least one of each")

  def trainable(path: str) -> bool:
    if adapters and ADAPTER.search(path):
      return True
    return bool(regex.search(path)) if regex else not adapters
  return trainable


def partition(config, params: dict) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts of params (arrays, shapes or shardings)."""
  trainable = is_trainable(config)
  flat = flatten(params)
  picked = {k: v for k, v in flat.items() if trainable(k)}
  if not picked:
    raise ConfigError(f"train.trainable={config.train.trainable!r}: expected a pattern that "
                      f"matches at least one param path (e.g. {next(iter(flat))!r}), found none")
  return unflatten(picked), unflatten({k: v for k, v in flat.items() if k not in picked})


def frozen_like(tree: dict, config) -> dict:
  """Frozen params (arrays or ShapeDtypeStructs) in train.frozen_dtype."""
  dtype = _DTYPES[config.train.get("frozen_dtype", "float32")]

  def cast(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(cast, tree)


def saved_state(state: dict, config) -> dict:
  """What a checkpoint holds of a train state: all of it but, for LoRA, the frozen base."""
  return {k: v for k, v in state.items() if not (k == "frozen" and uses_base(config))}


def model_params(state: dict, which: str = "params") -> dict:
  """All the model's params: state[which] ('params' or 'ema') with the frozen ones."""
  return combine(state[which], state.get("frozen", {}))


# ------------------------------------------------------------------ the base of a LoRA run

def fingerprint(frozen: dict) -> str:
  """Hash of the frozen params' paths, shapes, dtypes and values. The values enter as wrapping
  integer sums of their bits (exact in any order), so any mesh gives the same fingerprint."""
  flat = flatten(frozen)
  keys = sorted(flat)

  def bit_sums(x):
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * bits, dtype=jnp.uint32)])

  sums = jax.device_get(jax.jit(lambda xs: [bit_sums(x) for x in xs])([flat[k] for k in keys]))
  digest = hashlib.sha256()
  for key, total in zip(keys, sums):
    x = flat[key]
    digest.update(f"{key}:{tuple(x.shape)}:{x.dtype}:{int(total[0])}:{int(total[1])};".encode())
  return digest.hexdigest()[:16]


def load_base(config, frozen_target: dict) -> dict:
  """The frozen params of a LoRA run from model.lora.base, checked against its fingerprint."""
  ref = config.model.lora.get("base")
  if not ref:
    raise UserError("model.lora.base: expected the base run's {path, step, fingerprint} "
                    "(set by training with --init_from), found none")
  if not os.path.isdir(ref["path"]):
    raise UserError(f"model.lora.base.path: expected the base checkpoint {ref['path']} (step "
                    f"{ref['step']}) the adapters were trained on, found no such folder")
  frozen, report = checkpoint.load_params(ref["path"], frozen_target)
  _require_loaded(report, "model.lora.base", frozen)
  found = fingerprint(frozen)
  if found != ref["fingerprint"]:
    raise UserError(f"model.lora.base.fingerprint: expected {ref['fingerprint']} (the base the "
                    f"adapters were trained on), found {found} in {ref['path']}")
  return frozen


def _require_loaded(report: dict, what: str, frozen: dict) -> None:
  """Refuses a base that lacks one of the frozen params (the adapters are not in a base)."""
  absent = [k for k in report["missing"] + [k for k, *_ in report["shape_mismatch"]]
            if k in flatten(frozen)]
  if absent:
    raise UserError(f"{what}: expected {report['step_dir']} to hold every frozen param, found "
                    f"{len(absent)} missing or of another shape (first: {absent[0]!r})")


def init_from(state: dict, path: str, abstract_state: dict, config) -> dict:
  """The state with its params loaded from another run (--init_from); the params it lacks
  keep their initial values. A LoRA run needs all its frozen params there and records that
  step as its base (config.model.lora.base)."""
  target = combine(abstract_state["params"], abstract_state.get("frozen", {}))
  params, report = checkpoint.load_params(path, target, fallback=model_params(state))
  logging.info("--init_from %s:\n%s", path, checkpoint.format_report(report))
  trainable, frozen = partition(config, params)
  # The EMA starts as a copy: the train step donates its state, and one buffer donated twice
  # (params and ema) crashed the CPU runtime.
  state = dict(state, params=trainable, ema=jax.tree.map(jnp.copy, trainable))
  if frozen:
    state["frozen"] = frozen
  if uses_base(config):
    _require_loaded(report, f"--init_from={path}", frozen)
    config.model.lora.base = {"path": report["step_dir"],
                              "step": int(os.path.basename(report["step_dir"])),
                              "fingerprint": fingerprint(frozen)}
  return state


def require_base_source(config, init_from_path: str | None) -> None:
  """A fresh LoRA run trains adapters on a base: refuses one with nothing to start from."""
  if uses_base(config) and not init_from_path:
    raise UserError(f"model.lora.rank={config.model.lora.rank}: expected --init_from=BASE_RUN "
                    f"(the run whose weights the adapters adapt), found none")


def load_model_params(config, path: str, target: dict, subtree: str,
                      lora_scale: float = 1.0) -> dict:
  """All params of a run's checkpoint (`path`: a step dir or checkpoints dir) in `target`'s
  shardings: its `subtree` ('ema' or 'params') with its frozen params or, for LoRA, its base;
  adapters scaled by lora_scale (sampling)."""
  trainable_t, frozen_t = partition(config, target)
  if not frozen_t:
    params, _ = checkpoint.load_params(path, target, strict=True, subtree=subtree)
  else:
    trainable, _ = checkpoint.load_params(path, trainable_t, strict=True, subtree=subtree)
    frozen_t = frozen_like(frozen_t, config)
    frozen = (load_base(config, frozen_t) if uses_base(config) else
              checkpoint.load_params(path, frozen_t, strict=True, subtree="frozen")[0])
    params = combine(trainable, frozen)
  if lora_scale != 1.0:
    if not uses_base(config):
      raise UserError(f"--lora_scale={lora_scale}: expected a run with LoRA adapters "
                      f"(model.lora.rank > 0), found model.lora.rank=0")
    params = lora.scale_adapters(params, lora_scale)
  return params
