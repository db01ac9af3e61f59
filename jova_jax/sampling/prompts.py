"""The prompts file: one JSON object a line -> Prompt (structured prompt, seed, given media),
bad lines reported by file and line."""
from __future__ import annotations

import dataclasses
import os

from jova_jax import files
from jova_jax.errors import UserError
from jova_jax.text import base as text_base

CAPTION_FIELDS = ("video_caption", "audio_caption", "transcript")
PROMPT_FIELDS = CAPTION_FIELDS + ("prompt", "seed", "image", "audio", "video", "name",
                                  "frames", "height", "width")


class PromptError(UserError):
  """A prompt line that cannot be sampled; the message names the file and line."""


@dataclasses.dataclass
class Prompt:
  line: int               # 1-based line in the prompts file
  name: str               # output file stem
  text: str               # the structured prompt
  seed: int
  image: str | None = None  # I2V reference image
  audio: str | None = None  # given speech: audio-to-video
  video: str | None = None  # given video: video-to-audio


def parse_prompt(record, *, line: int, where: str, default_seed: int, config) -> Prompt:
  """One JSON line -> Prompt; raises PromptError naming `where` (file:line)."""
  if not isinstance(record, dict):
    raise PromptError(f"{where}: expected a JSON object, got {type(record).__name__}")
  unknown = sorted(set(record) - set(PROMPT_FIELDS))
  if unknown:
    raise PromptError(f"{where}: unknown keys {unknown}; known: {list(PROMPT_FIELDS)}")
  if "prompt" in record:
    if any(k in record for k in CAPTION_FIELDS):
      raise PromptError(f"{where}: give either 'prompt' or {list(CAPTION_FIELDS)}, not both")
    prompt = record["prompt"]
  else:
    missing = [k for k in CAPTION_FIELDS if k not in record]
    if missing:
      raise PromptError(f"{where}: missing {missing} (or give a ready 'prompt')")
    if not all(isinstance(record[k], str) for k in CAPTION_FIELDS):
      raise PromptError(f"{where}: {list(CAPTION_FIELDS)} must be strings")
    prompt = text_base.structured_prompt(record)
  if not isinstance(prompt, str) or not prompt.strip():
    raise PromptError(f"{where}: the prompt is empty")
  shapes = {"frames": config.video.frames, "height": config.video.height,
            "width": config.video.width}
  for key, model_value in shapes.items():
    if key in record and record[key] != model_value:
      raise PromptError(f"{where}: asks for {key}={record[key]!r} but the model makes "
                        f"{config.video.frames} frames of {config.video.height}x"
                        f"{config.video.width} (video.{key}={model_value})")
  seed = record.get("seed", default_seed + line - 1)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
    raise PromptError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
  paths = {}
  for key in ("image", "audio", "video"):
    value = record.get(key)
    if value is not None and (not isinstance(value, str) or not value):
      raise PromptError(f"{where}: {key!r} must be a file path, got {value!r}")
    paths[key] = value
  if paths["audio"] and paths["video"]:
    raise PromptError(f"{where}: both 'audio' and 'video' are given: nothing left to generate")
  if paths["image"] and paths["video"]:
    raise PromptError(f"{where}: 'image' and 'video' both fix the video; give one")
  name = record.get("name", f"sample_{line:05d}")
  if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
    raise PromptError(f"{where}: name must be a plain file stem, got {name!r}")
  return Prompt(line=line, name=name, text=prompt, seed=seed, **paths)


def read_prompts(path: str, *, default_seed: int, config) -> tuple[list[Prompt], list[str]]:
  """(good prompts, one error message per bad line). A missing file is an error by itself."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path} does not exist")
  prompts, errors, names = [], [], {}
  base = os.path.dirname(os.path.abspath(path))
  for line, where, record in files.jsonl_records(path):
    try:
      if isinstance(record, ValueError):
        raise PromptError(str(record))
      prompt = parse_prompt(record, line=line, where=where, default_seed=default_seed,
                            config=config)
    except PromptError as e:
      errors.append(str(e))
      continue
    if prompt.name in names:
      errors.append(f"{where}: name {prompt.name!r} is already used on line {names[prompt.name]}")
      continue
    names[prompt.name] = line
    for key in ("image", "audio", "video"):  # relative to the prompts file
      value = getattr(prompt, key)
      if value and not os.path.isabs(value):
        setattr(prompt, key, os.path.join(base, value))
    prompts.append(prompt)
  return prompts, errors
