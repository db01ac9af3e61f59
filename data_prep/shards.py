"""Shard bookkeeping of a prepare job: staging, rejects, latent statistics, reports, finalize.

Each shard job writes everything into DATASET_DIR/prepare/<tag>.partial-<host>-<pid>/
(ArrayRecord shards through features.ShardWriter, rejects.jsonl, report.json) and swaps that
folder in as DATASET_DIR/prepare/<tag>/ only when it is complete: a rerun replaces a shard's
output as a whole and a crash leaves every finished shard untouched.

`finalize` builds the whole new dataset (TFDS files as hard links to the staged shards,
metadata, rejects.jsonl, and the staging folder moved along) in DATASET_DIR.partial-<host>-<pid>
and swaps it in with two renames, and only when at least one clip was kept: until then the
dataset already in DATASET_DIR is untouched and loadable. `clean_stale` undoes a swap killed
half-way and removes the folders killed jobs left.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import socket
import time

import numpy as np

from jova_jax.data import features, latent_norm

STAGING = "prepare"
REPORT = "report.json"
REJECTS = "rejects.jsonl"
REJECT_REASONS = ("unreadable", "no_audio", "too_short", "no_face", "caption_missing")
STAGES = ("decode", "faces", "encode", "text", "write")
_TAG = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
_LEFTOVER = re.compile(r"\.(?P<kind>partial|old)-(?P<host>.+)-(?P<pid>\d+)$")


def _owner_tag() -> str:
  """Suffix of folders this process writes: host and pid, so that `clean_stale` removes only
  folders of dead processes on its own host (shard jobs on other hosts share the folder)."""
  return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def clean_stale(out_dir: str) -> list[str]:
  """Restores a dataset that a killed finalize had moved aside, then removes the *.partial-*
  and *.old-* folders of dead processes of this host next to and inside DATASET_DIR/prepare.
  Returns the removed paths."""
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir)
  mine = []
  for folder in (parent, os.path.join(out_dir, STAGING)):
    if not os.path.isdir(folder):
      continue
    for entry in sorted(os.listdir(folder)):
      match = _LEFTOVER.search(entry)
      if (match and match["host"] == socket.gethostname() and not _alive(int(match["pid"])) and
          (folder != parent or entry[:match.start()] == name)):
        mine.append((match["kind"], os.path.join(folder, entry)))
  if not os.path.exists(out_dir):
    moved_aside = [path for kind, path in mine if kind == "old" and os.path.dirname(path) == parent]
    if moved_aside:  # killed between the two renames of a swap: the old dataset goes back
      os.replace(moved_aside[-1], out_dir)
      mine = [(k, p) for k, p in mine if p != moved_aside[-1]]
  for _, path in mine:
    shutil.rmtree(path, ignore_errors=True)
    logging.info("removed %s, left by a killed prepare job", path)
  return [path for _, path in mine]


def check_replace(out_dir: str, prepared_from: dict, overwrite: bool) -> None:
  """Refuses to replace a dataset prepared from another input or settings unless `overwrite`."""
  if overwrite or not os.path.exists(os.path.join(out_dir, "metadata.json")):
    return
  found = features.read_metadata(out_dir).get("prepared_from")
  if found == prepared_from:
    return
  if found is None:
    differ = "its metadata.json does not say what it was prepared from"
  else:
    differ = "; ".join(f"{key} was {found.get(key)!r}, now {prepared_from.get(key)!r}"
                       for key in sorted(set(found) | set(prepared_from))
                       if found.get(key) != prepared_from.get(key))
  raise features.DatasetError(f"dataset {out_dir} exists and was prepared differently ({differ}); "
                              f"pass --overwrite to replace it, or choose another --output")


def shard_tag(shard_index: int, num_shards: int) -> str:
  return f"shard-{shard_index:05d}-of-{num_shards:05d}"


class RejectLog:
  """Appends one JSON line per rejected clip as the job goes, and counts them by reason."""

  def __init__(self, path: str):
    self._file = open(path, "a")
    self.counts = collections.Counter()

  def add(self, clip_id: str, path: str, reason: str, detail: str) -> None:
    if reason not in REJECT_REASONS:
      raise ValueError(f"unknown reject reason {reason!r}; expected one of {REJECT_REASONS}")
    self._file.write(json.dumps({"clip_id": clip_id, "path": path, "reason": reason,
                                 "detail": detail}) + "\n")
    self._file.flush()
    self.counts[reason] += 1
    logging.warning("rejected %s (%s): %s", clip_id, reason, detail)

  def close(self) -> None:
    self._file.close()


class LatentStats:
  """Per-channel sum, sum of squares and count of latents (float64), mergeable across shards."""

  def __init__(self):
    self.sums: dict[str, dict] = {}

  def add(self, name: str, latents: np.ndarray) -> None:
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    entry = self.sums.setdefault(name, {"sum": np.zeros(flat.shape[1]),
                                        "sum_sq": np.zeros(flat.shape[1]), "count": 0})
    entry["sum"] += flat.sum(axis=0)
    entry["sum_sq"] += np.square(flat).sum(axis=0)
    entry["count"] += flat.shape[0]

  def to_json(self) -> dict:
    return {name: {"sum": e["sum"].tolist(), "sum_sq": e["sum_sq"].tolist(), "count": e["count"]}
            for name, e in self.sums.items()}

  @staticmethod
  def mean_std(reports: list[dict], name: str, channels: int) -> tuple[list, list]:
    """Merged per-channel mean and std; identity (0, 1) when no shard saw this latent."""
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for report in reports:
      entry = report.get(name)
      if entry:
        total += np.asarray(entry["sum"])
        total_sq += np.asarray(entry["sum_sq"])
        count += entry["count"]
    if count == 0:
      return [0.0] * channels, [1.0] * channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def measured_norm(sources: dict, stats: list[dict], config) -> latent_norm.LatentNorm:
  """The dataset's latent_norm: the merged measured statistics of each modality whose source is
  MEASURED, the identity for the others (and for shard reports from before the contract)."""
  norm = latent_norm.LatentNorm.identity(config)
  streams = {}
  for name in latent_norm.MODALITIES:
    if sources.get(name) == latent_norm.MEASURED:
      channels = int(config[name].latent_channels)
      mean, std = LatentStats.mean_std(stats, name, channels)
      streams[name] = latent_norm.Stream(latent_norm.MEASURED, np.asarray(mean, np.float32),
                                         np.asarray(std, np.float32))
  return dataclasses.replace(norm, **streams)


class StageClock:
  """Seconds and frames per stage, for the progress line, the end summary and --bench."""

  def __init__(self, frames_per_clip: int):
    self.frames_per_clip = frames_per_clip
    self.seconds = collections.Counter()
    self.clips = collections.Counter()
    self.start = time.perf_counter()
    self.done = 0
    self._last_log = self.start

  def add(self, stage: str, seconds: float, clips: int = 1) -> None:
    self.seconds[stage] += seconds
    self.clips[stage] += clips

  def tick(self, total: int, every_s: float = 10.0) -> None:
    """Counts one finished clip (kept or rejected) and logs progress every `every_s` seconds."""
    self.done += 1
    now = time.perf_counter()
    if now - self._last_log >= every_s or self.done == total:
      self._last_log = now
      logging.info("prepare: %d/%d clips, %.2f clips/s", self.done, total,
                   self.done / max(now - self.start, 1e-9))

  def to_json(self) -> dict:
    wall = time.perf_counter() - self.start
    stages = {s: {"seconds": self.seconds[s], "clips": self.clips[s],
                  "frames_per_s": self.clips[s] * self.frames_per_clip / self.seconds[s]
                  if self.seconds[s] else None} for s in STAGES}
    return {"wall_s": wall, "clips": self.done, "clips_per_s": self.done / max(wall, 1e-9),
            "stages": stages}


def summary_lines(kept: dict, rejects: dict, timings: dict) -> list[str]:
  lines = [f"kept {sum(kept.values())} clips ({', '.join(f'{k} {v}' for k, v in sorted(kept.items()))}); "
           f"rejected {sum(rejects.values())}" +
           (f" ({', '.join(f'{k} {v}' for k, v in sorted(rejects.items()))})" if rejects else ""),
           f"{timings['clips']} clips in {timings['wall_s']:.1f}s: {timings['clips_per_s']:.2f} clips/s"]
  for stage, t in timings["stages"].items():
    rate = f"{t['frames_per_s']:.1f} frames/s" if t["frames_per_s"] else "-"
    lines.append(f"  {stage:7s} {t['clips']:5d} clips {t['seconds']:8.2f}s  {rate}")
  return lines


class ShardStage:
  """The partial folder of one shard job, swapped in by `commit`."""

  def __init__(self, out_dir: str, shard_index: int, num_shards: int):
    self.out_dir = out_dir
    self.tag = shard_tag(shard_index, num_shards)
    self.final_dir = os.path.join(out_dir, STAGING, self.tag)
    self.num_shards = num_shards
    self.dir = f"{self.final_dir}.partial-{_owner_tag()}"
    shutil.rmtree(self.dir, ignore_errors=True)
    os.makedirs(self.dir)
    self.rejects = RejectLog(os.path.join(self.dir, REJECTS))
    self._writers: dict[str, features.ShardWriter] = {}

  def writer(self, split: str, dataset_features) -> features.ShardWriter:
    if split not in self._writers:
      self._writers[split] = features.ShardWriter(self.dir, split, self.tag, dataset_features)
    return self._writers[split]

  def commit(self, report: dict) -> str:
    """Closes the shards, writes the report and swaps the folder in; returns the report path."""
    report["shards"] = {}
    for split, writer in self._writers.items():
      shard = writer.close()
      shard["path"] = os.path.relpath(shard["path"], self.dir)
      report["shards"][split] = shard
    report["rejects"] = dict(self.rejects.counts)
    self.rejects.close()
    with open(os.path.join(self.dir, REPORT), "w") as f:
      json.dump(report, f, indent=1)
    _swap_in(self.dir, self.final_dir)
    for folder in glob.glob(os.path.join(self.out_dir, STAGING, "shard-*")):
      match = _TAG.match(os.path.basename(folder))
      if match and int(match[2]) != self.num_shards:  # an earlier run with another --num_shards
        shutil.rmtree(folder, ignore_errors=True)
    return os.path.join(self.final_dir, REPORT)


def _swap_in(new: str, final: str) -> None:
  """Replaces folder `final` by `new`: two renames; clean_stale undoes a kill between them."""
  old = f"{final}.old-{_owner_tag()}"
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(new, final)
  shutil.rmtree(old, ignore_errors=True)


def read_reports(out_dir: str) -> list[tuple[str, dict]]:
  """(shard folder, report) of every finished shard; all of one run (same num_shards), complete."""
  found = {}
  for folder in glob.glob(os.path.join(out_dir, STAGING, "shard-*")):
    match = _TAG.match(os.path.basename(folder))
    if match and os.path.exists(os.path.join(folder, REPORT)):
      found[(int(match[1]), int(match[2]))] = folder
  if not found:
    raise features.DatasetError(f"dataset {out_dir}: no finished shard reports under "
                                f"{os.path.join(out_dir, STAGING)}/shard-*/{REPORT}")
  totals = sorted({n for _, n in found})
  if len(totals) > 1:
    raise features.DatasetError(f"dataset {out_dir}: shard reports of runs with different --num_shards "
                                f"{totals} in {os.path.join(out_dir, STAGING)}; delete the stale ones")
  missing = [i for i in range(totals[0]) if (i, totals[0]) not in found]
  if missing:
    raise features.DatasetError(f"dataset {out_dir}: shards {missing} of {totals[0]} have not finished "
                                f"(no {REPORT}); run them with --shard_index before finalize")
  out = []
  for key in sorted(found):
    with open(os.path.join(found[key], REPORT)) as f:
      out.append((found[key], json.load(f)))
  return out


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:  # file systems without hard links
    shutil.copyfile(src, dst)


def _merge_rejects(shard_reports: list, path: str) -> None:
  with open(path + ".tmp", "w") as out:
    for folder, _ in shard_reports:
      with open(os.path.join(folder, REJECTS)) as f:
        shutil.copyfileobj(f, out)
  os.replace(path + ".tmp", path)


def _agreed(out_dir: str, reports: list[dict], key: str):
  described = {json.dumps(r.get(key), sort_keys=True) for r in reports}
  if len(described) > 1:
    raise features.DatasetError(f"dataset {out_dir}: shards disagree on {key}: {sorted(described)}; "
                                f"rerun the shards that differ")
  return reports[0].get(key)


def finalize(out_dir: str, config) -> dict:
  """Merges the shard reports into rejects.jsonl and the TFDS dataset, and swaps it in as
  DATASET_DIR (module docstring); returns the metadata."""
  out_dir = os.path.abspath(out_dir)
  clean_stale(out_dir)
  shard_reports = read_reports(out_dir)
  reports = [r for _, r in shard_reports]
  metadata = features.default_metadata(config)
  for key in ("video_codec", "audio_codec", "text_encoder", "prepared_from"):
    metadata[key] = _agreed(out_dir, reports, key)
  if not any(sum(r["kept"].values()) for r in reports):
    failed = os.path.join(out_dir, STAGING, REJECTS)
    _merge_rejects(shard_reports, failed)
    raise features.DatasetError(f"all {sum(r['clips'] for r in reports)} clips rejected, see "
                                f"{failed}; {out_dir} is left as it was")
  new_dir = f"{out_dir}.partial-{_owner_tag()}"
  shutil.rmtree(new_dir, ignore_errors=True)
  for folder, report in shard_reports:
    for split, shard in report["shards"].items():
      split_dir = os.path.join(new_dir, features.PENDING_DIR, split)
      os.makedirs(split_dir, exist_ok=True)
      _link_or_copy(os.path.join(folder, shard["path"]),
                    os.path.join(split_dir, os.path.basename(shard["path"])))
  metadata["latent_norm"] = measured_norm(
      _agreed(out_dir, reports, "latent_norm_sources") or {},
      [r["latent_stats"] for r in reports], config).to_json()
  rejects = collections.Counter()
  for r in reports:
    rejects.update(r["rejects"])
  metadata["rejects"] = dict(rejects)
  features.finalize(new_dir, features.dataset_features(config), metadata)
  if sum(r["kept"].get("eval", 0) for r in reports) == 0:
    logging.warning("dataset %s has no 'eval' split (no kept clip hashed into it): training with "
                    "eval.every_steps > 0 will stop; rerun with a larger --eval_fraction or set "
                    "eval.every_steps=0", out_dir)
  _merge_rejects(shard_reports, os.path.join(new_dir, REJECTS))
  # The staged shards move with the dataset, so that finalize can run again after a shard rerun.
  os.replace(os.path.join(out_dir, STAGING), os.path.join(new_dir, STAGING))
  _swap_in(new_dir, out_dir)
  return features.read_metadata(out_dir)
