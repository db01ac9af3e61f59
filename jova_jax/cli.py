"""The one error boundary of every `python -m` entry point (exit codes: docs/design.md
section 8, README).

  cli.run(main)   # instead of absl's app.run(main)

Known errors (a UserError: config, dataset, checkpoint, media, prompt; a usage or flag error; a
missing, misplaced or unreadable path) print `error: ...` in one line and exit 2; a run
stopped by a signal exits 128 + the signal number (130 SIGINT, 143 SIGTERM); anything else
keeps its traceback, since it is a bug to report.
"""
from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from absl import app, flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from jova_jax import host_memory
from jova_jax.errors import UserError

USER_ERROR = 2
# OSErrors about a path the user gave (a file where a folder is expected, no permission).
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


class Stopped(Exception):
  """A run that saved its work and stopped early on a signal; exit status 128 + signum."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def one_line(error: BaseException) -> str:
  """The message of a known error on one line (multi-line messages are joined with '; ')."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    return f"{error.filename}: {error.strerror}"
  message = str(error.args[0]) if len(error.args) == 1 else str(error)
  parts = (re.sub(r"^\s*-\s+", "", part).strip() for part in message.splitlines())
  return "; ".join(part for part in parts if part)


def fail(message: str) -> NoReturn:
  """Prints `error: message` and exits with the user-error status."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR)


_CONFIG_PREFIX = "--config."


def config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without its --config.KEY=VALUE arguments, their 'KEY=VALUE' overrides): the run's
  config comes from its checkpoint, so these are applied to it by loading.load_run."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith(_CONFIG_PREFIX):
      if "=" not in arg:
        fail(f"{arg}: expected --config.KEY=VALUE, e.g. --config.mesh.tensor=1")
      overrides.append(arg[len(_CONFIG_PREFIX):])
    else:
      rest.append(arg)
  return rest, overrides


def _config_file_errors(argv) -> str | None:
  """A missing file given to a config-file flag (ml_collections defers that error until the
  config is first read, deep inside main)."""
  for name in flags.FLAGS:
    if not isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser):
      continue
    for arg in argv[1:]:
      if arg.startswith(f"--{name}="):
        path = arg.split("=", 1)[1].split(":", 1)[0]
        if not os.path.isfile(path):
          return f"--{name}={path}: no such config file"
  return None


def parse_flags(argv):
  """absl flag parsing with one-line errors (unknown config key, wrong type, missing file)."""
  missing = _config_file_errors(argv)
  if missing:
    fail(missing)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(e))
  except (AttributeError, KeyError) as e:  # ml_collections: --config.KEY names no field
    message = str(e).replace("\\", "")  # a KeyError's repr inside an AttributeError
    key = re.search(r"'(\w+)'", message)
    key = key.group(1) if key else message
    given = [a.split("=", 1)[0] for a in argv[1:] if re.search(rf"\.{re.escape(key)}(=|\.|$)", a)]
    hint = re.search(r'Did you mean "(\w+)"', message)
    fail(f"{given[0] if given else key}: no config key {key!r}"
         + (f"; did you mean {hint.group(1)!r}?" if hint else ""))


def _guarded(main):
  def wrapped(argv):
    try:
      return main(argv)
    except Stopped as e:
      print(f"stopped: {e}", file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except (UserError, app.UsageError, flags.Error) + _PATH_ERRORS as e:
      fail(one_line(e))
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
      print("stopped: interrupted", file=sys.stderr, flush=True)
      sys.exit(130)
  return wrapped


def run(main) -> None:
  """app.run(main) behind the error boundary; main's return value is the exit status. First the
  process re-executes itself once with mimalloc or glibc malloc tunables (host_memory.py: a
  third of the CPU train step was page faults)."""
  host_memory.use_malloc_tunables()
  app.run(_guarded(main), flags_parser=parse_flags)
