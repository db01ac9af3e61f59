"""Checkpoints with Orbax (the only module that imports orbax).

A step directory `<workdir>/checkpoints/<step>/` holds three items:
  state/       the train-state pytree (params, opt_state, ema, step, rng), written shard by
               shard by every process; read back straight into the shardings of the
               *current* mesh, so a run may resume on another mesh (never through a full
               copy on one device).
  data_state/  the input iterator's JSON state, so a resumed run sees the same examples.
  config/      the run's config as JSON, for the record and for the sampler.
Orbax writes a step under a temporary name and renames it when complete (on GCS: a
commit_success.txt marker), so a save cut short by preemption is never listed or restored.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from jova_jax.errors import UserError
from jova_jax.training.locate import Location, absolute_path, locate  # noqa: F401 (API)
from jova_jax.training.preemption import PreemptionWatcher

__all__ = ["Checkpointer", "CheckpointError", "load_params", "format_report", "key_path",
           "PreemptionWatcher", "Location", "locate", "absolute_path"]

_STATE, _DATA, _CONFIG = "state", "data_state", "config"
BROKEN_DIR = "broken_checkpoints"  # beside the checkpoints dir: steps that failed to restore


class CheckpointError(UserError):
  """A checkpoint that cannot be resumed from; the message names the step directory."""


@contextlib.contextmanager
def _loops_that_settle_before_closing():
  """Event loops made inside this context run their unfinished tasks to the end before they
  close.

  Orbax restores every array read under one asyncio.gather on a fresh loop and closes that
  loop as soon as one read fails, with TensorStore still reading the rest. Each of those
  reads then calls back into the closed loop or dies with its error unretrieved, and Python
  and asyncio report every one: thousands of tracebacks after the one useful error. Letting
  the reads finish first (their errors collected, not raised) leaves only that error."""
  previous = asyncio.get_event_loop_policy()

  class SettlingPolicy(type(previous)):
    def new_event_loop(self):
      loop = super().new_event_loop()
      close = loop.close

      def settle_then_close():
        unfinished = asyncio.all_tasks(loop)
        if unfinished:
          loop.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
        close()

      loop.close = settle_then_close
      return loop

  asyncio.set_event_loop_policy(SettlingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _restore(manager, step: int, **items):
  """The items (name -> Orbax restore args) of `step`, read with _loops_that_settle_before_closing:
  every read of this module goes through here."""
  with _loops_that_settle_before_closing():
    return manager.restore(step, args=ocp.args.Composite(**items))


def _does_not_restore(where, error: Exception) -> str:
  """'<step dir> does not restore (<type>: <reason, on one line>)'."""
  reason = " ".join(str(error).split())[:300]
  return f"{where} does not restore ({type(error).__name__}: {reason})"


# ------------------------------------------------------------------ pytree helpers

def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def key_path(path) -> str:
  """'params/blocks/0/attn/kernel': the same string for a live tree and its checkpoint
  (orbax stores namedtuples as dicts and tuples as lists, int keys as strings)."""
  return "/".join(_key_name(e) for e in path)


def _shapes_by_key(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def _dtypes_by_key(tree) -> dict[str, str]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path(p): str(leaf.dtype) for p, leaf in leaves if hasattr(leaf, "dtype")}


def _warn_of_casts(saved: dict, wanted: dict, where) -> None:
  """One warning for the arrays a restore casts (key -> dtype, saved and wanted): a run resumed
  after a change of train.mu_dtype or model.param_dtype."""
  cast = {key: (saved[key], dtype) for key, dtype in wanted.items()
          if saved.get(key, dtype) != dtype}
  if cast:
    counts = collections.Counter(cast.values())
    logging.warning("checkpoint %s: %d arrays restored in another dtype than saved (%s), e.g. %s",
                    where, len(cast), ", ".join(f"{n} {a} -> {b}" for (a, b), n in counts.items()),
                    next(iter(cast)))


def _is_nnx_state(x) -> bool:
  return isinstance(x, nnx.State)


def _to_pure(tree):
  """nnx.State -> nested dicts, so checkpoints hold plain keys (no '/value' suffixes)."""
  return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_nnx_state(x) else x, tree,
                      is_leaf=_is_nnx_state)


def _from_pure(target, restored):
  """Puts restored pure dicts back into the nnx.State nodes of `target` (if any)."""
  treedef = jax.tree.structure(target, is_leaf=_is_nnx_state)
  targets = jax.tree.leaves(target, is_leaf=_is_nnx_state)
  parts = treedef.flatten_up_to(restored)
  out = []
  for t, part in zip(targets, parts):
    if _is_nnx_state(t):
      t = jax.tree.map(lambda v: v, t)  # a fresh State: the abstract one stays untouched
      nnx.replace_by_pure_dict(t, part)
      part = t
    out.append(part)
  return treedef.unflatten(out)


def _require_shardings(tree) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(f"restore target {key_path(path)!r} has no sharding: build the target as "
                       "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(current_mesh, "
                       "spec)) so the checkpoint is read straight into its shards")


def _check_same_tree(saved: dict, wanted: dict, where: str) -> None:
  """Raises naming the first key path that differs (missing, extra, or another shape)."""
  for key, shape in wanted.items():
    if key not in saved:
      parent = key.rpartition("/")[0]
      siblings = [k for k in saved if k.rpartition("/")[0] == parent]
      raise CheckpointError(f"{where}: the restore target has {key!r} but the checkpoint does "
                            f"not (its keys beside it: {siblings})")
    if tuple(saved[key]) != tuple(shape):
      raise CheckpointError(f"{where}: {key!r} has shape {tuple(saved[key])} in the checkpoint "
                            f"but {tuple(shape)} in the restore target (another model: use a "
                            f"new workdir, or --init_from to fine-tune)")
  for key in saved:
    if key not in wanted:
      raise CheckpointError(f"{where}: the checkpoint has {key!r} but the restore target does "
                            f"not")


def _json_value(value, what: str):
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from e


def _config_dict(config) -> dict:
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return _json_value(dict(config), "config")


def _handlers(state_handler):
  return {_STATE: state_handler, _DATA: ocp.JsonCheckpointHandler(),
          _CONFIG: ocp.JsonCheckpointHandler()}


# ------------------------------------------------------------------ the checkpointer

class Checkpointer:
  """Periodic, async, rotating checkpoints of (state, data iterator state, config).

  Every process of a multi-process job must call save/restore/wait/close together.
  read_only=True opens a run that another process may be writing (the sampler): it
  neither creates the directory nor cleans up the writer's in-flight temporary steps.
  """

  def __init__(self, directory, *, every_steps: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.directory = absolute_path(directory)
    self.every_steps = int(every_steps)
    self._read_only = read_only
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        # Temporary dirs are what a killed save leaves behind; a run lasting weeks on
        # preemptible machines would pile them up.
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=_handlers(ocp.StandardCheckpointHandler()))

  # -- when
  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Finished (or, for a writer, started) steps; a reader re-lists to see new saves."""
    if self._read_only:
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  # -- save
  def save(self, step: int, state, *, data_state: dict | None, config, force: bool = False) -> bool:
    """Starts a save (returns once arrays are copied off the devices); False if skipped.

    Skipped when the step is not a save step (unless force) or already saved, e.g. a final
    save right after a periodic one.
    """
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_to_pure(state)),
        _DATA: ocp.args.JsonSave(_json_value(data_state, "data_state")),
        _CONFIG: ocp.args.JsonSave(_config_dict(config)),
    })
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  # -- restore
  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"it has steps {steps}")
    return step

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state, config_dict) of `step` (default: the latest).

    abstract_state: the pytree of jax.ShapeDtypeStruct, each with a sharding on the current
    mesh; the checkpoint is read straight into those shardings and cast to those dtypes.
    """
    step = self._resolve_step(step)
    target = _to_pure(abstract_state)
    _require_shardings(target)
    saved = self._manager.item_metadata(step)[_STATE]
    _check_same_tree(_shapes_by_key(saved.tree), _shapes_by_key(target),
                     f"checkpoint {self.directory / str(step)}")
    restored = _restore(self._manager, step, **{_STATE: ocp.args.StandardRestore(target),
                                                _DATA: ocp.args.JsonRestore(),
                                                _CONFIG: ocp.args.JsonRestore()})
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    _warn_of_casts(_dtypes_by_key(saved.tree), _dtypes_by_key(target), self.directory / str(step))
    return _from_pure(abstract_state, restored[_STATE]), restored[_DATA], restored[_CONFIG]

  def restore_latest(self, abstract_state, *, strict: bool = False):
    """(step, state, data_state) of the newest step that restores; None when there is none.

    A step that fails to read (a truncated array file, a missing _METADATA) is skipped with a
    warning and, once an older step restores, moved to <workdir>/broken_checkpoints/ so that
    the resumed run can save that step again. strict=True refuses instead. A checkpoint of
    another model (other keys or shapes) is refused, never skipped.
    """
    steps = self.all_steps()
    broken = []
    for step in reversed(steps):
      try:
        state, data_state, _ = self.restore(abstract_state, step)
      except CheckpointError:
        raise
      except Exception as e:  # Orbax and TensorStore raise many types for unreadable files
        why = _does_not_restore(self.directory / str(step), e)
        if strict:
          raise CheckpointError(
              f"{why}; without --strict_resume the run resumes from the step before") from e
        logging.warning("checkpoint %s: trying the step before", why)
        broken.append(step)
        continue
      for bad in broken:
        self._set_aside(bad)
      if broken:
        logging.warning("resuming from step %d; broken step(s) %s moved to %s", step, broken,
                        self.directory.parent / BROKEN_DIR)
      return step, state, data_state
    if broken:
      raise CheckpointError(f"{self.directory}: no step restores (tried {sorted(broken)}); "
                            f"move the folder away to start afresh")
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = self.directory.parent / BROKEN_DIR / str(step)
      suffix = 1
      while target.exists():
        target = self.directory.parent / BROKEN_DIR / f"{step}.{suffix}"
        suffix += 1
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    self._manager.reload()

  def restore_config(self, step: int | None = None) -> dict:
    step = self._resolve_step(step)
    return _restore(self._manager, step, **{_CONFIG: ocp.args.JsonRestore()})[_CONFIG]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------ --init_from

def load_params(path, abstract_params, *, strict: bool = False, fallback=None,
                subtree: str = "params"):
  """Reads only the `subtree` entry of a checkpoint's state ('params', or 'ema' for the
  sampler) into abstract_params' shardings.

  path: a run's workdir, its checkpoints dir, or one step dir (latest step unless a step
  dir), or the Location locate() made of one. A leaf is loaded when its key path and shape match; the checkpoint's dtype is cast
  to the target's. Returns (params, report): params has abstract_params' structure, with
  loaded arrays, and for the other leaves the leaf of `fallback` (e.g. freshly initialised
  params) or, without one, the ShapeDtypeStruct of abstract_params; report names the step
  dir read and the leaves loaded, missing, unexpected or of another shape. strict=True raises
  unless every leaf matches both ways.
  """
  directory, step = locate(path, "--init_from:")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers=_handlers(ocp.PyTreeCheckpointHandler())) as manager:
    steps = sorted(manager.all_steps())
    if step is None:
      if not steps:
        raise FileNotFoundError(f"--init_from: no checkpoint in {directory}")
      step = steps[-1]
    where = directory / str(step)
    saved_tree = manager.item_metadata(step)[_STATE].tree
    if not isinstance(saved_tree, dict) or subtree not in saved_tree:
      raise KeyError(f"--init_from: checkpoint {where} has no {subtree!r} entry in its state")

    target = _to_pure(abstract_params)
    _require_shardings(target)
    wanted = {key_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    report = _load_report(wanted, _shapes_by_key(saved_tree[subtree]), where)
    if strict and (report["missing"] or report["unexpected"] or report["shape_mismatch"]):
      raise ValueError(f"--init_from {where} (strict): params differ\n{format_report(report)}")
    try:
      arrays = _restore_leaves(manager, step, saved_tree, subtree,
                               {k: wanted[k] for k in report["loaded"]})
    except Exception as e:  # as in restore_latest: unreadable files raise many types
      raise CheckpointError(_does_not_restore(where, e)) from e

  base = _to_pure(fallback) if fallback is not None else target
  merged = jax.tree_util.tree_map_with_path(lambda p, leaf: arrays.get(key_path(p), leaf), base)
  logging.info("--init_from %s:\n%s", where, format_report(report))
  return _from_pure(abstract_params, merged), report


def _load_report(wanted: dict, saved: dict, where) -> dict:
  """Which of the wanted leaves ({key: target}) the saved ones ({key: shape}) can give."""
  return {
      "step_dir": str(where),  # the step read (a workdir resolves to its latest)
      "loaded": [k for k, leaf in wanted.items() if saved.get(k) == tuple(leaf.shape)],
      "missing": [k for k in wanted if k not in saved],
      "unexpected": [k for k in saved if k not in wanted],
      "shape_mismatch": [(k, saved[k], tuple(leaf.shape)) for k, leaf in wanted.items()
                         if k in saved and saved[k] != tuple(leaf.shape)],
  }


def _restore_leaves(manager, step: int, saved_tree: dict, subtree: str, targets: dict) -> dict:
  """{key: array} of the `targets` leaves ({key: ShapeDtypeStruct with sharding}) of a step's
  state[subtree], read into their shardings and dtypes; nothing else is read."""
  # The whole saved tree with placeholders (never read) everywhere but the loaded params.
  def read_target(p, _):
    k = key_path(p[1:])
    if p[0].key == subtree and k in targets:
      return targets[k]
    return ocp.PLACEHOLDER

  item = jax.tree_util.tree_map_with_path(read_target, saved_tree)
  restore_args = jax.tree.map(
      lambda leaf: leaf if leaf is ocp.PLACEHOLDER else
      ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype), item)
  restored = _restore(manager, step, **{
      _STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)})[_STATE]
  return {key_path(p): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(restored[subtree])[0]
          if leaf is not ocp.PLACEHOLDER}


def format_report(report: dict) -> str:
  """Human-readable summary of a load_params report (counts, then the keys that differ)."""
  lines = [f"loaded {len(report['loaded'])} params, missing {len(report['missing'])}, "
           f"unexpected {len(report['unexpected'])}, shape mismatch {len(report['shape_mismatch'])}"]
  lines += [f"  missing (kept from init): {k}" for k in report["missing"]]
  lines += [f"  unexpected (ignored): {k}" for k in report["unexpected"]]
  lines += [f"  shape mismatch (kept from init): {k}: checkpoint {c}, model {t}"
            for k, c, t in report["shape_mismatch"]]
  return "\n".join(lines)
