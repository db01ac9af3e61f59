"""metrics.jsonl, TensorBoard events and the console line, written by process 0 only."""
from __future__ import annotations

import json
import logging as std_logging
import os
import time

import jax
from absl import logging

from jova_jax import files


# Libraries whose INFO lines (Orbax logs a dozen per save) would bury the progress line.
_CHATTY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge.py")


def quiet_library_logs() -> None:
  """Keeps warnings and errors from those libraries, drops their INFO and DEBUG lines."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or not any(p in r.pathname for p in _CHATTY_LIBRARIES))


class MetricsWriter:
  """start_step: the step the run starts from (0, or the restored one); lines of later steps,
  written by the run that crashed after that checkpoint, are dropped so no step repeats."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start = time.time()
    self._start_step = None
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_after(path, start_step)
      self._jsonl = open(path, "a", buffering=1)  # a resumed run appends
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  @property
  def tensorboard(self):
    """The TensorBoard SummaryWriter (None off process 0), for images and audio."""
    return self._tb

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def console(self, step: int, scalars: dict) -> None:
    """One line: progress, loss terms, throughput and ETA."""
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
      eta = "?"
    else:
      rate = (step - self._start_step) / max(time.time() - self._start, 1e-9)
      eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.0f}%)"]
    for k in ("loss", "loss_video", "loss_audio", "loss_mouth", "grad_norm", "lr"):
      if k in scalars:
        parts.append(f"{k} {scalars[k]:.4g}")
    for k, unit in (("step_time", "s/step"), ("examples_per_s", "ex/s"), ("tokens_per_s", "tok/s")):
      if k in scalars:
        parts.append(f"{scalars[k]:.3g} {unit}")
    if scalars.get("mfu") is not None:
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    parts.append(f"ETA {eta}")
    logging.info(" | ".join(parts))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Keeps the lines of steps <= step (a line cut short by a crash is dropped too)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        continue
  files.write_text(path, "".join(kept))


def _plain(v):
  try:
    return v.item()
  except AttributeError:
    return v


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
