"""Every `python -m` entry point fails like a well-made tool (jova_jax/cli.py): a user error
prints one `error: ...` line naming the key or file and exits 2, with no traceback, and a
refused run leaves its workdir as it was. Most cases stop before anything compiles."""
import os
import shutil
import subprocess
import sys

import pytest

from jova_jax.data import pipeline
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import checkpoint, state as train_state
from tests.conftest import REPO, load, truncate_array_files
from tests.datasets import write_random_dataset

TINY = ["--config=configs/tiny.py", "--config.data.read_threads=1"]
TRAIN = ["jova_jax.train"] + TINY
SAMPLE = ["jova_jax.sample"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """A dataset, a run with a step-2 checkpoint of the tiny model, a copy whose only step is
  truncated, an empty folder, a plain file and a prompts file."""
  root = tmp_path_factory.mktemp("cli")
  config = load("tiny")
  config.data.dir = str(write_random_dataset(root / "ds", config, 8, 2))
  config.data.read_threads = 1
  mesh = mesh_lib.make_mesh(config)
  program = train_state.build_program(config, mesh)
  run = root / "run"
  with checkpoint.Checkpointer(run / "checkpoints", every_steps=1, keep=2,
                               async_save=False) as ckpt:
    ckpt.save(2, train_state.init_state(program), config=config, force=True,
              data_state=pipeline.make_train_iterator(config, mesh).get_state())
  (run / "config.json").write_text(config.to_json_best_effort(indent=2))
  shutil.copytree(run, root / "broken")
  truncate_array_files(root / "broken" / "checkpoints" / "2")
  (root / "empty").mkdir()
  (root / "file").write_text("not a folder\n")
  (root / "video.mp4").write_bytes(b"")
  (root / "sample_prompts.jsonl").write_text('{"name": "a", "text": "hello"}\n')
  return {k: str(root / k) for k in ("ds", "run", "broken", "empty", "file")} | {
      "video": str(root / "video.mp4"), "prompts": str(root / "sample_prompts.jsonl"),
      "tmp": str(root),
      "config_json": (run / "config.json").read_text()}


def _unchanged_config(p):
  return open(os.path.join(p["run"], "config.json")).read() == p["config_json"]


# (id, module and flags with {ds} {run} {broken} {empty} {file} {video} {prompts} {tmp},
# phrase of the error line, a check of what is on disk afterwards)
CASES = [
    ("train_unknown_key", TRAIN + ["--workdir={tmp}/w", "--config.train.stepz=3"],
     "--config.train.stepz: no config key 'stepz'; did you mean 'steps'?", None),
    ("train_wrong_type", TRAIN + ["--workdir={tmp}/w", "--config.train.steps=abc"],
     "--config.train.steps=abc: invalid literal for int()", None),
    ("train_missing_config_file",
     ["jova_jax.train", "--config=configs/nope.py", "--workdir={tmp}/w"],
     "--config=configs/nope.py: no such config file", None),
    ("train_missing_flag", TRAIN, "--workdir must have a value", None),
    ("train_mesh_does_not_divide", TRAIN + ["--workdir={tmp}/w", "--config.mesh.fsdp=3"],
     "has 3 devices but there are 8", None),
    ("train_batch_size_0", TRAIN + ["--workdir={tmp}/w", "--config.train.batch_size=0"],
     "train.batch_size=0: expected a number >= 1", None),
    ("train_log_every_0", TRAIN + ["--workdir={tmp}/w", "--config.train.log_every=0"],
     "train.log_every=0: expected a number >= 1", None),
    ("train_enum", TRAIN + ["--workdir={tmp}/w", "--config.train.schedule=linear"],
     "train.schedule='linear': expected one of cosine, constant", None),
    ("train_missing_data_dir", TRAIN + ["--workdir={tmp}/w", "--config.data.dir={tmp}/none"],
     "(data.dir) does not exist", lambda p: not os.path.exists(f"{p['tmp']}/w")),
    ("train_empty_data_dir", TRAIN + ["--workdir={tmp}/w", "--config.data.dir={empty}"],
     "has no dataset_info.json", lambda p: not os.path.exists(f"{p['tmp']}/w")),
    ("train_workdir_is_a_file", TRAIN + ["--workdir={file}", "--config.data.dir={ds}"],
     "expected a folder, found a file", None),
    ("train_refused_resume", TRAIN + ["--workdir={run}", "--config.data.dir={ds}",
                                      "--config.model.hidden=128"],
     "in the checkpoint but", _unchanged_config),
    ("train_strict_resume", TRAIN + ["--workdir={broken}", "--config.data.dir={ds}",
                                     "--strict_resume"],
     "checkpoints/2 does not restore", lambda p: os.path.isdir(f"{p['broken']}/checkpoints/2")),
    ("train_no_step_restores", TRAIN + ["--workdir={broken}", "--config.data.dir={ds}"],
     "no step restores (tried [2])", lambda p: os.path.isdir(f"{p['broken']}/checkpoints/2")),
    ("sample_usage", SAMPLE, "give exactly one of --workdir and --checkpoint", None),
    ("sample_outdir_is_a_file", SAMPLE + ["--workdir={run}", "--prompts={file}", "--outdir={file}"],
     "--outdir={file}: expected a folder, found a file", None),
    ("sample_truncated_checkpoint", SAMPLE + ["--workdir={broken}", "--prompts={prompts}",
                                              "--outdir={tmp}/out"],
     "checkpoints/2 does not restore", None),
    ("sample_missing_checkpoint", SAMPLE + ["--checkpoint={tmp}/none", "--prompts={file}",
                                            "--outdir={tmp}/out"],
     "checkpoint {tmp}/none does not exist", None),
    ("prepare_missing_input", ["data_prep.prepare", "--config=configs/tiny.py",
                               "--input={tmp}/none", "--output={tmp}/prepared"],
     "no such folder or JSONL manifest", lambda p: not os.path.exists(f"{p['tmp']}/prepared")),
    ("prepare_usage", ["data_prep.prepare", "finish", "--config=configs/tiny.py",
                       "--output={tmp}/prepared"], "the only command is 'finalize'", None),
    ("finalize_nothing", ["data_prep.prepare", "finalize", "--config=configs/tiny.py",
                          "--output={empty}"], "no finished shard", None),
    ("sync_missing_file", ["jova_jax.eval.sync", "--video={tmp}/none.mp4"],
     "{tmp}/none.mp4: no such file or folder", None),
    ("sync_control_of_one", ["jova_jax.eval.sync", "--video={video}", "--shuffle_control"],
     "needs --control_audio", None),
    ("plan_bad_mesh", ["jova_jax.plan", "--config=configs/tiny.py", "--mesh=data=3"],
     "pass --devices=N", None),
    ("plan_unknown_key", ["jova_jax.plan", "--config=configs/tiny.py", "--config.model.hiden=1"],
     "did you mean 'hidden'?", None),
    ("bench_usage", ["jova_jax.bench", "nope", "--config=configs/tiny.py"],
     "usage: python -m jova_jax.bench", None),
    ("summary_usage", ["jova_jax.model.summary"], "--config is required", None),
    ("demo_corpus_size", ["data_prep.make_demo_corpus", "--out={tmp}/corpus", "--size=100"],
     "--size must be even and >= 128", lambda p: not os.path.exists(f"{p['tmp']}/corpus")),
    ("demo_prompts_missing_dataset", ["data_prep.demo_prompts", "--dataset={tmp}/none",
                                      "--out={tmp}/prompts.jsonl"],
     "(data.dir) does not exist", lambda p: not os.path.exists(f"{p['tmp']}/prompts.jsonl")),
    ("demo_summary_no_samples", ["data_prep.demo_summary", "--samples={empty}",
                                 "--sheet={tmp}/sheet.png"],
     "expected generated mp4 files, found none", lambda p: not os.path.exists(f"{p['tmp']}/sheet.png")),
]


@pytest.mark.parametrize("argv,phrase,after", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(paths, argv, phrase, after):
  args = [a.format(**paths) for a in argv]
  result = subprocess.run([sys.executable, "-m"] + args, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(errors) == 1 and phrase.format(**paths) in errors[0], result.stderr[-3000:]
  assert after is None or after(paths)
