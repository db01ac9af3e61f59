"""Sampling speed: `python -m jova_jax.bench sample --config=...` calls bench_sample(config).

Random-init params and random text embeddings at the config's shapes (what is timed is the
ODE: the model forward on [conditional ; unconditional] plus the solver updates), with the
config's sample.* settings. The first run compiles; the second is timed. Prints and returns
seconds per ODE step, per batch and per sample; codec decoding and file writing are not
included.
"""
from __future__ import annotations

import time

import numpy as np

from jova_jax import config_lib
from jova_jax.data import batch_spec
from jova_jax.model import sharded
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.sampling import sampler as sampler_lib
from jova_jax.training import state as train_state


def random_conditions(spec: config_lib.RunSpec, batch: int, seed: int = 0) -> dict:
  """Text-to-audio+video conditions with random text embeddings (as Pipeline.conditions),
  text shapes from the batch table (data/batch_spec.py)."""
  shapes = spec.shapes
  table = batch_spec.example_spec(shapes, spec.model.text_width)
  rng = np.random.default_rng(seed)
  t, h, w, cv = shapes.video
  return {"text": rng.standard_normal((batch,) + table["text"][0], table["text"][1]),
          "text_mask": np.ones((batch,) + table["text_mask"][0], table["text_mask"][1]),
          "first_frame": np.zeros((batch, h, w, cv), np.float32),
          "use_first_frame": np.zeros(batch, bool), "given_video": np.zeros(batch, bool),
          "given_audio": np.zeros(batch, bool),
          "clean_video": np.zeros((batch,) + shapes.video, np.float32),
          "clean_audio": np.zeros((batch,) + shapes.audio, np.float32)}


def bench_sample(config, batch_size: int | None = None, repeats: int = 1) -> dict:
  spec = config_lib.run_spec(config)
  mesh = mesh_lib.make_mesh(config)
  model = train_state.abstract_state(config, mesh, spec, training=False).model
  params = sharded.init_params(spec.model, mesh, seed=0, model=model)
  sampler = sampler_lib.LatentSampler(config, mesh, model.graphdef, params, shapes=spec.shapes)
  batch = batch_size or config.sample.get("batch_size", None) or sampler.batch_shards
  settings = sampler_lib.Settings.from_config(config)
  cond = random_conditions(spec, batch)
  seeds = list(range(batch))

  start = time.perf_counter()
  sampler.sample(cond, seeds, settings)
  compile_and_run = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    _, _, step_times = sampler.sample(cond, seeds, settings)
    runs.append((time.perf_counter() - start, step_times))
  seconds, step_times = min(runs, key=lambda r: r[0])
  result = {"batch": batch, "steps": settings.steps, "solver": settings.solver,
            "guided": not (settings.video_guidance == settings.audio_guidance == 1.0),
            "first_run_s": compile_and_run, "batch_s": seconds,
            "sample_s": seconds / batch, "step_s": float(np.median(step_times)),
            "step_per_sample_s": float(np.median(step_times)) / batch}
  print(f"sample bench: batch {batch}, {settings.steps} {settings.solver} steps "
        f"({'with' if result['guided'] else 'no'} CFG) on {mesh.devices.size} devices "
        f"{dict(mesh.shape)}")
  print(f"  first run (compile + run): {compile_and_run:.2f} s")
  print(f"  {seconds:.3f} s per batch, {result['sample_s']:.3f} s per sample, "
        f"{result['step_s'] * 1e3:.1f} ms per ODE step "
        f"({result['step_per_sample_s'] * 1e3:.2f} ms per step per sample)")
  return result
