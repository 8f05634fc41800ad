"""A benchmark's results as one set (`bench.provenance.write_results`): a writer killed between
its files leaves either one run's set under the final names or a set `check_results` flags."""
import glob
import json
import os
import signal

import ml_collections
from PIL import Image
import pytest

from bench import provenance
from datarater import files
from tests import forked
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {'A': {'accuracy': 0.5, 'seeds': [0, 1]}, 'B': {'accuracy': 0.75, 'seeds': [0, 1, 2]}}
SUFFIXES = ('.json', '.md', '.png')


def _write(prefix: str, run: str) -> None:
  """A tiny fake bench's results: a one-row table and a 2x2 figure whose shade is the run's."""
  shade = {'A': 10, 'B': 200}[run]
  provenance.write_results(prefix, RUNS[run], f'| accuracy |\n|---|\n| {RUNS[run]["accuracy"]} |',
                           lambda path: Image.new('L', (2, 2), shade).save(path, format='PNG'))


def _write_legacy(prefix: str, run: str) -> None:
  """The set as the benches wrote it before the stamps: the JSON, then the .md and .png."""
  files.write_json(prefix + '.json', {**RUNS[run], 'made_by': provenance.made_by()})
  files.write_text(prefix + '.md', f'| accuracy |\n|---|\n| {RUNS[run]["accuracy"]} |\n')
  Image.new('L', (2, 2), 10).save(prefix + '.png', format='PNG')


def _killed_at(prefix: str, run: str, rename: int) -> bool:
  """`_write(prefix, run)` in a forked child SIGKILLed as it starts its `rename`-th rename (of a
  finished temporary file to its name); False when it finished first."""
  pid = os.fork()
  if pid == 0:  # pragma: no cover (the child)
    try:
      replace, count = os.replace, [0]
      def killed(src, dst):
        count[0] += 1
        if count[0] == rename:
          os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
      os.replace = killed
      _write(prefix, run)
    finally:
      os._exit(0)  # pylint: disable=protected-access
  _, status = os.waitpid(pid, 0)
  assert os.WIFEXITED(status) or os.WTERMSIG(status) == signal.SIGKILL, status
  return os.WIFSIGNALED(status)


def _read(prefix: str) -> dict:
  """{suffix: bytes} of the set's files that exist."""
  found = {}
  for ext in SUFFIXES:
    if os.path.exists(prefix + ext):
      with open(prefix + ext, 'rb') as f:
        found[ext] = f.read()
  return found


@pytest.mark.parametrize('before', ['stamped', 'legacy'])
def test_a_write_killed_between_its_files_leaves_one_set_or_a_flagged_one(tmp_path, before):
  """Run A's set (written by `write_results`, or as before the stamps) is replaced by run B's,
  the writer killed at each of its renames in turn. Which run each file under its final name
  came from is read off its bytes (those of each run's set written whole elsewhere); the check
  flags exactly the files that are not of the JSON's run, and passes a set written whole."""
  whole = {}
  for run in RUNS:
    os.makedirs(tmp_path / run)
    _write(str(tmp_path / run / 'r'), run)
    whole[run] = _read(str(tmp_path / run / 'r'))
    assert set(whole[run]) == set(SUFFIXES)
    assert provenance.check_results(str(tmp_path / run / 'r')) == {
        str(tmp_path / run / 'r.md'): 'ok', str(tmp_path / run / 'r.png'): 'ok'}
    with Image.open(tmp_path / run / 'r.png') as image:  # a valid PNG (chunk CRCs checked)
      image.load()
      assert image.text[provenance.PNG_KEY].startswith('r.json ')
  rename, seen_mixed = 0, 0
  while True:
    rename += 1
    prefix = str(tmp_path / f'kill{rename}' / 'r')
    os.makedirs(os.path.dirname(prefix))
    (_write if before == 'stamped' else _write_legacy)(prefix, 'A')
    old = _read(prefix)
    killed = _killed_at(prefix, 'B', rename)
    found = _read(prefix)
    assert set(found) == set(SUFFIXES)
    origin = {}
    for ext, data in found.items():
      origin[ext] = next((run for run, s in (('A', old), ('B', whole['B'])) if data == s[ext]),
                         None)
      assert origin[ext], (rename, ext)  # never half-written
    verdicts = provenance.check_results(prefix)
    flagged = {ext for ext in SUFFIXES if verdicts.get(prefix + ext) in ('stale', 'missing')}
    assert flagged == {ext for ext in SUFFIXES if origin[ext] != origin['.json']}, (
        rename, origin, verdicts)
    unflagged = 'ok' if origin['.json'] == 'B' or before == 'stamped' else 'legacy'
    assert all(v == unflagged for p, v in verdicts.items() if p[len(prefix):] not in flagged)
    seen_mixed += bool(flagged)
    if not killed:
      break
  assert origin == {ext: 'B' for ext in SUFFIXES} and not flagged
  assert rename == 4 and seen_mixed == 2  # killed at the .md, .png and .json renames


def test_the_stored_results_are_whole_sets_or_legacy():
  """No results set in bench/results/ holds a file another run left (the sets written before the
  stamps are 'legacy': nothing tells whether they belong together)."""
  verdicts = {}
  for path in glob.glob(os.path.join(ROOT, 'bench', 'results', '*.json')):
    verdicts.update(provenance.check_results(path[:-len('.json')]))
  assert verdicts and set(verdicts.values()) <= {'ok', 'legacy'}, {
      p: v for p, v in verdicts.items() if v not in ('ok', 'legacy')}


def test_every_bench_writes_its_results_as_one_set():
  """No bench writes a results file of its own (outside `write_results`, a file it writes alone
  is not in the set its JSON lists); a figure is drawn only by the `plot` it is given."""
  for name in sorted(glob.glob(os.path.join(ROOT, 'bench', '*.py'))):
    if os.path.basename(name) != 'provenance.py':
      with open(name) as f:
        text = f.read()
      for call in ('write_json(', 'write_text(', 'savefig('):
        assert call not in text, (name, call)


def test_the_figure_is_drawn_under_its_results_name_and_one_that_fails_loses_nothing(tmp_path):
  """The curation, lm_curation and selection figures title themselves with their file's name:
  drawn at write_results' temporary file, they read '.curation.png.tmp-k3j...'. And a figure
  that failed after a bench's runs left its .md without the JSON: the results were lost."""
  prefix, names = str(tmp_path / 'curation'), []
  def plot(path):
    names.append(os.path.basename(path))
    Image.new('L', (2, 2), 10).save(path, format='PNG')
  provenance.write_results(prefix, RUNS['A'], '| a |', plot)
  assert names == ['curation.png']
  assert set(provenance.check_results(prefix).values()) == {'ok'}
  def broken(path):
    raise IndexError('a plotting bug')
  provenance.write_results(prefix + '_b', RUNS['B'], '| b |', broken)
  with open(prefix + '_b.json') as f:
    written = json.load(f)
  assert written['accuracy'] == RUNS['B']['accuracy'] and written['written_with'] == ['.md']
  assert provenance.check_results(prefix + '_b') == {prefix + '_b.md': 'ok'}
  assert sorted(os.listdir(tmp_path)) == ['curation.json', 'curation.md', 'curation.png',
                                          'curation_b.json', 'curation_b.md']


def test_a_set_written_again_without_its_figure_or_table_leaves_no_older_one(tmp_path):
  """A figure that fails to draw where an older run's set lies (or a set written without a
  table or figure, as valuation_scale after each section): the older .png (.md) is removed, not
  left beside the new JSON with another run's stamp."""
  prefix = str(tmp_path / 'bench')
  _write(prefix, 'A')
  def broken(path):
    raise IndexError('a plotting bug')
  provenance.write_results(prefix, RUNS['B'], '| b |', broken)
  assert provenance.check_results(prefix) == {prefix + '.md': 'ok'}
  assert sorted(os.listdir(tmp_path)) == ['bench.json', 'bench.md']
  provenance.write_results(prefix, RUNS['A'])
  assert provenance.check_results(prefix) == {} and os.listdir(tmp_path) == ['bench.json']


# How each bench's figure is drawn from its stored JSON (as its main draws it from the results
# it stores), by the bench module a results name starts with.
REDRAW = {
    'cnn_patches': lambda m, j, path: m.plot(j, path),
    'curation': lambda m, j, path: m.plot(path, j['summary'], j['runs'], j['keep'], j['methods'],
                                          j['config']['data']['name']),
    'lm_curation': lambda m, j, path: m.plot(path, j['summary'], j['seeds'],
                                             ml_collections.ConfigDict(j['bench'])),
    'meta_memory': lambda m, j, path: m.plot(j['results'], path, j['device']),
    'meta_step': lambda m, j, path: m.plot(j['results'], path, j['device']),
    'multihost_stop': lambda m, j, path: m.plot(j, path),
    'pergrad': lambda m, j, path: m.plot(j, path),
    'selection': lambda m, j, path: m.plot(j['table'], path, j['config']['data']['name']),
    'valuation_noise': lambda m, j, path: m.plot(j, path),
    'valuation_scale': lambda m, j, path: m.plot(j, path),
}
# Stored figures of results written in an older format than the bench's plot reads.
LEGACY_FORMAT = {'valuation_noise'}  # (before per-noise results: 'auroc' and 'summary')


def _stored_figures(bench: str) -> list[str]:
  """The stored results of `bench` drawn with a figure: <name>.json beside <name>.png."""
  stems = [p[:-4] for p in glob.glob(os.path.join(ROOT, 'bench', 'results', f'{bench}*.png'))]
  return sorted(s for s in stems if os.path.exists(s + '.json')
                and os.path.basename(s) not in LEGACY_FORMAT
                and max((b for b in REDRAW if os.path.basename(s).startswith(b)), key=len) == bench)


def _redraw(bench: str, stems: list, out: str) -> None:
  """In a child process (a bench defines its flags on import): each stored JSON's figure."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'bench.{bench}')
  for stem in stems:
    with open(stem + '.json') as f:
      REDRAW[bench](module, json.load(f), os.path.join(out, os.path.basename(stem) + '.png'))


@pytest.mark.parametrize('bench', [b if b == 'curation' else pytest.param(b, marks=pytest.mark.slow)
                                   for b in sorted(REDRAW)])  # (about 1 s each)
def test_every_bench_figure_is_drawn_again_from_its_stored_json(tmp_path, bench):
  """A researcher redraws a figure from the results JSON (its keys now strings: curation's keep
  fractions crashed the plot): each bench's first stored set (curation's alone in the fast
  suite), every set in the next test."""
  stems = _stored_figures(bench)
  assert stems, bench
  before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(ROOT, 'bench', 'results',
                                                                         '*'))}
  done = forked.call(_redraw, bench, stems[:1], str(tmp_path), env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(stems[0]) + '.png']
  assert {p: os.stat(p).st_mtime_ns for p in before} == before  # bench/results/ untouched


def _check_readable_figures() -> None:
  """In a child process: pergrad's and valuation_scale's stored figures drawn again, read back."""
  import importlib  # pylint: disable=g-import-not-at-top
  drawn = []
  files.save_figure = lambda fig, path, **kw: drawn.append(fig)
  for stem in _stored_figures('pergrad'):
    with open(stem + '.json') as f:
      results = json.load(f)
    importlib.import_module('bench.pergrad').plot(results, 'unused.png')
    memory = drawn.pop().axes[1]
    assert results['device'] in memory.get_title(), (stem, memory.get_title())
    low, high = memory.get_xlim()
    shown = [t.get_text() for t in memory.get_xticklabels() + memory.get_xticklabels(minor=True)
             if t.get_text() and low <= t.get_position()[0] <= high]
    ns = {int(n) for m in results['models'].values() for n in m['memory_temp_bytes']}
    assert [int(t.replace(',', '')) for t in shown] == sorted(ns), (stem, shown)
  for stem in _stored_figures('valuation_scale'):
    with open(stem + '.json') as f:
      importlib.import_module('bench.valuation_scale').plot(json.load(f), 'unused.png')
    legend = drawn.pop().axes[1].get_legend()
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 8, stem


def test_pergrad_and_valuation_scale_figures_are_readable():
  """pergrad's memory panel labelled its log x axis at 3x10^2, 4x10^2, 6x10^2, ... over one
  decade and did not name the device; valuation_scale's memory-vs-N legend was in 6 pt type. Now
  the x labels are the sizes measured, the title names the device, the legend is 8 pt at least."""
  done = forked.call(_check_readable_figures, env=subprocess_env(1))
  assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('bench', sorted(REDRAW))
def test_every_stored_bench_figure_is_drawn_again_from_its_json(tmp_path, bench):
  stems = _stored_figures(bench)
  done = forked.call(_redraw, bench, stems, str(tmp_path), env=subprocess_env(1), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert len(os.listdir(tmp_path)) == len(stems)
