"""Optimizer: AdamW with weight decay masked off norms, biases and embeddings; warmup then
cosine or constant; global-norm clipping; the EMA of the params.

`make_optimizer` is the reference (optax) and owns the state's layout; `adamw_ema_update` is
the train step's update: the same arithmetic written once per leaf, with the EMA, so XLA makes
one pass per leaf and output instead of one per optax stage (tests/test_optim.py holds the two
equal); on CPU the same arithmetic runs as one fused loop per leaf (kernels/adamw_ema_cpu)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jova_jax.kernels import adamw_ema_cpu

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
  return learning_rate(config)(_only(opt_state, optax.ScaleByScheduleState).count)


def make_optimizer(config) -> optax.GradientTransformation:
  t = config.train
  chain = []
  if t.clip_norm and t.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(t.clip_norm))
  chain.append(optax.adamw(learning_rate(config), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask,
                           mu_dtype=mu_dtype(config)))
  return optax.chain(*chain)


def mu_dtype(config):
  """The dtype AdamW's first moment is stored in: train.mu_dtype, or None (optax's default: the
  params' dtype) for 'params'. Computed in the params' precision either way, then rounded."""
  name = config.train.get("mu_dtype", "params")
  return None if name == "params" else jnp.dtype(name)


def adam_state(opt_state) -> optax.ScaleByAdamState:
  """The AdamW moments and count in make_optimizer's state."""
  return _only(opt_state, optax.ScaleByAdamState)


def adamw_ema_update(config, opt_state, params, ema, grads, grad_norm, apply, ema_decay,
                     fused_cpu: bool = False):
  """(params, opt_state, ema) after one step of `make_optimizer(config)` and the EMA, or all
  three unchanged where `apply` is False (a non-finite step: grads may hold NaN). `fused_cpu`:
  the per-leaf arithmetic runs as kernels/adamw_ema_cpu's one loop per leaf, not XLA's.

  Skipping is done with coefficients, not a cond or per-leaf selects: when not applied, the
  moments and the EMA keep weight 1 and the step has lr 0, which leaves every value bit for bit.
  A cond made XLA copy the state into and out of the branch; selects copied every donated
  buffer (docs/performance.md, "Fourth round")."""
  t = config.train
  adam = adam_state(opt_state)
  schedule = _only(opt_state, optax.ScaleByScheduleState)

  def counted(count):  # optax's counts advance only over applied steps
    return jnp.where(apply, optax.safe_increment(count), count)

  count = counted(adam.count)
  c = _step_coefficients(config, count, schedule.count, grad_norm, apply, ema_decay)
  decays = decay_mask(params)
  if fused_cpu:
    params, mu, nu, ema = adamw_ema_cpu.update(c, grads, params, adam.mu, adam.nu, ema, decays)
  else:
    def leaf(g, p, mu, nu, e, decays):
      # In the params' precision (nu's dtype is theirs), b1 in mu's (optax's Python float takes
      # it); a bfloat16 mu is rounded back only after the update has used it, as optax does.
      dtype = nu.dtype
      g = jnp.where(apply, g * c["clip"].astype(g.dtype), 0)
      m = c["new_weight1"].astype(dtype) * g + (c["b1"].astype(mu.dtype) * mu).astype(dtype)
      nu = c["new_weight2"].astype(dtype) * (g * g) + c["b2"].astype(dtype) * nu
      update = (m / c["correct1"].astype(dtype)) / (jnp.sqrt(nu / c["correct2"].astype(dtype))
                                                    + t.eps)
      if decays:
        update = update + t.weight_decay * p
      p = (p + c["step_size"].astype(update.dtype) * update).astype(p.dtype)
      e = (c["ema_weight"] * e + (1.0 - c["ema_weight"]) * p).astype(e.dtype)
      return p, m.astype(mu.dtype), nu, e

    treedef = jax.tree.structure(params)
    per_leaf = [leaf(*args) for args in zip(*(treedef.flatten_up_to(x) for x in (
        grads, params, adam.mu, adam.nu, ema, decays)))]
    params, mu, nu, ema = (treedef.unflatten(list(xs)) for xs in zip(*per_leaf))
  new = {optax.ScaleByAdamState: adam._replace(count=count, mu=mu, nu=nu),
         optax.ScaleByScheduleState: schedule._replace(count=counted(schedule.count))}
  opt_state = jax.tree.map(lambda s: new.get(type(s), s), opt_state,
                           is_leaf=lambda s: type(s) in new)
  return params, opt_state, ema


def _step_coefficients(config, count, schedule_count, grad_norm, apply, ema_decay) -> dict:
  """The step's scalars (float32), named as kernels/adamw_ema_cpu.COEFFICIENTS; `count` is the
  applied-step count after this step."""
  t = config.train
  where = lambda applied, skipped: jnp.where(apply, applied, skipped).astype(jnp.float32)  # noqa: E731
  # Global-norm clipping as one factor (optax divides, then multiplies: equal to an ulp). Two
  # expressions of g made XLA write the clipped gradient out and read both.
  clip = (jnp.where(grad_norm >= t.clip_norm, t.clip_norm / grad_norm, 1.0)
          if t.clip_norm and t.clip_norm > 0 else 1.0)
  # The coefficients as optax forms them (1 - b1 in Python, then float32), so equal to the bit.
  return {
      "clip": jnp.asarray(clip, jnp.float32), "apply": where(1.0, 0.0),
      "new_weight1": where(1 - t.b1, 0.0), "b1": where(t.b1, 1.0),
      "new_weight2": where(1 - t.b2, 0.0), "b2": where(t.b2, 1.0),
      # Bias corrections of the applied count; 1 when skipped (count may still be 0).
      "correct1": where(1 - t.b1 ** count, 1.0), "correct2": where(1 - t.b2 ** count, 1.0),
      "eps": jnp.float32(t.eps), "weight_decay": jnp.float32(t.weight_decay),
      "step_size": where(-learning_rate(config)(schedule_count), 0.0),
      "ema_weight": where(ema_decay, 1.0)}


def _only(opt_state, kind):
  """The one `kind` state in make_optimizer's state (its layout is optax's, for checkpoints)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind))
           if isinstance(s, kind)]
  if len(found) != 1:
    raise ValueError(f"optimizer state: expected one {kind.__name__}, found {len(found)}")
  return found[0]
