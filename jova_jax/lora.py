"""LoRA runs: fold the adapters into their base and write a plain run.

  python -m jova_jax.lora merge --workdir=LORA_RUN --out=DIR [--lora_scale=1.0]

Loads the LoRA run's latest checkpoint with its base (checked against the recorded
fingerprint), folds every adapter into its kernel (kernel + lora_scale * alpha / rank * A @ B,
float32), and writes DIR/checkpoints/<step>/ holding "params" (and "ema" when the run kept
one) with the run's config minus LoRA: `python -m jova_jax.sample --workdir=DIR` and
`--init_from=DIR` read it like any run. Exit status 2 (one line) on a user error.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from jova_jax import cli
from jova_jax.errors import UserError
from jova_jax.model import lora
from jova_jax.sampling import loading
from jova_jax.training import checkpoint, finetune

def merged_config(config) -> ml_collections.ConfigDict:
  """The run's config as a plain run: no adapters, nothing frozen, no base."""
  values = config.to_dict()
  values["model"]["lora"].update(rank=0, base=None)
  values["train"]["trainable"] = ""
  return ml_collections.ConfigDict(values)


def merge(workdir: str, out: str, lora_scale: float = 1.0) -> str:
  """Writes the merged run to out; returns its step directory."""
  where = checkpoint.locate(workdir)  # resolved once, for every read below
  with checkpoint.Checkpointer(where.directory, every_steps=1, keep=1, read_only=True) as ckpt:
    step = ckpt.latest_step()
  if step is None:
    raise UserError(f"--workdir={workdir}: expected a run with a checkpoint, found none")
  trees = {}
  for subtree in ("params", "ema"):
    config, mesh, _, params = loading.load_run(where, subtree=subtree, lora_scale=lora_scale)
    if not finetune.uses_base(config):
      raise UserError(f"--workdir={workdir}: expected a LoRA run (model.lora.rank > 0), found "
                      f"model.lora.rank={config.model.lora.rank}")
    scale = float(config.model.lora.alpha) / int(config.model.lora.rank)
    stored = jnp.dtype(config.model.param_dtype)  # a frozen bf16 base merges back to it
    trees[subtree] = jax.tree.map(lambda x: x.astype(stored), lora.merge_adapters(params, scale))
    if float(config.train.ema_decay) <= 0:
      break
  target = os.path.join(out, "checkpoints")
  if os.path.isdir(target) and os.listdir(target):
    raise UserError(f"--out={out}: expected a folder without checkpoints, found {target}")
  with jax.set_mesh(mesh), checkpoint.Checkpointer(target, every_steps=1, keep=1,
                                                   async_save=False) as writer:
    writer.save(step, trees, data_state={}, config=merged_config(config), force=True)
    writer.wait()
  return os.path.join(target, str(step))


def main(argv):
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] != "merge":
    raise app.UsageError("usage: python -m jova_jax.lora merge --workdir=LORA_RUN --out=DIR")
  if not f.workdir or not f.out:
    raise app.UsageError("--workdir and --out are required")
  path = merge(f.workdir, f.out, f.lora_scale)
  print(f"merged adapters of {f.workdir} into {path}")


if __name__ == "__main__":
  # Flags only for the command: tests import merge() beside other modules' --out / --workdir.
  flags.DEFINE_string("workdir", None, "The LoRA run (its latest checkpoint).")
  flags.DEFINE_string("out", None, "Folder for the merged run (must not hold a checkpoint).")
  flags.DEFINE_float("lora_scale", 1.0, "How many times the adapters count when folded.")
  cli.run(main)
