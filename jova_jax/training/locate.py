"""A checkpoint path as users give it (a workdir, its checkpoints dir, or one step dir),
resolved once: training's --init_from, sampling's --workdir/--checkpoint and lora merge all
go through locate()."""
from __future__ import annotations

import os
from typing import NamedTuple

from etils import epath

_STATE = "state"  # a step dir holds state/ (training/checkpoint.py)


def absolute_path(path) -> epath.Path:
  """Orbax refuses relative paths ('Checkpoint path should be absolute'); users and scripts
  pass workdirs like runs/demo. Remote paths (gs://...) are absolute already."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


class Location(NamedTuple):
  """A checkpoint a user named: its checkpoints dir and step (None: the latest)."""
  directory: epath.Path
  step: int | None


def locate(path, what: str = "checkpoint") -> Location:
  """The one resolution of a user's checkpoint path (a workdir, checkpoints dir or step dir);
  `what` starts the error message (e.g. '--init_from:'). A Location is returned as it is."""
  if isinstance(path, Location):
    return path
  path = absolute_path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what} {path} does not exist")
  if (path / _STATE).exists() and path.name.isdigit():
    return Location(path.parent, int(path.name))
  if (path / "checkpoints").is_dir():
    return Location(path / "checkpoints", None)
  return Location(path, None)
