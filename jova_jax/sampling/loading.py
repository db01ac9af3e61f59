"""A trained run for sampling: its checkpoint folder, its config (with overrides) and its params
on the current mesh, and the text encoder its dataset was made with."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from jova_jax import config_lib, text
from jova_jax.model import sharded
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import checkpoint, finetune

def locate_checkpoint(path: str) -> tuple[str, int | None]:
  """(checkpoints dir, step or None for the latest) from a workdir, checkpoints dir or step dir."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path.rstrip("/")).isdigit():
    return os.path.dirname(path.rstrip("/")), int(os.path.basename(path.rstrip("/")))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def apply_overrides(config, overrides: list[str]):
  """'a.b=value' strings (value as JSON, else a string) onto a copy of config."""
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"config override {item!r}: expected KEY=VALUE, e.g. mesh.fsdp=-1")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise KeyError(f"config override {item!r}: no key {key!r} in the run's config")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config override {item!r}: no key {key!r} in the run's config")
    node[leaf] = value
  return config


def load_run(path: str, *, overrides=(), subtree: str | None = None, mesh=None,
             lora_scale: float = 1.0):
  """(config, mesh, graphdef, params) of a checkpoint; params ('ema' by default, 'params'
  when the run kept no EMA) are read straight into their shardings on the current mesh, with
  a run's frozen params or LoRA base (adapters scaled by lora_scale: finetune.py)."""
  directory, step = locate_checkpoint(path)
  with checkpoint.Checkpointer(directory, every_steps=1, keep=1, read_only=True) as ckpt:
    try:
      saved = ckpt.restore_config(step)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"checkpoint {path}: {e}") from e
  config = apply_overrides(ml_collections.ConfigDict(saved), list(overrides))
  config_lib.validate(config)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
  if subtree is None:
    subtree = "ema" if float(config.train.get("ema_decay", 0.0)) > 0 else "params"
  graphdef, abstract, _ = sharded.split_abstract(config)
  shardings = sharded.param_shardings(config, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  step_path = os.path.join(directory, str(step)) if step is not None else directory
  params = finetune.load_model_params(config, step_path, target, subtree, lora_scale)
  return config, mesh, graphdef, params


def text_encoder_for(config):
  """The encoder named in the run's dataset metadata (what training used), else text.encoder."""
  data_dir = config.data.get("dir", "")
  if data_dir and os.path.exists(os.path.join(data_dir, "metadata.json")):
    from jova_jax.data.features import read_metadata
    name = read_metadata(data_dir).get("text_encoder", {}).get("name")
    if name and name != config.text.encoder:
      config = ml_collections.ConfigDict(config.to_dict())
      config.text.encoder = name
  return text.get_text_encoder(config)
