"""Console hygiene: library INFO chatter is dropped, its warnings and our own lines are kept."""
import logging as std_logging

from absl import logging

from jova_jax.training import metrics


def test_quiet_library_logs_keeps_warnings_and_our_info():
  handler = logging.get_absl_handler()
  before = list(handler.filters)
  try:
    metrics.quiet_library_logs()
    keep = handler.filters[-1]

    def record(level, path):
      return std_logging.LogRecord("absl", level, path, 1, "message", None, None)

    assert not keep(record(std_logging.INFO, "/venv/site-packages/orbax/checkpoint/x.py"))
    assert not keep(record(std_logging.INFO, "/venv/site-packages/tensorflow_datasets/y.py"))
    assert keep(record(std_logging.WARNING, "/venv/site-packages/orbax/checkpoint/x.py"))
    assert keep(record(std_logging.INFO, "/repo/jova_jax/training/loop.py"))
  finally:
    handler.filters[:] = before
