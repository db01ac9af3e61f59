r"""Batch generation from a trained run.

  python -m jova_jax.sample --workdir=RUN --prompts=prompts.jsonl --outdir=OUT
  python -m jova_jax.sample --checkpoint=RUN/checkpoints/5000 --prompts=... --outdir=... \
      --steps=40 --solver=unipc --video_guidance=5 --audio_guidance=4 --config.mesh.tensor=1
  python -m jova_jax.sample --workdir=LORA_RUN --lora_scale=0.8 ...   # base + adapters

Each prompt line is a JSON object with either video_caption, audio_caption and transcript or
a ready `prompt`, and optionally seed, name, image (I2V reference), audio (given speech:
audio-to-video) or video (given clip: video-to-audio); relative paths are relative to the
prompts file. Writes OUT/<name>.mp4 (H.264 + AAC), .wav and .json (prompt, seed, settings,
timings) per prompt, each under a temporary name first (a crash never leaves a truncated file
that looks finished). Bad lines and prompts that fail to read or write are reported and
skipped; the exit status is 1 if any was, 2 on a user error (one line), before the model loads
when it is about the output folder. Unset flags take the run's config.sample.* values.

`--config.KEY=VALUE` overrides a key of the run's saved config, as `python -m jova_jax.train`
takes them (VALUE as JSON, else a string); `--set=KEY=VALUE` is its deprecated alias.
"""
import os
import sys

import jax
from absl import app, flags, logging

from jova_jax import cli
from jova_jax.parallel import mesh as mesh_lib  # --distributed, --num_processes

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (its latest checkpoint).")
flags.DEFINE_string("checkpoint", None, "A checkpoints dir or one step dir (instead of --workdir).")
flags.DEFINE_string("prompts", None, "JSON-lines prompts file.")
flags.DEFINE_string("outdir", None, "Output folder.")
flags.DEFINE_integer("steps", None, "ODE steps (default config.sample.steps).")
flags.DEFINE_enum("solver", None, ["euler", "unipc"], "ODE solver (default config.sample.solver).")
flags.DEFINE_float("shift", None,
                   "Timestep shift (default config.sample.shift, else the training flow.shift).")
flags.DEFINE_float("video_guidance", None, "Video CFG scale (default config.sample.video_guidance).")
flags.DEFINE_float("audio_guidance", None, "Audio CFG scale (default config.sample.audio_guidance).")
flags.DEFINE_integer("seed", 0, "Seed of a prompt line without one: seed + line - 1.")
flags.DEFINE_integer("batch_size", None, "Prompts per batch, a multiple of the mesh's data*fsdp "
                     "(default config.sample.batch_size, else data*fsdp).")
flags.DEFINE_enum("weights", None, ["ema", "params"], "Which weights to load (default: ema when "
                  "the run kept an EMA).")
flags.DEFINE_float("lora_scale", 1.0, "A LoRA run's adapters count this many times (0: the base "
                   "model alone).")
flags.DEFINE_bool("contact_sheet", False, "Also write <outdir>/contact_sheet.png: each sample's "
                  "frames, its I2V reference image and its mel spectrogram.")
flags.DEFINE_multi_string("set", [], "Deprecated alias of --config.KEY=VALUE: KEY=VALUE.")
_OVERRIDES: list[str] = []  # --config.KEY=VALUE of this command line (cli.config_overrides)


def main(argv):
  del argv
  from jova_jax.sampling import generate, loading, prompts as prompt_lib, sampler as sampler_lib
  from jova_jax.training import metrics
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  if not FLAGS.prompts or not FLAGS.outdir:
    raise app.UsageError("--prompts and --outdir are required")
  if FLAGS.set:
    print("warning: --set is deprecated; use --config.KEY=VALUE", file=sys.stderr)
  generate.check_outdir(FLAGS.outdir)  # before the model loads: a bad folder fails at once
  metrics.quiet_library_logs()
  mesh_lib.initialize_distributed()
  try:
    config, mesh, graphdef, params = loading.load_run(
        FLAGS.workdir or FLAGS.checkpoint, overrides=_OVERRIDES + FLAGS.set, subtree=FLAGS.weights,
        lora_scale=FLAGS.lora_scale)
    prompts, errors = prompt_lib.read_prompts(FLAGS.prompts, default_seed=FLAGS.seed, config=config)
  except (KeyError, TypeError, ValueError) as e:  # a bad override or checkpoint entry, named
    cli.fail(cli.one_line(e))
  for e in errors:
    print(e, file=sys.stderr)
  sampler = sampler_lib.LatentSampler(config, mesh, graphdef, params)
  batch_size = FLAGS.batch_size or config.sample.get("batch_size", None) or sampler.batch_shards
  if batch_size % sampler.batch_shards:
    cli.fail(f"--batch_size={batch_size} is not a multiple of the mesh's data*fsdp="
             f"{sampler.batch_shards}")
  settings = sampler_lib.Settings.from_config(
      config, steps=FLAGS.steps, solver=FLAGS.solver, shift=FLAGS.shift,
      video_guidance=FLAGS.video_guidance, audio_guidance=FLAGS.audio_guidance)
  pipeline = generate.Pipeline(sampler)
  records, skipped = generate.run(pipeline, prompts, FLAGS.outdir, settings, batch_size,
                                  log=lambda msg: print(msg, file=sys.stderr))
  if FLAGS.contact_sheet and records and jax.process_index() == 0:  # its own samples
    from jova_jax.eval import contact_sheet
    entries = [contact_sheet.read_entry(os.path.join(FLAGS.outdir, r["name"] + ".mp4"),
                                        reference=r["image"], sample_rate=config.audio.sample_rate)
               for r in records]
    sheet_path = os.path.join(FLAGS.outdir, "contact_sheet.png")
    contact_sheet.write(sheet_path, entries)
    print(f"contact sheet: {sheet_path}")
  logging.info("wrote %d samples to %s", len(records), FLAGS.outdir)
  print(f"wrote {len(records)} samples to {FLAGS.outdir}; {len(errors) + len(skipped)} skipped")
  return 1 if errors or skipped else 0


if __name__ == "__main__":
  sys.argv, _OVERRIDES[:] = cli.config_overrides(sys.argv)
  cli.run(main)
