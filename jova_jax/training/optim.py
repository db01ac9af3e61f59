"""Optimizer: AdamW with weight decay masked off norms, biases and embeddings; warmup then
cosine or constant; global-norm clipping."""
from __future__ import annotations

import jax
import optax

# Params never decayed, by what they are (not by rank: stacked blocks add a `layers` axis, so a
# scanned block's norm scale is 2-D): biases, norm scales and learned embeddings.
_NO_DECAY_LEAVES = ("bias", "scale")
_NO_DECAY_NAMES = ("null_text",)


def learning_rate(config):
  t = config.train
  warmup = optax.linear_schedule(0.0, t.lr, max(int(t.warmup_steps), 1))
  if t.schedule == "constant":
    after = optax.constant_schedule(t.lr)
  elif t.schedule == "cosine":
    decay_steps = max(int(t.steps) - int(t.warmup_steps), 1)
    after = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=float(t.min_lr_ratio))
  else:
    raise ValueError(f"train.schedule={t.schedule!r}: expected 'cosine' or 'constant'")
  return optax.join_schedules([warmup, after], [int(t.warmup_steps)])


def decay_mask(params):
  """True where weight decay applies: kernels, not biases, norm scales or embeddings."""
  def keep(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return names[-1] not in _NO_DECAY_LEAVES and not any(n in _NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def applied_learning_rate(config, opt_state):
  """The learning rate the next update applies: the schedule at optax's own step count, which
  (unlike the trainer's step) stands still over skipped non-finite steps."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
      if isinstance(s, optax.ScaleByScheduleState)]
  return learning_rate(config)(counts[0])


def make_optimizer(config) -> optax.GradientTransformation:
  t = config.train
  chain = []
  if t.clip_norm and t.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(t.clip_norm))
  chain.append(optax.adamw(learning_rate(config), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
