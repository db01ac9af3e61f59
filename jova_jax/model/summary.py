"""Parameter counts per tower and component, and FLOPs of one training step, from shapes only.

  python -m jova_jax.model.summary --config=configs/jova_24b.py

Nothing is allocated: params come from nnx.eval_shape, FLOPs from the token counts and the
matmul shapes (the test checks them against XLA's cost analysis on the tiny config).
"""
from __future__ import annotations

import collections

import numpy as np
from absl import app
from ml_collections import config_flags

from jova_jax import cli, config_lib
from jova_jax.model import sharded

_VIDEO_TOWER = {"video_in", "text_video", "sigma_video", "final_video"}
_AUDIO_TOWER = {"audio_in", "text_audio", "sigma_audio", "final_audio", "null_text"}
_TOWER_OF_STREAM = {"video": "video", "text_v": "video", "audio": "audio", "text_a": "audio"}


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def param_table(model) -> dict[tuple[str, str], int]:
  """{(tower, component): params}; component = top-level module or blocks/stream.
  model: a sharded.AbstractModel (or a spec or config, traced here)."""
  if not isinstance(model, sharded.AbstractModel):
    model = sharded.abstract_model(model)
  table = collections.Counter()
  for path, leaf in _leaves(model.params):
    n = int(np.prod(leaf.shape))
    top = path[0]
    if top in ("dual_blocks", "single_blocks"):
      tower, component = _TOWER_OF_STREAM[path[1]], f"{top}/{path[1]}"
    else:
      tower = "video" if top in _VIDEO_TOWER else "audio"
      component = top
    table[(tower, component)] += n
  return dict(table)


def forward_flops(m: config_lib.ModelSpec, batch: int = 1) -> float:
  """Matmul + attention FLOPs of one forward pass (2 per multiply-add)."""
  s = m.shapes
  h, mlp = m.hidden, m.mlp_dim
  per_token_block = 2 * (3 * h * h + h * h + 2 * h * mlp)  # qkv, out, fc1, fc2
  tokens = s.audio_tokens + 2 * s.text_tokens + s.video_tokens
  blocks = m.dual_blocks + m.single_blocks
  attention = 4 * tokens * tokens * h  # QK^T and PV over the joint sequence
  pt, ph, pw = m.video_patch
  t, _, _, cv = s.video
  la, ca = s.audio
  cin = cv * (2 if m.i2v else 1) + (m.i2v_mask_channels if m.i2v else 0)
  embed = 2 * s.video_tokens * h * pt * ph * pw * (cin + cv)  # video in + out
  embed += 2 * s.audio_tokens * h * m.audio_patch * ca * 2     # audio in + out
  embed += 2 * 2 * s.text_tokens * (m.text_width * h + h * h)  # two text projections
  return float(batch * (blocks * (tokens * per_token_block + attention) + embed))


def train_step_flops(m: config_lib.ModelSpec, batch: int) -> float:
  """Forward + backward (about 2x forward) = 3x forward."""
  return 3.0 * forward_flops(m, batch)


def format_summary(config) -> str:
  spec = config_lib.run_spec(config)
  table = param_table(spec.model)
  s = spec.shapes
  lines = [f"{'tower':<6} {'component':<24} {'params':>16}"]
  for tower in ("video", "audio"):
    rows = sorted((c, n) for (t, c), n in table.items() if t == tower)
    for component, n in rows:
      lines.append(f"{tower:<6} {component:<24} {n:>16,}")
    lines.append(f"{tower:<6} {'TOTAL':<24} {sum(n for _, n in rows):>16,}")
  total = sum(table.values())
  lines.append(f"{'all':<6} {'TOTAL':<24} {total:>16,}  ({total / 1e9:.2f} B)")
  lines.append(f"tokens per sample: video {s.video_tokens}, audio {s.audio_tokens}, "
               f"text 2 x {s.text_tokens}, joint {s.joint_tokens}")
  per_sample = train_step_flops(spec.model, batch=1)
  lines.append(f"train step FLOPs: {per_sample:.3e} per sample, "
               f"{per_sample * spec.batch_size:.3e} per step "
               f"(batch {spec.batch_size})")
  return "\n".join(lines)


def main():
  # Flags are defined here, not at import: the trainer imports this module as a library.
  config_flag = config_flags.DEFINE_config_file("config", None, "Model config file.")

  def run(argv):
    del argv
    if config_flag.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/jova_24b.py")
    print(format_summary(config_flag.value))

  cli.run(run)


if __name__ == "__main__":
  main()
