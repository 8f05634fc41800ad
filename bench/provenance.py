"""What made a benchmark's result, stamped on its JSON: the command line as typed and the code.

`write_json(path, results)` writes `results` with `made_by` added: `command` (`python -m
bench.NAME ARGS`, shell-quoted, so it can be pasted back) and `code_version` (`git describe
--always --dirty` of the checkout, None outside git).
"""
import os
import shlex
import subprocess
import sys
from typing import Optional

from datarater import files

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


def write_json(path: str, results: dict) -> None:
  """`results` as JSON at `path` (atomically), with the command and the code that made them."""
  files.write_json(path, {**results, 'made_by': {'command': command(),
                                                 'code_version': code_version()}})
