"""`python -m jova_jax.bench {model|train|sample|codecs} --config=...`: the benchmarks of
jova_jax/tools/bench.py, under the command the README and docs/performance.md use. The flags
live here (the library defines none)."""
from absl import app, flags
from ml_collections import config_flags

from jova_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed iterations after the warm-up.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "train: also time the forward, the forward+backward and the update "
    "(optimizer+EMA) apart from the whole step (interleaved, medians); backward by difference.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "train: write a jax.profiler trace of the timed steps here (TensorBoard).")


def main(argv):
  from jova_jax.tools import bench
  if len(argv) != 2 or argv[1] not in bench.COMMANDS:
    raise app.UsageError(f"usage: python -m jova_jax.bench {{{'|'.join(bench.COMMANDS)}}} "
                         f"--config=F")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  opts = bench.Options(steps=_STEPS.value, breakdown=_BREAKDOWN.value, profile=_PROFILE.value)
  bench.COMMANDS[argv[1]](_CONFIG.value, opts)


if __name__ == "__main__":
  cli.run(main)
