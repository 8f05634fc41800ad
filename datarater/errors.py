"""User-facing errors: one line that names the bad value; the launchers print it, no traceback."""
import contextlib
import sys


class UserError(ValueError):
  """Bad input from the user (flags, config, data, workdir). Its message is one line."""


@contextlib.contextmanager
def exit_on_user_error():
  """For a launcher's `main`: a `UserError` or an I/O error (read-only or full disk, a path
  under a file) inside becomes one `error: ...` line on stderr and exit 2."""
  try:
    yield
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    print(f'error: {" ".join(str(e.strerror or e).split())}{where}', file=sys.stderr)
    sys.exit(2)
