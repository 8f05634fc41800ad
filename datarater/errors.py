"""User-facing errors: one line that names the bad value; the launchers print it, no traceback."""


class UserError(ValueError):
  """Bad input from the user (flags, config, data, workdir). Its message is one line."""
