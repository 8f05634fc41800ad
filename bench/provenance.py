"""What made a benchmark's result, stamped on its JSON: the command line as typed and the code;
and how a benchmark writes its results, as one set.

`made_by()`, added to every results JSON: `command` (`python -m bench.NAME ...`, shell-quoted,
so it can be pasted back), `code_version` (`git describe --always --dirty` of the checkout, None
outside git) and `flags`: the value of every flag the program defines (those its --help lists,
defaults included; a config file flag as the config it read, overrides applied), so that the
settings a run used are in its results.

`write_results(prefix, results, markdown, plot)` writes <prefix>.md (the table) and
<prefix>.png (the figure) first, each stamped with the sha256 of the JSON's bytes (an HTML
comment ending the .md, a PNG text chunk), then <prefix>.json, the record, which lists the files
written with it (`written_with`). Each file is written atomically, but a run killed between them
leaves a new .md or .png beside an old JSON: `check_results(prefix)` tells each file of a set
that belongs to its JSON from one that does not (or, written before the stamps, cannot tell).
"""
import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Callable, Optional

from absl import flags
from PIL import Image, PngImagePlugin

from bench import cli as bench_cli
from datarater import files, plots
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


# The stamps of a set's .md and .png: the JSON's file name and the sha256 of its bytes.
PNG_KEY = 'results-json-sha256'
_MD_STAMP = re.compile(r'<!-- results: (\S+) sha256 ([0-9a-f]{16}) -->\s*\Z')


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _add_text_chunk(path: str, key: str, value: str) -> None:
  """Rewrites the PNG file `path` with a text chunk `key`: `value` (the image data as it was)."""
  with Image.open(path) as image:
    image.load()
  info = PngImagePlugin.PngInfo()
  for k, v in image.text.items():  # (matplotlib's Software tag)
    info.add_text(k, v)
  info.add_text(key, value)
  image.save(path, format='PNG', pnginfo=info)


def write_results(prefix: str, results: dict, markdown: Optional[str] = None,
                  plot: Optional[Callable[[str], None]] = None) -> None:
  """`results`, with what made them (`made_by`), as <prefix>.json, written last; before it the
  table `markdown` as <prefix>.md and the figure `plot(path)` draws as <prefix>.png, each
  stamped with the JSON's digest. The figure is drawn first, in a temporary folder under its
  own name (a title may read it); one that fails is a warning, the rest written without it. An
  older .md or .png of `prefix` not written again is removed. The folder is made if needed."""
  bench_cli.out_folder(prefix)
  name = os.path.basename(prefix)
  with tempfile.TemporaryDirectory(prefix=f'.{name}.png.tmp-',
                                   dir=os.path.dirname(os.path.abspath(prefix))) as scratch:
    figure = os.path.join(scratch, name + '.png')
    drawn = plot is not None and plots.draw_or_warn(plot, figure)
    written_with = [ext for ext, part in (('.md', markdown is not None), ('.png', drawn)) if part]
    text = files.json_text({**results, 'made_by': made_by(), 'written_with': written_with})
    digest = _sha256(text.encode())
    if markdown is not None:
      files.write_text(prefix + '.md',
                       f'{markdown.rstrip()}\n\n<!-- results: {name}.json sha256 {digest} -->\n')
    if drawn:
      _add_text_chunk(figure, PNG_KEY, f'{name}.json {digest}')
      os.replace(figure, prefix + '.png')
  for ext in {'.md', '.png'} - set(written_with):  # an older run's: stale beside the new JSON
    with contextlib.suppress(FileNotFoundError):
      os.remove(prefix + ext)
  files.write_text(prefix + '.json', text)


def _stamp(path: str) -> Optional[str]:
  """The JSON digest a set's .md or .png is stamped with, None if it has none."""
  if path.endswith('.md'):
    with open(path) as f:
      found = _MD_STAMP.search(f.read())
    return found.group(2) if found else None
  with Image.open(path) as image:
    value = image.info.get(PNG_KEY)  # (a text chunk before the image data, as written)
  return value.split()[-1] if value else None


def check_results(prefix: str) -> dict:
  """{path: verdict} of the .md and .png of the set <prefix> (and its .json when missing):
  'ok' (stamped with the JSON's digest and listed in it), 'stale' (another run's: stamped with
  another digest, not listed by a JSON that lists its files, or no JSON), 'missing' (listed by
  the JSON but absent), 'legacy' (no stamp, beside a JSON that lists no files: written before
  sets were stamped, so nothing tells whether they belong together)."""
  try:
    with open(prefix + '.json', 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    data = None
  digest = _sha256(data) if data is not None else None
  written_with = json.loads(data).get('written_with') if data is not None else None
  verdicts = {} if data is not None else {prefix + '.json': 'missing'}
  for ext in ('.md', '.png'):
    path = prefix + ext
    if not os.path.exists(path):
      if written_with and ext in written_with:
        verdicts[path] = 'missing'
      continue
    stamp = _stamp(path)
    if written_with is None and stamp is None and data is not None:
      verdicts[path] = 'legacy'
    elif written_with is not None and ext in written_with and stamp == digest:
      verdicts[path] = 'ok'
    else:
      verdicts[path] = 'stale'
  return verdicts
