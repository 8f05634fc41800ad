"""What every launcher shares: flag parsing that fails in one line, --help with the config fields.

`run(main, define_flags, doc)` defines a launcher's flags and runs `main` under absl, with absl's
log at WARNING unless --verbosity is given. A bad flag, config file or config override (an unknown
field, a value of the wrong type) prints one `error:` line and exits 2, like every `UserError` and
I/O error inside `main` (`datarater.errors.exit_on_user_error`). `--help` prints the launcher's
description, its flags and every field of its config, and exits 0. `invoke(module, argv)` runs a
launcher in this process exactly as its command line would (tests use it to try many inputs
quickly).
"""
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

HELP = ('--help', '-h', '--helpfull', '-?')
# What a bad flag or config override raises (ml_collections raises the builtin ones).
OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _fail(e: Exception) -> None:
  """A flag or config error as one `error:` line, exit 2."""
  text = str(e).replace('\\n', '\n').replace("\\'", "'")
  unknown = re.search(r"'(\w+)'.*?Did you mean \"?(\w+)\"?", text, re.S)
  cause = e.args[0] if isinstance(e, AttributeError) and e.args else e  # a field or a section
  if 'Failed loading config file' in text or 'earlier failure to load' in text:
    reason = [l.strip() for l in text.splitlines() if 'Errno' in l or 'Error' in l]
    message = f'cannot load the --config file: {reason[-1] if reason else text.splitlines()[0]}'
  elif unknown and not isinstance(e, flags.Error):
    message = f'unknown config field {unknown.group(1)!r} (did you mean {unknown.group(2)!r}?)'
  elif isinstance(cause, KeyError) and cause.args and isinstance(cause.args[0], str):
    field = cause.args[0].strip("'")  # ml_collections found no close name to suggest
    message = f'unknown config field {field!r}'
  elif not isinstance(e, flags.Error):
    message = f'bad config override: {" ".join(text.split())}'
  else:
    message = ' '.join(text.split())
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_fields(config, prefix: str = '') -> list[str]:
  lines = []
  for key in config.keys():
    value = config[key]
    if hasattr(value, 'keys'):
      lines += _config_fields(value, f'{prefix}{key}.')
    else:
      lines.append(f'  --config.{prefix}{key}={value!r}')
  return lines


def _help(argv, doc: str, fv: flags.FlagValues) -> None:
  print(doc.strip())
  print('\nflags:')
  own = [flag for module, defined in fv.flags_by_module_dict().items()
         if module in ('__main__', argv[0]) or module.startswith('launch.') or
         module.endswith('.py') for flag in defined]
  for flag in sorted({f.name: f for f in own}.values(), key=lambda f: f.name):
    if flag.name != 'config':
      print(f'  --{flag.name}: {flag.help} (default {flag.default!r})')
  if 'config' in fv:
    try:
      fv([argv[0], *[a for a in argv[1:] if a not in HELP]])
      print('\nconfig fields (override any with --config.<field>=<value>):')
      print('\n'.join(_config_fields(fv.config)))
    except Exception:  # pylint: disable=broad-except  (help still lists the flags)
      pass
  sys.exit(0)


def parse_flags(argv, doc: str = '', fv: flags.FlagValues = flags.FLAGS):
  """absl flag parsing with one-line errors (exit 2) and a --help that exits 0."""
  if any(a in HELP for a in argv[1:]):
    _help(argv, doc, fv)
  try:
    rest = fv(argv)
    if 'config' in fv and not isinstance(fv.config, str):  # a config file flag
      fv.config.keys()  # a config file that failed to load raises here
    return rest
  except OVERRIDE_ERRORS + (OSError,) as e:
    _fail(e)


def run(main: Callable, define_flags: Callable, doc: str) -> None:
  try:
    define_flags()  # config_flags reads the --config.* overrides of sys.argv here
  except OVERRIDE_ERRORS as e:
    _fail(e)

  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:  # library chatter (XLA, orbax, TFDS) off
      absl_logging.set_verbosity(absl_logging.WARNING)
    return main(argv)
  app.run(quiet_main, flags_parser=lambda argv: parse_flags(argv, doc))


def invoke(module, argv: list[str]) -> int:
  """Runs launcher `module` (its define_flags and main) on `argv`; returns the exit code."""
  fv = flags.FlagValues()
  try:
    try:
      module.define_flags(fv, argv)
    except OVERRIDE_ERRORS as e:
      _fail(e)
    module.main(parse_flags(argv, module.__doc__, fv), fv)
    return 0
  except SystemExit as e:
    return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
