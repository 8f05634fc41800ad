"""User-facing errors: one line that names the bad value; the launchers print it, no traceback."""
import contextlib
import sys


class UserError(ValueError):
  """Bad input from the user (flags, config, data, workdir). Its message is one line."""


@contextlib.contextmanager
def exit_on_user_error():
  """For a launcher's `main`: a `UserError` inside becomes `error: ...` on stderr and exit 2."""
  try:
    yield
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
