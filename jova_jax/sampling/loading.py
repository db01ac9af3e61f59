"""A trained run for sampling: its checkpoint folder, its config (with overrides) and its params
on the current mesh, and the text encoder its dataset was made with."""
from __future__ import annotations

import json
import os

import ml_collections

from jova_jax import config_lib, text
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import checkpoint, finetune, state as train_state

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


def load_run(path, *, overrides=(), subtree: str | None = None, mesh=None,
             lora_scale: float = 1.0):
  """(config, mesh, graphdef, params) of a checkpoint (path: a workdir, checkpoints dir or step
  dir, or checkpoint.locate's Location of one); params ('ema' by default, 'params' when the run
  kept no EMA) are read straight into their shardings on the current mesh (the run's
  abstract_state), with a run's frozen params or LoRA base (adapters scaled by lora_scale:
  finetune.py)."""
  where = checkpoint.locate(path)
  with checkpoint.Checkpointer(where.directory, every_steps=1, keep=1, read_only=True) as ckpt:
    try:
      saved = ckpt.restore_config(where.step)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"checkpoint {path}: {e}") from e
  config = apply_overrides(ml_collections.ConfigDict(saved), list(overrides))
  spec = config_lib.run_spec(config)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
  if subtree is None:
    subtree = "ema" if float(config.train.get("ema_decay", 0.0)) > 0 else "params"
  model = train_state.abstract_state(config, mesh, spec, training=False).model
  params = finetune.load_model_params(config, where, model.params, subtree, lora_scale)
  return config, mesh, model.graphdef, params


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
