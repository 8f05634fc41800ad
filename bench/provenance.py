"""What made a benchmark's result, stamped on its JSON: the command line as typed and the code.

`write_json(path, results)` writes `results` with `made_by()` added: `command` (`python -m
bench.NAME ARGS`, shell-quoted, so it can be pasted back), `code_version` (`git describe
--always --dirty` of the checkout, None outside git) and `flags`: the value of every flag the
program defines (those its --help lists, defaults included; a config file flag as the config it
read, overrides applied), so that the settings a run used are in its results.
"""
import os
import shlex
import subprocess
import sys
from typing import Optional

from absl import flags

from datarater import files
from launch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command() -> str:
  """This process's command line: `python -m MODULE ARGS` (or `python SCRIPT ARGS`)."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  program = f'python -m {spec.name}' if spec else f'python {sys.argv[0]}'
  return ' '.join([program, *map(shlex.quote, sys.argv[1:])])


def code_version() -> Optional[str]:
  """The checkout's `git describe --always --dirty`, or None where there is no git checkout."""
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def flag_values(fv: flags.FlagValues = flags.FLAGS, program: str = '') -> dict:
  """{name: value} of program `program`'s own flags (`launch.cli.own_flags`), a config as a dict."""
  return {f.name: f.value.to_dict() if hasattr(f.value, 'to_dict') else f.value
          for f in cli.own_flags(fv, program)}


def made_by() -> dict:
  """What made this process's results: its command line, the code version and its flags."""
  return {'command': command(), 'code_version': code_version(), 'flags': flag_values()}


def write_json(path: str, results: dict) -> None:
  """`results` as JSON at `path` (atomically), with what made them (`made_by`)."""
  files.write_json(path, {**results, 'made_by': made_by()})
