"""Every command the docs show parses: the README's, WORKSPACE.md's and those in the docstrings of
the launchers, benchmarks and configs. Its module exists, its flags and config overrides are
known and well typed, its --config file loads, and its launcher reads every override (its
`check_flags`); nothing runs.

Each command runs in its own process (`tests.forked`) up to its flag parsing (through
`launch.cli.run`) and the launcher's `check_flags`, where it exits.
"""
import ast
import glob
import os
import re
import shlex
import sys

from tests import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shown to be completed by the reader: elided flags, the README's own-model files (which
# tests/test_readme.py runs), and placeholders that are not values of their flags' types.
PLACEHOLDERS = ('...', 'my_config.py', '--num_processes=N', '--config=CONFIG')
COMMAND = re.compile(r'python -m ((?:bench|launch)\.\w+)(.*)')


def _command(text: str):
  """(module, argv) of a `python -m bench.X|launch.X ...` line, or None for a placeholder."""
  text = ' '.join(re.sub(r'\[(--[^]]*)\]', r'\1', text).split())  # [--optional] flags
  match = COMMAND.search(text)
  if not match or any(p in text for p in PLACEHOLDERS):
    return None
  return match.group(1), shlex.split(match.group(2), comments=True)


def _commands_in(text: str) -> list[str]:
  """The lines of fenced blocks, the inline code spans and the other lines (a docstring's usage
  lines) that hold a `python -m` command; a line ending in a backslash continues."""
  lines = []
  for block in re.findall(r'```[a-z]*\n(.*?)```', text, re.S):
    lines += block.replace('\\\n', ' ').splitlines()
  text = re.sub(r'```[a-z]*\n.*?```', '', text, flags=re.S)
  lines += re.findall(r'`([^`]*python -m [^`]*)`', text)
  text = re.sub(r'`[^`]*`', '', text)
  return lines + [l for l in text.replace('\\\n', ' ').splitlines() if 'python -m' in l]


def documented_commands() -> list[tuple[str, list[str], str]]:
  """(module, argv, where) of every documented command."""
  found = []
  for name in ('README.md', 'WORKSPACE.md'):
    found += [(line, name) for line in _commands_in(open(os.path.join(ROOT, name)).read())]
  for path in sorted(glob.glob(os.path.join(ROOT, '*', '*.py'))):
    if os.path.basename(os.path.dirname(path)) in ('bench', 'launch', 'configs'):
      doc = ast.get_docstring(ast.parse(open(path).read())) or ''
      found += [(line, os.path.relpath(path, ROOT)) for line in _commands_in(doc)]
  commands = [(_command(line), where) for line, where in found]
  return [(*c, where) for c, where in commands if c]


def parse_commands(commands: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
  """(exit code, output) of each (module, argv) run to its flag parsing, in its own process."""
  results = []
  for module, argv in commands:
    proc = forked.call(_parse_only, module, argv, env=os.environ, timeout=120)
    results.append((proc.returncode, proc.stdout + proc.stderr))
  return results


def test_every_documented_command_parses():
  commands = documented_commands()
  modules = {m for m, _, _ in commands}
  assert {'launch.train_rater', 'launch.filter', 'bench.curation', 'bench.selection'} <= modules
  results = parse_commands([(m, argv) for m, argv, _ in commands])
  bad = [f'{where}: python -m {m} {" ".join(argv)}\n  -> exit {code}: {out.strip()[-500:]}'
         for (m, argv, where), (code, out) in zip(commands, results) if code != 0]
  assert not bad, '\n'.join(bad)


def test_the_check_fails_a_bad_command():
  """The oracle for the check itself: commands known bad in each way fail it, naming what is
  bad, and a good one passes."""
  bad = [
      (('launch.train', ['--no_such_flag=1']), 'no_such_flag'),
      (('launch.train', ['--config.train.no_such_field=1']), 'no_such_field'),
      (('launch.train', ['--config=configs/no_such_config.py']), 'no_such_config.py'),
      (('launch.filter', ['--keep=high']), 'high'),
      (('bench.selection', ['--seeds=x']), "'x'"),
      (('bench.curation', ['--no_such_flag=1']), 'no_such_flag'),
      (('bench.no_such_bench', []), 'bench.no_such_bench'),
      (('launch.train', ['--config.inner.steps=4']), 'is not read by launch.train'),
      (('launch.train', ['--policy=infobatch', '--config.policy.rho=0.3']),
       'is not read by policy infobatch'),
      (('launch.valuate', ['--method=tracin', '--config.seed=1']), 'is not read by'),
  ]
  results = parse_commands([('launch.train', ['--config=configs/digits.py'])]
                           + [command for command, _ in bad])
  assert results[0] == (0, ''), results[0]
  for (command, says), (code, out) in zip(bad, results[1:]):
    assert code != 0 and says in out, (command, code, out)


def _parse_only(module: str, argv: list[str]) -> None:
  """Runs `module` as `python -m module *argv` and exits 0 once its flags are parsed and its
  `check_flags` (a launcher's refusals of overrides it would not read), if it has one, passed."""
  import runpy  # pylint: disable=g-import-not-at-top
  from datarater.errors import exit_on_user_error  # pylint: disable=g-import-not-at-top
  from launch import cli  # pylint: disable=g-import-not-at-top
  run = cli.run

  def checked(main):
    check = main.__globals__.get('check_flags')
    if check:
      with exit_on_user_error():
        check()
    sys.exit(0)
  cli.run = lambda main, define_flags, doc: run(lambda argv: checked(main), define_flags, doc)
  sys.argv = [module, *argv]
  runpy.run_module(module, run_name='__main__', alter_sys=True)
  print(f'{module} ran to its end without parsing flags through launch.cli')
  sys.exit(1)
