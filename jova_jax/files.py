"""Writing a file so that it is either finished or absent (never truncated under its name)."""
from __future__ import annotations

import contextlib
import os


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
