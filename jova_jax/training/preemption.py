"""Stop-for-preemption decision that every process of a job takes at the same step."""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Turns SIGTERM / SIGINT and TPU preemption notices into `should_stop(step)`.

  The signal handler only sets a flag, so a signal never interrupts a step or a save; the
  trainer asks `should_stop(step)` once per step, saves, and exits. In multi-process jobs
  every process must call `should_stop` at the same steps: every check_every-th step the flag
  is OR-ed across processes (a signal may reach only some hosts), so all of them stop at the
  same step; the steps between cost no host sync. A lone process reads its flag every step.
  A second SIGINT falls back to the previous handler (Ctrl-C twice still interrupts).
  """

  def __init__(self, *, signals=(signal.SIGTERM, signal.SIGINT), check_every: int = 1):
    """check_every: steps between cross-process checks (each is a tiny blocking all-gather)."""
    self._flag = threading.Event()
    self.signum = None  # the first signal received, for the exit status (128 + signum)
    self._check_every = max(1, int(check_every))
    self._sync_service = True  # off after the first "no preemption service" answer
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionWatcher must be created in the main thread "
                         "(Python installs signal handlers only there)")
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):
    if self._flag.is_set() and signum == signal.SIGINT:
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
        return
    logging.warning("received signal %d: will save and stop at the next step boundary", signum)
    if self.signum is None:
      self.signum = signum
    self._flag.set()

  @property
  def signalled(self) -> bool:
    """Whether this process received a signal (no cross-process agreement)."""
    return self._flag.is_set()

  def _reached_sync_point(self, step: int) -> bool:
    if not self._sync_service:
      return False
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # jax.distributed up but without the preemption service
      self._sync_service = False
      return False

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process was signalled or preempted."""
    stop = self._reached_sync_point(step)
    if jax.process_count() == 1:
      return stop or self._flag.is_set()
    if step % self._check_every:
      return stop
    flags = multihost_utils.process_allgather(np.asarray(self._flag.is_set(), np.int32))
    return stop or bool(np.any(flags))

  def close(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
