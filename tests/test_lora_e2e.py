"""The LoRA path end to end on a tiny model: train a base -> LoRA-train on two clips
(stopped and resumed) -> the loss on those clips falls -> the sampler loads base + adapters ->
merge -> sampling the merged run equals sampling the LoRA run."""
import json
import os

import jax
import numpy as np
import pytest

from jova_jax import lora as lora_cli
from jova_jax.errors import UserError
from jova_jax.sampling import loading, sampler as sampler_lib
from jova_jax.training import finetune, loop
from tests.conftest import load
from tests.datasets import write_random_dataset


def _config(dataset, **train):
  c = load("tiny")
  c.data.update(dir=str(dataset), read_threads=1, eval_split="train")  # eval: the two clips
  # x0: the loss is the clean-latent error (weighted 1/sigma^2), which two clips can teach;
  # a velocity loss on random latents is mostly the unlearnable noise.
  c.flow.prediction = "x0"
  c.mesh.update(data=1, fsdp=8, context=1, tensor=1)
  c.train.update(log_every=1, **train)
  c.eval.update(batches=1)
  c.checkpoint.update(async_save=False, keep=3)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _eval_loss(workdir):
  return [m["eval_loss"] for m in _metrics(workdir) if "eval_loss" in m][-1]


def _sample(run, **kwargs):
  config, mesh, graphdef, params = loading.load_run(run, **kwargs)
  sampler = sampler_lib.LatentSampler(config, mesh, graphdef, params)
  shapes = sampler.shapes
  rng = np.random.default_rng(0)
  text = rng.normal(size=(8, shapes.text_tokens, config.text.width)).astype(np.float32)
  cond = sampler_lib.text_conditions(text, np.ones(text.shape[:2], bool), shapes)
  settings = sampler_lib.Settings.from_config(config, steps=2, video_guidance=1.0,
                                              audio_guidance=1.0)
  video, audio, _ = sampler.sample(cond, np.arange(8, dtype=np.uint32), settings)
  return video, audio


@pytest.mark.slow  # three short training runs and four samplings: ~1 min on an idle 2-core machine
def test_base_then_lora_then_sample_then_merge(tmp_path):
  dataset = write_random_dataset(tmp_path / "ds", load("tiny"), 2, 2)
  base_run, lora_run, merged_run = (str(tmp_path / n) for n in ("base", "lora", "merged"))
  # lr 1e-2: a few steps open the adaLN-zero gates, through which the adapters get gradients.
  base = _config(dataset, steps=4, lr=1e-2, warmup_steps=0)
  base.eval.every_steps = 4
  loop.train(base, base_run)

  tuned = _config(dataset, steps=15, lr=3e-2, warmup_steps=0, schedule="constant")
  tuned.model.lora.update(rank=8, alpha=8.0, targets=("qkv", "out", "mlp", "embedders"))
  tuned.eval.every_steps = 15
  tuned.checkpoint.every_steps = 15
  with pytest.raises(UserError, match="model.lora.rank=8: expected --init_from=BASE_RUN"):
    loop.train(tuned, lora_run)
  loop.train(tuned, lora_run, init_from=base_run)
  tuned.train.steps = 30
  loop.train(tuned, lora_run)  # resumes at 15: the base comes from the recorded reference
  assert [m["step"] for m in _metrics(lora_run) if "loss" in m] == list(range(1, 31))
  # Fixed-sigma loss on the two clips: the base (= the LoRA run at step 0), then after 15 and
  # 30 steps (measured 36.08 -> 34.56 -> 34.34 on random latents).
  base_loss = _eval_loss(base_run)
  evals = [m["eval_loss"] for m in _metrics(lora_run) if "eval_loss" in m]
  assert evals[1] < evals[0] < base_loss and evals[1] < 0.97 * base_loss

  # The checkpoint holds adapters only, and a reference to the base's step.
  saved = json.load(open(os.path.join(lora_run, "config.json")))["model"]["lora"]["base"]
  assert saved["path"] == os.path.join(base_run, "checkpoints", "4") and saved["step"] == 4
  state_items = os.listdir(os.path.join(lora_run, "checkpoints", "30", "state"))
  assert state_items  # (orbax layout); the params it holds:
  _, _, _, lora_params = loading.load_run(lora_run, subtree="params")
  assert any(finetune.ADAPTER.search(k) for k in finetune.flatten(lora_params))

  lora_out = _sample(lora_run)
  base_out = _sample(lora_run, lora_scale=0.0)  # the adapters switched off
  assert float(np.abs(lora_out[0] - base_out[0]).max()) > 1e-3
  lora_cli.merge(lora_run, merged_run)
  merged_out = _sample(merged_run)
  for merged, unmerged in zip(merged_out, lora_out):
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-4)

  with pytest.raises(UserError, match="model.lora.base.fingerprint: expected 0000"):
    loading.load_run(lora_run, overrides=['model.lora.base.fingerprint="0000"'])
  with pytest.raises(UserError, match="--out=.*expected a folder without checkpoints"):
    lora_cli.merge(lora_run, merged_run)
  with pytest.raises(UserError, match="--lora_scale=0.5: expected a run with LoRA adapters"):
    loading.load_run(merged_run, lora_scale=0.5)
