"""Following `config` from train(): config_lib is entered once per run, and the model on its
mesh (training/state.abstract_state, tracing the model once) is built once.

Measured with sys.setprofile: every call into a public function of config_lib from outside
config_lib counts (config_lib's calls to its own helpers do not), in every thread, during one
tiny train() run on synthetic data (docs/architecture.md, "Config entered once").
"""
import collections
import sys
import threading

from jova_jax import config_lib
from jova_jax.model import sharded
from jova_jax.training import loop, state as train_state
from tests.conftest import load


def _counting(codes: dict):
  counts = collections.Counter()

  def profile(frame, event, arg):
    if event == "call" and frame.f_code in codes:
      caller = frame.f_back
      if caller is None or caller.f_code.co_filename != config_lib.__file__:
        counts[codes[frame.f_code]] += 1
  return counts, profile


def test_train_enters_config_lib_once_and_builds_the_abstract_state_once(tmp_path):
  codes = {f.__code__: f"config_lib.{name}" for name, f in vars(config_lib).items()
           if not name.startswith("_") and callable(f) and hasattr(f, "__code__")
           and f.__module__ == config_lib.__name__}
  codes[train_state.abstract_state.__code__] = "abstract_state"
  codes[sharded.abstract_model.__code__] = "abstract_model"
  c = load("tiny")
  c.data.source = "synthetic"
  c.mesh.update(data=1, fsdp=8, context=1, tensor=1)
  c.train.update(steps=1, log_every=1)
  c.eval.every_steps = 0
  c.checkpoint.update(every_steps=0, async_save=False)
  counts, profile = _counting(codes)
  sys.setprofile(profile)
  threading.setprofile(profile)
  try:
    loop.train(c, str(tmp_path / "run"))
  finally:
    sys.setprofile(None)
    threading.setprofile(None)
  print(dict(counts))
  assert counts["config_lib.run_spec"] == 1, counts
  assert counts["abstract_state"] == 1 and counts["abstract_model"] == 1, counts
  # Nothing else re-derives from the config: the only other entry is rope_split(head_dim), a
  # number-to-number helper the model's trace calls once.
  assert set(counts) <= {"config_lib.run_spec", "config_lib.rope_split", "abstract_state",
                         "abstract_model"}, counts
  assert max(counts.values()) == 1, counts
