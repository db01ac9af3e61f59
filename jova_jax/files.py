"""Writing a file so that it is either finished or absent (never truncated under its name)."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator


@contextlib.contextmanager
def finished_file(path: str):
  """Yields a temporary name beside `path` (same extension, for ffmpeg) and renames it to
  `path` once the block succeeds: a crash or a failed write never leaves a truncated file
  that looks finished."""
  head, tail = os.path.split(path)
  partial = os.path.join(head, f".partial-{tail}")
  try:
    yield partial
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def write_text(path: str, text: str) -> None:
  with finished_file(path) as partial, open(partial, "w") as f:
    f.write(text)


def jsonl_records(path: str) -> Iterator[tuple[int, str, object]]:
  """(line number, "path:line", the parsed value) per non-blank line of a JSONL file; a line
  that is not JSON gives a ValueError naming path:line in place of the value, so the caller
  decides whether one bad line stops the file or is reported beside the others."""
  with open(path) as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f"{path}:{number}"
      try:
        yield number, where, json.loads(raw)
      except json.JSONDecodeError as e:
        yield number, where, ValueError(f"{where}: not valid JSON ({e})")
