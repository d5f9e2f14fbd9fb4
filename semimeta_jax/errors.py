"""The error a user can fix, as opposed to a bug.

`main` prints a `UserError` as one line on stderr and exits with code 2 (no
traceback: a traceback is for bugs). Every check that rejects the user's input
(a config value, a path, a dataset, a run directory) raises a subclass.
"""


class UserError(Exception):
  """A mistake in the command, config, data or run directory; the message says the fix."""


class ConfigError(UserError, ValueError):
  """A configuration field has a value the run cannot use; the message names the field."""


def require(condition: bool, field: str, value, expectation: str) -> None:
  """Raises `ConfigError` naming `config.<field>` unless `condition` holds.

  Shared by `validation.py` and every method's, model's and dataset's own
  `validate`, so all configuration errors read alike.
  """
  if not condition:
    raise ConfigError(f'config.{field}={value!r}: {expectation}.')
