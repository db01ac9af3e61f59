"""Entry point: python -m jova_jax.train --config=configs/demo.py --workdir=runs/demo

Config overrides: --config.train.steps=100 (an unknown key is refused); a variant:
--config=configs/x.py:arg. One process per host; --distributed=auto|tpu|gke|slurm|env|none says
how they find each other (auto: detected) and --num_processes how many there must be (see
jova_jax/parallel/mesh.py initialize_distributed).

Exit status: 0 trained to train.steps; 2 a user error (one line: config, data, checkpoint,
workdir); 3 training diverged; 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from jova_jax import cli
from jova_jax.training import loop, metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "Load params from another run's workdir or checkpoint (fine-tuning).")
_STRICT_RESUME = flags.DEFINE_bool("strict_resume", False,
                                   "Refuse to start when the latest checkpoint does not restore "
                                   "(default: warn and resume from the newest step that does).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  metrics.quiet_library_logs()
  try:
    loop.train(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value,
               strict_resume=_STRICT_RESUME.value)
  except loop.TrainingDiverged as e:
    logging.error("%s", e)
    raise SystemExit(3) from e


if __name__ == "__main__":
  cli.run(main)
