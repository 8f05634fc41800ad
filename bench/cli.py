"""A benchmark's command line, failing as the launchers do: one `error:` line and exit 2.

`run(main, doc, define_flags)` is the launchers' `launch.cli.run` (bad flags and config overrides
in one line, `--help` with the config fields) with every `UserError` or I/O error inside `main`
caught too (`datarater.errors.exit_on_user_error`), and an --out whose folder cannot be made (a
file above it, no write permission) refused before `main` runs (`writable`). `numbers` reads a
comma-list flag, `at_least` bounds an integer flag and `out_folder` makes the output folder at the
start, so that a bad value or an unwritable --out fails at once, not after the runs; `quick_out`
gives a --quick smoke run its own default output; `define_config_check` declares with the flags
the --config sections and top-level fields the benchmark reads and the fields it sets from its
own flags, so that `check_config` refuses an override of any other (it would change nothing)
and --help lists only those read; `quick_sets` refuses a flag that --quick sets. `read_json`
reads another bench's results file, refusing one that is not (a truncated file, another kind) in
one line.
"""
import json
import os
from typing import Callable

from absl import flags

from datarater import config_checks
from datarater.config_checks import INT32_MAX, MAX_SEED
from datarater.errors import UserError, exit_on_user_error
from launch import cli


def run(main: Callable, doc: str, define_flags: Callable = lambda: None) -> None:
  """Runs `main` under absl after `define_flags()` (where a --config file flag belongs: its
  overrides are read when it is defined)."""
  def checked_main(argv):
    out = flags.FLAGS['out'] if 'out' in flags.FLAGS else None
    if out is not None and out.default and not out.value:  # '' names '.json', '.md' in the cwd
      raise UserError(f'--out is empty: give an output prefix (default {out.default!r})')
    if out is not None and out.value:  # selection's '' picks a default later
      writable('out', out.value)
    return main(argv)
  with exit_on_user_error():
    cli.run(checked_main, define_flags, doc)


def writable(flag: str, path: str, folder: bool = False) -> None:
  """Refuses output prefix --`flag` `path` (with `folder`, a folder) unless its folder exists or
  can be made there: a file where a folder should be, or a folder it may not write in. Nothing is
  created."""
  target = os.path.abspath(path if folder else os.path.dirname(path) or '.')
  if not folder and path.endswith(os.sep):
    raise UserError(f'--{flag} {path!r} ends in {os.sep!r}: give a file prefix, e.g. '
                    f'{os.path.join(path, "result")!r}')
  above = target
  while not os.path.exists(above) and above != os.path.dirname(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    if above == os.path.abspath(path):
      raise UserError(f'--{flag} {path!r} is a file, not a folder')
    raise UserError(f'--{flag} {path!r}: {above!r} is a file, not a folder')
  if not os.access(above, os.W_OK | os.X_OK):
    raise UserError(f'--{flag} {path!r}: cannot write in {above!r} (permission denied)')
  taken = [path + ext for ext in ('.json', '.jsonl', '.md', '.png')
           if not folder and os.path.isdir(path + ext)]
  if taken:
    raise UserError(f'--{flag} {path!r}: {taken[0]!r} is a folder, where a results file goes')


def quick_out(prefix: str, quick: bool) -> str:
  """The output prefix of --out `prefix`: with `quick` and --out left at its default, `_quick` is
  added, so that a smoke run does not replace the full run's results in bench/results/."""
  return prefix + '_quick' if quick and not flags.FLAGS['out'].present else prefix


def config_file(default: str) -> Callable:
  """A `define_flags` for `run`: the --config experiment file flag, `default` unless given, a
  policy's and an estimator's own fields it leaves out at their defaults
  (`policies.with_defaults`, as launch.train's; `estimators.with_defaults`, as
  launch.train_rater's)."""
  def define() -> None:
    from datarater import policies  # pylint: disable=g-import-not-at-top  (benches without one)
    from outer_loop import estimators  # pylint: disable=g-import-not-at-top
    cli.define_config_file('config', default, 'Experiment config file.',
                           complete=lambda c: estimators.with_defaults(policies.with_defaults(c)))
  return define


def define_config_check(program: str, sections, set_by=None, depends=(), top_level=()) -> None:
  """Declares, with the benchmark's flags (after its --config), what its runs read of --config:
  the sections `sections` (a tuple, or one made of the parsed flags by `sections(fv)`) and the
  top-level fields `top_level` (e.g. `log_every`), less the fields it sets from its own flags
  (`set_by`: {field: flag}, or made by `set_by(fv)`). `check_config` refuses an override of any
  other field, and --help lists only those read (`cli.define_override_check`, saying that the
  flags `depends` change which)."""
  def check(fv: flags.FlagValues, paths=None) -> None:
    paths = fv['config'].override_values if paths is None else paths
    set_by_flags((set_by(fv) if callable(set_by) else set_by) or {}, paths)
    config = fv['config'].value
    unread = [k for k in config.keys() if not hasattr(config[k], 'keys') and k not in top_level]
    cli.refuse_unread_sections(fv, _READ['sections'](fv), program, top_level=bool(top_level),
                               unread=unread if top_level else (), paths=paths)
  _READ.update(sections=sections if callable(sections) else lambda fv: sections, check=check)
  cli.define_override_check(check, flags.FLAGS, depends)


_READ = {}  # define_config_check's: sections(fv) and the override check


def check_config() -> None:
  """Refuses, in one line, a --config override that no run of the benchmark would read
  (`define_config_check`: a bench.lm_curation --config.train.epochs=0 trained on, unread), then
  `config_checks.validate` of the sections its runs read."""
  _READ['check'](flags.FLAGS)
  config_checks.validate(flags.FLAGS.config, _READ['sections'](flags.FLAGS))


def set_by_flags(fields: dict, paths) -> None:
  """Refuses a --config.FIELD override (among `paths`) of a field of `fields` ({field: the flag
  that sets it}): the benchmark sets it itself, so the override would change nothing."""
  for field, flag in fields.items():
    if field in paths:
      raise UserError(f'--config.{field} is not read by this benchmark: {flag} sets it')


def quick_sets(quick: bool, flag_names=()) -> None:
  """With `quick`, refuses a flag of `flag_names` given on the command line: --quick sets them
  itself, so the value given would change nothing (a --config field it sets: `set_by`)."""
  if not quick:
    return
  given = [f'--{n}' for n in flag_names if flags.FLAGS[n].present]
  if given:
    raise UserError(f'{given[0]} is not read with --quick, which sets it: leave out one of them')


def numbers(flag: str, values, kind: type = float, ok: Callable = lambda x: True,
            within: str = '', empty_ok: bool = False, distinct: bool = False,
            called: str = '') -> list:
  """The items of comma-list flag --`flag` as `kind`; each must pass `ok` (`within` says how);
  at least one unless `empty_ok`; each once if `distinct` (a repeat refused naming the first
  repeated value, and what one is `called`, e.g. 'seed')."""
  if not values and not empty_ok:
    raise UserError(f'--{flag} is empty: give at least one value')
  try:
    out = [kind(v) for v in values]
  except ValueError:
    raise UserError(f'--{flag} must be {kind.__name__}s separated by commas, got '
                    f'{",".join(values)!r}') from None
  bad = [x for x in out if not ok(x)]
  if bad:
    raise UserError(f'--{flag} values must be {within}, got {bad[0]}')
  repeated = [x for x in out if out.count(x) > 1]
  if distinct and repeated:
    named = f'{called} {repeated[0]}' if called else repeated[0]
    raise UserError(f'--{flag} repeats {named}: give each {called or "value"} once')
  return out


def names(flag: str, values, known, empty_ok: bool = False) -> list:
  """The items of comma-list flag --`flag`, each one of `known` and given once; at least one
  unless `empty_ok`."""
  if not values and not empty_ok:
    raise UserError(f'--{flag} is empty: give at least one of {", ".join(known)}')
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise UserError(f'unknown --{flag} {unknown} (choose from {", ".join(known)})')
  repeated = [x for x in values if list(values).count(x) > 1]
  if repeated:
    raise UserError(f'--{flag} repeats {repeated[0]}: give each once')
  return list(values)


def at_least(flag: str, value: int, lo: int) -> int:
  """The value of integer flag --`flag`, refused unless it is >= `lo` (and <= INT32_MAX, as a
  config's steps, sizes and counts are: beyond, the config a benchmark makes of it fails, after
  the runs before it)."""
  if value < lo:
    raise UserError(f'--{flag} must be >= {lo}, got {value}')
  if value > INT32_MAX:
    raise UserError(f'--{flag} must be <= {INT32_MAX}, got {value}')
  return value


def read_json(path: str, what: str, *keys: str) -> dict:
  """The JSON object in results file `path`, which must be `what` (e.g. 'bench.curation results
  file') and hold `keys`."""
  with open(path) as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise UserError(f'{path!r} is not readable JSON ({e}); expected a {what}') from None
  if not isinstance(data, dict):
    raise UserError(f'{path!r} holds a JSON {type(data).__name__}; expected a {what}')
  missing = [k for k in keys if k not in data]
  if missing:
    raise UserError(f'{path!r} is not a {what} (it has no {", ".join(missing)})')
  return data


def out_folder(prefix: str) -> None:
  """Creates the folder of output prefix `prefix` (raises OSError when it cannot)."""
  os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)


def noise_rates(values) -> list:
  """The --noise flag's corruption rates."""
  return numbers('noise', values, float, lambda x: 0 <= x < 1, 'in [0, 1)', distinct=True)


def seeds(values, flag: str = 'seeds') -> list:
  """The seeds of flag --`flag`: distinct (a seed twice would count one model twice)."""
  return numbers(flag, values, int, lambda x: 0 <= x <= MAX_SEED, f'in [0, {MAX_SEED}]',
                 distinct=True, called='seed')
