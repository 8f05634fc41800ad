"""User-facing errors: one line that names the bad value; the launchers print it, no traceback."""
import contextlib
import os
import re
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
    print(f'error: {_os_error_line(e)}', file=sys.stderr)
    sys.exit(2)
  except MemoryError as e:  # numpy's, for an array a size in the config makes too large
    print(f'error: out of memory ({_first_line(e)}): a size in the config (a batch, a model, a '
          'number of steps) is too large for this machine', file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    # Libraries report a failed write in their own types (orbax a ValueError, TFDS a
    # RuntimeError): an OSError behind one, an OS error code in tensorstore's text or a full disk
    # named in it is still one line.
    cause = _os_error_in(e)
    if cause is not None:
      print(f'error: {_os_error_line(cause)}', file=sys.stderr)
      sys.exit(2)
    code = re.search(r"\[os_error_code='(\d+)'\]", str(e))  # tensorstore's (orbax's writes)
    if code:
      print(f'error: {os.strerror(int(code.group(1)))} ({_first_line(e)})', file=sys.stderr)
      sys.exit(2)
    if 'No space left on device' in str(e):
      print(f'error: no space left on device ({str(e).splitlines()[0][:300]})', file=sys.stderr)
      sys.exit(2)
    if 'out of memory' in str(e).lower():  # XLA's RESOURCE_EXHAUSTED on a device
      print(f'error: out of memory ({_first_line(e)}): a size in the config (a batch, a model, '
            'a number of steps) is too large for this device', file=sys.stderr)
      sys.exit(2)
    raise


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _os_error_in(e: BaseException):
  """The first OSError among `e`'s explicit causes (`raise ... from`), or None. (Not its
  context: an error raised while handling an OSError is a bug of its own.)"""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__
  return None


def _os_error_line(e: OSError) -> str:
  where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
  return f'{" ".join(str(e.strerror or e).split())}{where}'
