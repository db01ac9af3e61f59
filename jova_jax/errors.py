"""The base of every error a user can fix (a config key, a flag, a file, a dataset, a
checkpoint): entry points print its message in one line and exit 2 (jova_jax/cli.py).

A ValueError too, so library callers that catch ValueError keep working.
"""


class UserError(ValueError):
  """A problem in the user's input; the message names the key or file, expected and found."""
