"""One shard of a prepare job: clips -> workers (decode, faces) -> encoders -> shard files."""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import multiprocessing
import json
import os
import time
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool

from data_prep import clips, encode, manifest, shards
from jova_jax import config_lib
from jova_jax.data import features, latent_norm
from jova_jax.text.base import structured_prompt


def clip_options(config, min_face_frac: float, crop_margin: float, detect_every: int):
  v = config.video
  return clips.ClipOptions(
      fps=float(v.fps), frames=int(v.frames), height=int(v.height), width=int(v.width),
      sample_rate=int(config.audio.sample_rate), num_samples=config_lib.audio_num_samples(config),
      face_centered_crop=bool(v.face_centered_crop), min_face_frac=min_face_frac,
      crop_margin=crop_margin, detect_every=detect_every)


def prepared_from(input_path: str, eval_fraction: float, options: clips.ClipOptions,
                  encoders: encode.Encoders) -> dict:
  """What a dataset is made from (stored in its metadata): a run with anything else needs
  --overwrite to replace it."""
  return json.loads(json.dumps({"input": os.path.abspath(input_path), "eval_fraction": eval_fraction,
                                **dataclasses.asdict(options), **encoders.metadata()}))


def prepared_clips(entries, work, workers: int, window: int):
  """(entry, work(entry.path)) in input order, with at most `window` clips in flight.

  workers > 1 runs `work` in a spawn process pool (fork would copy the parent's live JAX
  threads). A worker that dies (a decoder crashing on a clip) breaks the pool: the clip at the
  head is then retried alone in a fresh pool, rejected as `unreadable` if it kills that one too,
  and the clips behind it are resubmitted, so one bad clip costs neither the job nor its
  neighbours.
  """
  if workers <= 1:
    yield from ((entry, work(entry.path)) for entry in entries)
    return
  new_pool = functools.partial(futures.ProcessPoolExecutor, workers,
                               mp_context=multiprocessing.get_context("spawn"))
  pool, pending, todo = new_pool(), collections.deque(), iter(entries)
  try:
    while True:
      for entry in itertools.islice(todo, window - len(pending)):
        pending.append((entry, submit_to(pool, work, entry.path)))
      if not pending:
        return
      entry, future = pending.popleft()
      try:
        result = future.result()
      except BrokenProcessPool:
        pool.shutdown(cancel_futures=True)
        pool = new_pool()
        try:
          result = pool.submit(work, entry.path).result()
        except BrokenProcessPool:
          result = clips.ClipRejected("unreadable", f"{entry.path}: the worker process died on it")
          pool.shutdown(cancel_futures=True)
          pool = new_pool()
        pending = collections.deque((e, submit_to(pool, work, e.path)) for e, _ in pending)
      yield entry, result
  finally:
    pool.shutdown(cancel_futures=True)


def submit_to(pool, work, path) -> futures.Future:
  """pool.submit(work, path); when a clip already in flight has broken the pool, a future that
  fails with BrokenProcessPool instead of raising here, so prepared_clips handles the crash
  when it reaches the head of the queue."""
  try:
    return pool.submit(work, path)
  except BrokenProcessPool as broken:
    failed = futures.Future()
    failed.set_exception(broken)
    return failed


def run_shard(config, input_path: str, out_dir: str, *, num_shards: int = 1, shard_index: int = 0,
              eval_fraction: float = 0.1, workers: int = 1, batch_size: int = 8,
              min_face_frac: float = 0.5, crop_margin: float = 0.5, detect_every: int = 4,
              overwrite: bool = False) -> dict:
  """Prepares this shard's slice of the input clips; returns its report (also written to disk).

  Refuses, before writing anything, an input without clips and (unless `overwrite`) an
  existing dataset in out_dir prepared from another input or settings.
  """
  config_lib.validate(config)
  shards.clean_stale(out_dir)
  entries = manifest.read_inputs(input_path)
  if not entries:
    raise manifest.ManifestError(f"0 clips found in {input_path}; {out_dir} is left as it was")
  splits = manifest.assign_splits([e.clip_id for e in entries], eval_fraction)
  mine = manifest.shard_entries(entries, num_shards, shard_index)
  options = clip_options(config, min_face_frac, crop_margin, detect_every)
  encoders = encode.Encoders(config, batch_size)
  source = prepared_from(input_path, eval_fraction, options, encoders)
  shards.check_replace(out_dir, source, overwrite)
  writer = _ShardWriter(
      encoders=encoders, splits=splits, stage=shards.ShardStage(out_dir, shard_index, num_shards),
      dataset_features=features.dataset_features(config), clock=shards.StageClock(options.frames),
      total=len(mine), norm_sources={"video": latent_norm.source_for(encoders.video),
                                     "audio": latent_norm.source_for(encoders.audio)})
  _prepare_and_write(mine, writer, options, workers, batch_size)
  report = {"shard_index": shard_index, "num_shards": num_shards, "input": input_path,
            "clips": len(mine), "kept": dict(writer.kept), **encoders.metadata(),
            "prepared_from": source, "latent_norm_sources": writer.norm_sources,
            "latent_stats": writer.stats.to_json(), "timings": writer.clock.to_json()}
  writer.stage.commit(report)
  return report


@dataclasses.dataclass
class _ShardWriter:
  """Encodes batches of prepared clips and writes them to this shard's splits."""
  encoders: encode.Encoders
  splits: dict  # clip_id -> split
  stage: shards.ShardStage
  dataset_features: object
  clock: shards.StageClock
  total: int  # the clips of this shard
  norm_sources: dict
  # Of the train split, for the codecs that do not normalise.
  stats: shards.LatentStats = dataclasses.field(default_factory=shards.LatentStats)
  kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def write(self, batch) -> None:
    start = time.perf_counter()
    video, audio, mouth = self.encoders.media([c.frames for _, c in batch],
                                              [c.audio for _, c in batch],
                                              [c.mouth_mask for _, c in batch])
    encoded = time.perf_counter()
    prompts = [structured_prompt(e.captions) for e, _ in batch]
    text_emb = self.encoders.prompts(prompts)
    embedded = time.perf_counter()
    for i, (entry, clip) in enumerate(batch):
      split = self.splits[entry.clip_id]
      for name, latents in (("video", video[i]), ("audio", audio[i])):
        if split == "train" and self.norm_sources[name] == latent_norm.MEASURED:
          self.stats.add(name, latents)
      self.stage.writer(split, self.dataset_features).write({
          "video_latent": video[i], "audio_latent": audio[i], "mouth_mask": mouth[i],
          "text_emb": text_emb[i], "caption": prompts[i], "clip_id": entry.clip_id,
          "face_frac": clip.face_frac})
      self.kept[split] += 1
      self.clock.tick(self.total)
    self.clock.add("encode", encoded - start, len(batch))
    self.clock.add("text", embedded - encoded, len(batch))
    self.clock.add("write", time.perf_counter() - embedded, len(batch))

  def reject(self, entry, reason: str, detail: str) -> None:
    self.stage.rejects.add(entry.clip_id, entry.path, reason, detail)
    self.clock.tick(self.total)


def _prepare_and_write(mine, writer: _ShardWriter, options, workers: int, batch_size: int):
  """Clips with captions -> workers -> batches of batch_size -> writer; rejects recorded."""
  todo = []
  for entry in mine:
    problem = manifest.caption_problem(entry)
    if problem:
      writer.reject(entry, "caption_missing", problem)
    else:
      todo.append(entry)
  batch = []
  work = functools.partial(clips.prepare_or_reject, options=options)
  for entry, result in prepared_clips(todo, work, workers, window=2 * workers + batch_size):
    if isinstance(result, clips.ClipRejected):
      writer.reject(entry, result.reason, result.detail)
      continue
    for name, seconds in result.timings.items():
      writer.clock.add(name, seconds)
    batch.append((entry, result))
    if len(batch) == batch_size:
      writer.write(batch)
      batch = []
  if batch:
    writer.write(batch)
