"""Inputs of a prepare job: which clips, their captions, the structured prompt, splits and shards."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jova_jax import files
from jova_jax.errors import UserError

CAPTION_KEYS = ("video_caption", "audio_caption", "transcript")


class ManifestError(UserError):
  """An input folder or manifest that cannot be read; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ClipEntry:
  clip_id: str
  path: str
  captions: dict  # CAPTION_KEYS -> str; a key is absent when the input did not give it
  caption_error: str = ""  # why the captions could not be read ('' when they could)


def _entry_from_fields(fields: dict, path: str, where: str) -> ClipEntry:
  clip_id = str(fields.get("clip_id") or os.path.splitext(os.path.basename(path))[0])
  captions = {k: fields[k] for k in CAPTION_KEYS if isinstance(fields.get(k), str)}
  wrong = [k for k in CAPTION_KEYS if k in fields and not isinstance(fields[k], str)]
  error = f"{where}: {', '.join(wrong)} must be strings" if wrong else ""
  return ClipEntry(clip_id=clip_id, path=path, captions=captions, caption_error=error)


def _read_folder(folder: str) -> list[ClipEntry]:
  entries = []
  for name in sorted(os.listdir(folder)):
    if not name.lower().endswith(".mp4"):
      continue
    path = os.path.join(folder, name)
    sidecar = os.path.splitext(path)[0] + ".json"
    fields, error = {}, ""
    if not os.path.exists(sidecar):
      error = f"no caption sidecar {sidecar}"
    else:
      try:
        with open(sidecar) as f:
          fields = json.load(f)
        if not isinstance(fields, dict):
          fields, error = {}, f"{sidecar}: expected a JSON object, found {type(fields).__name__}"
      except (OSError, json.JSONDecodeError) as e:
        error = f"{sidecar}: {e}"
    entry = _entry_from_fields({k: v for k, v in fields.items() if k != "clip_id"}, path, sidecar)
    entries.append(dataclasses.replace(entry, caption_error=error or entry.caption_error))
  return entries


def _read_jsonl(manifest: str) -> list[ClipEntry]:
  base = os.path.dirname(os.path.abspath(manifest))
  entries = []
  for _, where, fields in files.jsonl_records(manifest):
    if isinstance(fields, ValueError):
      raise ManifestError(str(fields))
    if not isinstance(fields, dict) or not isinstance(fields.get("path"), str):
      raise ManifestError(f"{where}: expected an object with a string 'path', found "
                          f"{json.dumps(fields)}")
    path = fields["path"] if os.path.isabs(fields["path"]) else os.path.join(base, fields["path"])
    entries.append(_entry_from_fields(fields, path, where))
  return entries


def read_inputs(input_path: str) -> list[ClipEntry]:
  """Clips of a folder (*.mp4 + NAME.json sidecars) or a JSONL manifest, sorted by clip_id."""
  if os.path.isdir(input_path):
    entries = _read_folder(input_path)
  elif os.path.isfile(input_path):
    entries = _read_jsonl(input_path)
  else:
    raise ManifestError(f"--input={input_path}: no such folder or JSONL manifest")
  seen = {}
  for entry in entries:
    if entry.clip_id in seen:
      raise ManifestError(f"--input={input_path}: clip_id {entry.clip_id!r} is used by both "
                          f"{seen[entry.clip_id]} and {entry.path}")
    seen[entry.clip_id] = entry.path
  return sorted(entries, key=lambda e: e.clip_id)


def caption_problem(entry: ClipEntry) -> str:
  """'' when the clip has usable captions, else why not (a `caption_missing` reject).

  Video and audio captions must be non-empty; the transcript must be present but may be empty
  (a clip without speech).
  """
  if entry.caption_error:
    return entry.caption_error
  missing = [k for k in CAPTION_KEYS if k not in entry.captions]
  empty = [k for k in ("video_caption", "audio_caption") if not entry.captions.get(k, "x").strip()]
  if missing or empty:
    return (f"{entry.path}: " + "; ".join(
        part for part in (f"missing {', '.join(missing)}" if missing else "",
                          f"empty {', '.join(empty)}" if empty else "") if part))
  return ""


def _unit_hash(clip_id: str) -> float:
  digest = hashlib.sha256(clip_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(clip_ids: list[str], eval_fraction: float) -> dict[str, str]:
  """clip_id -> 'train' | 'eval', from a hash of the id alone (stable when clips are added).

  A clip is in eval when its hash falls below eval_fraction; with >= 5 clips and a positive
  fraction, at least the clip with the lowest hash is in eval.
  """
  hashes = {clip_id: _unit_hash(clip_id) for clip_id in clip_ids}
  splits = {c: "eval" if h < eval_fraction else "train" for c, h in hashes.items()}
  if eval_fraction > 0 and len(clip_ids) >= 5 and "eval" not in splits.values():
    splits[min(hashes, key=hashes.get)] = "eval"
  return splits


def shard_entries(entries: list[ClipEntry], num_shards: int, shard_index: int) -> list[ClipEntry]:
  """This shard's deterministic slice: sorted clip ids, every num_shards-th from shard_index."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ManifestError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards})")
  return sorted(entries, key=lambda e: e.clip_id)[shard_index::num_shards]
