"""What every launcher shares: flag parsing that fails in one line, --help with the config fields.

`run(main, define_flags, doc)` defines a launcher's flags and runs `main` under absl, with absl's
log at WARNING unless --verbosity is given. A bad flag, config file (`define_config_file`: one
that is missing, does not compile, has no get_config or whose get_config fails) or config override
(an unknown field, a value of the wrong type), a string flag or override with leading or
trailing whitespace (`--workdir=' '`), or a list flag or tuple field given twice, prints one
`error:` line and exits 2, like every `UserError` and I/O error inside `main`
(`datarater.errors.exit_on_user_error`); in a process of a multi-process job such a flag error
stops every process (`_job_stopped_on_flag_error`).
`--help` prints the launcher's description, its flags and the fields of its config it reads
(those its `define_override_check` and `config_checks.unread_while` pass with the flags given),
every field of any other config file flag (e.g. a benchmark's --bench), and exits 0.
`invoke(module, argv)` runs a launcher's flags and `main` in this process as its command line
would, without absl's own flags (--verbosity), signal handlers or compilation cache (tests use
it to try many inputs quickly).
"""
import ast
import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import ml_collections
from ml_collections import config_flags

from datarater.errors import UserError
from launch import interrupts

HELP = ('--help', '-h', '--helpfull', '-?')


class ConfigFileError(Exception):
  """A config file flag's file that cannot be loaded; the message is the one error line."""


# What a bad flag, config file or config override raises (ml_collections raises the builtin ones).
OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, ConfigFileError)


def _why(e: BaseException) -> str:
  """Why a config file did not load, in one line."""
  if isinstance(e, SyntaxError):
    return f'{type(e).__name__}: {e.msg}' + (f' (line {e.lineno})' if e.lineno else '')
  if isinstance(e, AttributeError) and getattr(e, 'name', None) == 'get_config':
    return 'it defines no get_config()'
  if isinstance(e, OSError):  # the file's own error, after ml_collections' account of it
    errno = [l.strip() for l in str(e.__cause__ or e).splitlines() if 'Errno' in l]
    return re.sub(r'^\[Errno \d+\] ', '', errno[-1]) if errno else ' '.join(str(e).split())
  return f'{type(e).__name__}: {" ".join(str(e).split())}'


class _ConfigFileParser(flags.ArgumentParser):
  """ml_collections' config file parser `inner`, with every failure to load the file raised at
  once as one `ConfigFileError` line naming it (ml_collections lets a SyntaxError through, defers
  a missing file, and writes a traceback into the message of an error in get_config)."""

  def __init__(self, name: str, inner: flags.ArgumentParser, complete: Optional[Callable] = None):
    self.name, self.inner, self.complete = name, inner, complete

  def flag_type(self) -> str:
    return self.inner.flag_type()

  def parse(self, path):
    absl_log = logging.getLogger('absl')
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # its warning on a get_config() that returns None
    # ml_collections runs the file in module `<name>_config`; one loaded before in this process
    # (launch.cli.invoke) would lend the new file its get_config.
    sys.modules.pop(f'{self.name}_config', None)
    try:
      config = self.inner.parse(path)
      if not isinstance(config, ml_collections.ConfigDict):
        getattr(config, 'keys', None)  # a file that could not be read: its stand-in raises here
        raise TypeError(f'get_config() returned {type(config).__name__}, not a ConfigDict')
      if self.complete:
        config = self.complete(config)
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except  (anything the file's
      # code raises; a sys.exit() in it left its own exit code and no line)
      cause = e.__context__ if 'Error whilst parsing config file' in str(e) else e
      raise ConfigFileError(f'cannot load --{self.name} {path!r}: {_why(cause)}') from None
    finally:
      absl_log.setLevel(level)
    return config


def define_config_file(name: str, default: str, help_string: str,
                       fv: flags.FlagValues = flags.FLAGS, argv=None,
                       complete: Optional[Callable] = None):
  """`config_flags.DEFINE_config_file`, with a file that fails to load refused in one line;
  `complete(config) -> config` fills in fields the file may leave out, before the command line's
  overrides (e.g. `policies.with_defaults`: a policy's own fields, then overridable)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=fv,
                                           sys_argv=argv)
  fv[name].parser = _ConfigFileParser(name, fv[name].parser, complete)
  fv.set_default(name, default)  # parsed now unless the command line names the file
  return holder


def _override_of(field: str, argv) -> str:
  """The `--config.a.b` override of `argv` whose path holds `field`, if one alone does ('' if
  none or several): ml_collections names only the unknown part of the path."""
  found = {f'--{name}' for name in (a.lstrip('-').split('=', 1)[0] for a in argv or ()
                                    if a.startswith('-'))
           if '.' in name and field in name.split('.')[1:]}
  return found.pop() if len(found) == 1 else ''


def _fail(e: Exception, argv=None) -> None:
  """A flag or config error as one `error:` line, exit 2."""
  text = str(e).replace('\\n', '\n').replace("\\'", "'")
  unknown = re.search(r"'(\w+)'.*?Did you mean \"?(\w+)\"?", text, re.S)
  cause = e.args[0] if isinstance(e, AttributeError) and e.args else e  # a field or a section
  if isinstance(e, ConfigFileError):
    message = str(e)
  elif isinstance(e, UnicodeDecodeError):  # absl reading a --flagfile
    named = [a.split('=', 1)[-1] for a in argv or () if a.lstrip('-').startswith('flagfile=')]
    message = f'--flagfile {", ".join(map(repr, named))} is not text ({e.reason} at byte {e.start})'
  elif unknown and not isinstance(e, flags.Error):
    where = _override_of(unknown.group(1), argv)
    message = (f'unknown config field {unknown.group(1)!r} (did you mean {unknown.group(2)!r}?)'
               + (f': {where}' if where else ''))
  elif isinstance(cause, KeyError) and cause.args and isinstance(cause.args[0], str):
    field = cause.args[0].strip("'")  # ml_collections found no close name to suggest
    where = _override_of(field, argv)
    message = f'unknown config field {field!r}' + (f': {where}' if where else '')
  elif not isinstance(e, flags.Error):
    message = f'bad config override: {" ".join(text.split())}'
  else:
    message = ' '.join(text.split())
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _leaves(config, prefix: str = ''):
  """(dotted path, value) of every field of `config`, sections walked."""
  for key in config.keys():
    if hasattr(config[key], 'keys'):
      yield from _leaves(config[key], f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config[key]


def own_flags(fv: flags.FlagValues = flags.FLAGS, program: str = '') -> list:
  """The flags a program defines itself (not absl's, JAX's or a library's), by name: those of
  its main module `program` (default: sys.argv[0]) and of launch.*; what --help lists."""
  program = program or sys.argv[0]
  own = [flag for module, defined in fv.flags_by_module_dict().items()
         if module in ('__main__', program) or module.startswith('launch.') or
         module.endswith('.py') for flag in defined]
  return sorted({f.name: f for f in own}.values(), key=lambda f: f.name)


def _help(argv, doc: str, fv: flags.FlagValues) -> None:
  print(doc.strip())
  print('\nflags:')
  for flag in own_flags(fv, argv[0]):
    config_file = isinstance(flag.parser, _ConfigFileParser)  # its default: the file's path
    default = flag.default_as_str if config_file else repr(flag.default)
    print(f'  --{flag.name}: {flag.help} (default {default})')
  files = sorted((f for f in fv if isinstance(fv[f].parser, _ConfigFileParser)),
                 key=lambda f: (f != 'config', f))  # --config, then e.g. a bench's --bench
  if files:
    try:
      fv([argv[0], *[a for a in argv[1:] if a not in HELP]])
      if 'config' in files:
        read = _read_fields(fv)
    except Exception as e:  # pylint: disable=broad-except  (help still lists the flags)
      print(f'\nconfig fields: none listed ({" ".join(str(e).split())[:200]})')
    else:
      for name in files:
        print(f'\n{name} fields (override any with --{name}.<field>=<value>):')
        for note in _read_notes(fv, read) if name == 'config' else ():
          print(f'  {note}')
        print('\n'.join(f'  --{name}.{path}={value!r}' for path, value in _leaves(fv[name].value)
                        if name != 'config' or path in read))
  sys.exit(0)


def _read_fields(fv: flags.FlagValues) -> set[str]:
  """The dotted fields of --config an override of which the launcher would read with the flags
  given: those its override check (`define_override_check`) and `_unread_field` pass."""
  check, _ = _OVERRIDE_CHECKS.get(fv, (lambda fv, paths: None, ()))
  check(fv, [])  # a flag the check refuses whatever the field (an unknown --policy)
  read = set()
  for path, _ in _leaves(fv['config'].value):
    try:
      check(fv, [path])
    except UserError:
      continue
    if _unread_field([f'config.{path}'], fv) is None:
      read.add(path)
  return read


def _read_notes(fv: flags.FlagValues, read: set[str]) -> list[str]:
  """What --help says of the config fields it leaves out (`read`: those it lists): the sections
  and fields the launcher does not read, and the flags that change which it reads."""
  config, notes = fv['config'].value, []
  _, depends = _OVERRIDE_CHECKS.get(fv, (None, ()))
  if depends:
    notes.append(f'(which are read depends on {" and ".join(depends)}: give '
                 f'{"them" if len(depends) > 1 else "it"} with --help)')
  unread = [k for k in config.keys() if not any(p == k or p.startswith(f'{k}.') for p in read)]
  others = sum(1 for p, _ in _leaves(config) if p.split('.')[0] not in unread) - len(read)
  if unread or others:
    notes.append(f'(not read, so refused: {", ".join(unread) or "no section"}'
                 + (f' and {others} other fields' if others else '') + ')')
  return notes


def parse_flags(argv, doc: str = '', fv: flags.FlagValues = flags.FLAGS):
  """absl flag parsing with one-line errors (exit 2) and a --help that exits 0."""
  if any(a in HELP for a in argv[1:]):
    _help(argv, doc, fv)
  try:
    parsed = fv(argv)  # a config file flag (define_config_file) loads its file here
  except OVERRIDE_ERRORS + (OSError,) as e:
    _fail(e, argv)
  _refuse_padded_strings(fv)
  _refuse_joined_tuples(argv, fv)
  _refuse_repeated_lists(argv, fv)
  _refuse_unordered_tuples(argv, fv)
  _refuse_unread_fields(argv, fv)
  if len(parsed) > 1:  # no launcher reads one: a word split off a flag's value (a space in it)
    print(f'error: unexpected argument {parsed[1]!r} (flags are --name=value; quote a value '
          'holding spaces)', file=sys.stderr)
    sys.exit(2)
  return parsed


def _given(argv, fv: flags.FlagValues) -> list[str]:
  """The names of the flags `argv` gives, in every spelling absl reads: -config.x or --config.x,
  and the lines of a --flagfile."""
  return [a.lstrip('-').split('=', 1)[0]
          for a in fv.read_flags_from_files(argv[1:], force_gnu=False) if a.startswith('-')]


def _field(config, path: str):
  """The value of the dotted field `path` of `config`, None if it has none."""
  for part in path.split('.'):
    config = config[part] if hasattr(config, 'keys') and part in config else None
  return config


def _refuse_padded_strings(fv: flags.FlagValues) -> None:
  """A string flag or config override given with leading or trailing whitespace: as a path
  (`--workdir=' '`, `--config.data.data_dir=' '`) it named a folder ' ' in the current one, and
  no name, split or path of these commands holds such a value."""
  given = {f'--{name}': fv[name].value for name in fv if fv[name].present}
  for name in [f for f in fv if isinstance(fv[f].parser, _ConfigFileParser)]:
    given.update({f'--{name}.{field}': value
                  for field, value in fv[name].override_values.items()})
  for name, value in given.items():
    if isinstance(value, str) and value != value.strip():
      print(f'error: {name}={value!r} starts or ends with whitespace: give it without',
            file=sys.stderr)
      sys.exit(2)


def _refuse_joined_tuples(argv, fv: flags.FlagValues) -> None:
  """A tuple field overridden twice: ml_collections joins the two tuples (a scalar field keeps
  the last value, as absl flags do), which no one means."""
  given = _given(argv, fv)
  for flag in [f for f in fv if isinstance(fv[f].parser, _ConfigFileParser)]:  # --config, --bench
    names = [a[len(flag) + 1:] for a in given if a.startswith(f'{flag}.')]
    for name in sorted({n for n in names if names.count(n) > 1}):
      value = _field(fv[flag].value, name)
      if isinstance(value, tuple):
        print(f'error: --{flag}.{name} is given twice (the tuples would be joined, '
              f'{value!r}); give it once', file=sys.stderr)
        sys.exit(2)


def _refuse_repeated_lists(argv, fv: flags.FlagValues) -> None:
  """A list flag given twice (command line or flagfile): absl keeps the last list
  (`launch.filter --split=test --split=train` filtered train alone), which reads as both."""
  given = _given(argv, fv)
  for name in sorted({n for n in given if given.count(n) > 1}):
    if (name in fv and isinstance(fv[name].parser, flags.BaseListParser)
        and not isinstance(fv[name], flags.MultiFlag)):
      print(f'error: --{name} is given twice (the last, {",".join(fv[name].value)}, would '
            f'replace the others); give it once, its values separated by commas',
            file=sys.stderr)
      sys.exit(2)


def _refuse_unordered_tuples(argv, fv: flags.FlagValues) -> None:
  """A tuple field overridden with a dict or set literal: ml_collections makes a tuple of the
  dict's keys (`--config.train.seeds={1: 2}` trained seed 1 alone) or of the set in no set
  order."""
  for arg in fv.read_flags_from_files(argv[1:], force_gnu=False):
    name, _, text = arg.lstrip('-').partition('=')
    flag = name.split('.')[0]
    if ('.' not in name or flag not in fv or not isinstance(fv[flag].parser, _ConfigFileParser)
        or not isinstance(_field(fv[flag].value, name[len(flag) + 1:]), tuple)):
      continue
    try:
      literal = ast.literal_eval(text)
    except (SyntaxError, ValueError):  # a bare word: ml_collections' one-string tuple
      continue
    if isinstance(literal, (dict, set)):
      print(f'error: --{name}={text} is a {type(literal).__name__}: give a tuple, e.g. '
            f'--{name}=(1, 2)', file=sys.stderr)
      sys.exit(2)


def _shown(value) -> str:
  """A config value in an error line: a float as %g, a section as {field=value, ...}."""
  if hasattr(value, 'keys'):
    return '{' + ', '.join(f'{k}={_shown(value[k])}' for k in value.keys()) + '}'
  return f'{value:g}' if isinstance(value, float) else repr(value)


_VALUATION_METHODS = weakref.WeakKeyDictionary()  # FlagValues -> define_valuation_method's


_OVERRIDE_CHECKS = weakref.WeakKeyDictionary()  # FlagValues -> define_override_check's


def define_override_check(check: Callable[[flags.FlagValues, Optional[list[str]]], None],
                          fv: flags.FlagValues = flags.FLAGS, depends=()) -> None:
  """Declares, with a launcher's flags, its check of config overrides (its `check_flags`):
  `check(fv, paths)` of the parsed flags raises a UserError for a dotted field among `paths` (None:
  those the command line overrides) that the run would not read. --help lists the fields it
  passes, saying that the flags `depends` (e.g. '--policy') change which."""
  _OVERRIDE_CHECKS[fv] = check, tuple(depends)


def define_valuation_method(method: Callable[[flags.FlagValues], Optional[tuple[str, str]]],
                            fv: flags.FlagValues = flags.FLAGS) -> None:
  """Declares, with a launcher's flags, the valuation method its run computes: `method(fv)` of
  the parsed flags is (the method, the flag or field naming it, e.g. '--method=tracin'), or None
  where the run computes none. `config_checks.UNREAD_WHILE`'s rows naming `METHOD` take it."""
  _VALUATION_METHODS[fv] = method


def _refuse_unread_fields(argv, fv: flags.FlagValues) -> None:
  """`_unread_field` of the flags `argv` gives, in one line, exit 2."""
  message = _unread_field(_given(argv, fv), fv)
  if message:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def _unread_field(given: list[str], fv: flags.FlagValues) -> Optional[str]:
  """Why a field among the flags `given` (`_given`) is not read, where the config (and the
  launcher's valuation method, `define_valuation_method`) make the run ignore it
  (`config_checks.unread_while`: `sae.steps` while `sae.epochs` > 0, `data.noise_seed` while
  nothing is corrupted, `valuation.projection` for TracIn without `valuation.tracin_project`);
  None if every one is read. A rule whose config fields the config lacks is skipped."""
  from datarater.config_checks import METHOD, unread_while  # pylint: disable=g-import-not-at-top
  if 'config' not in fv or not isinstance(fv['config'].parser, _ConfigFileParser):
    return None
  method = None
  for field, other, unread, why in unread_while():
    named = [g for g in given if g == f'config.{field}' or g.startswith(f'config.{field}.')]
    if not named:
      continue
    others = (other,) if isinstance(other, str) else other
    if METHOD in others and method is None:
      method = _VALUATION_METHODS.get(fv, lambda _: None)(fv) or (None, None)
    values = [method[0] if n == METHOD else _field(fv['config'].value, n) for n in others]
    if any(v is None for n, v in zip(others, values) if n != METHOD):
      continue
    if unread(*values):
      shown = ', '.join(method[1] if n == METHOD else f'{n}={_shown(v)}'
                        for n, v in zip(others, values) if v is not None)
      return f'--{named[0]} is not read while {shown}{why.format(other=others[0])}'
  return None


def refuse_unread_sections(fv: flags.FlagValues, sections, launcher: str,
                           top_level: bool = False, unread=(), paths=None) -> None:
  """A `--config.<section>.<field>` override (command line or flagfile) of a section the
  launcher's run does not read (`sections`), or of a top-level field (`seed`, `log_every`,
  `checkpoint_every`) unless it reads them (`top_level`), changes nothing: refused in one line
  (e.g. train.learning_rate to launch.train_rater, whose inner rate is inner.learning_rate);
  so is one of `unread`, sections of `sections` or dotted fields of them the run leaves unread
  (e.g. data.eval_split to launch.valuate). `paths`: the dotted fields overridden (default: those
  the command line gives)."""
  paths = fv['config'].override_values if paths is None else paths
  for path in paths:
    hit = [u for u in unread if path == u or path.startswith(f'{u}.')]
    if hit:
      raise UserError(f'--config.{path} is not read by {launcher}, which leaves '
                      f'{", ".join(unread)} unread')
  sections = [s for s in sections if s not in unread]
  read, config = {s.split('.')[0] for s in sections}, fv['config'].value
  for path in paths:
    top = path.split('.')[0]
    if top not in config or (top_level if not hasattr(config[top], 'keys') else top in read):
      continue
    raise UserError(f'--config.{path} is not read by {launcher}: it reads the config sections '
                    f'{", ".join(sections)}' + (' and no top-level field' if not top_level else ''))


def _job_stopped_on_flag_error(parse: Callable):
  """`parse()`; if it exits 2 (a flag error, its line printed) in a process of a multi-process
  job, every other process stops too (`distributed.stop_job_after_flag_error`)."""
  try:
    return parse()
  except SystemExit as e:
    if e.code == 2:
      from launch import distributed  # pylint: disable=g-import-not-at-top
      distributed.stop_job_after_flag_error(sys.argv)
    raise


def run(main: Callable, define_flags: Callable, doc: str) -> None:
  def define():
    try:
      define_flags()  # config_flags reads the --config.* overrides of sys.argv here
    except OVERRIDE_ERRORS as e:
      _fail(e, sys.argv)
  _job_stopped_on_flag_error(define)

  def quiet_main(argv):
    if not flags.FLAGS['verbosity'].present:  # library chatter (XLA, orbax, TFDS) off
      absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      return main(argv)
    finally:
      interrupts.disarm()
  interrupts.install()
  process_compilation_cache()
  app.run(quiet_main, flags_parser=lambda argv: _job_stopped_on_flag_error(
      lambda: parse_flags(argv, doc)))


def compilation_cache(folder: str) -> None:
  """Compiled programs kept in `folder`: a program lowered alike again (another trainer's, a
  subset of equal size) loads instead of compiling."""
  jax.config.update('jax_compilation_cache_dir', folder)
  for option in ('jax_persistent_cache_min_compile_time_secs',
                 'jax_persistent_cache_min_entry_size_bytes'):
    if option.upper() not in os.environ:  # thresholds a user set stay
      jax.config.update(option, 0)


def process_compilation_cache() -> None:
  """`compilation_cache` in JAX_COMPILATION_CACHE_DIR (kept across runs), else in a temporary
  folder of this process, removed at exit. JAX writes cache entries from process 0 only, and on
  CPU its cache keys hold a fingerprint of each process's own topology: in a multi-process job
  the other processes compile every program for themselves, a shared folder too."""
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if not folder:
    # This process's own cache saves compiles within the run only: a full temporary folder (a
    # small /tmp) costs those, not two lines of JAX's warning for each entry it could not
    # write, or wrote cut short and cannot read.
    warnings.filterwarnings('ignore', 'Error (writing|reading) persistent compilation cache entry',
                            UserWarning)
    folder = tempfile.mkdtemp(prefix='datarater-xla-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  compilation_cache(folder)


def invoke(module, argv: list[str]) -> int:
  """Runs launcher `module` (its define_flags and main) on `argv`; returns the exit code."""
  fv = flags.FlagValues()
  try:
    try:
      module.define_flags(fv, argv)
    except OVERRIDE_ERRORS as e:
      _fail(e, argv)
    module.main(parse_flags(argv, module.__doc__, fv), fv)
    return 0
  except SystemExit as e:
    return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
