r"""Compute saved by a filtered subset against all data stopped at its own final accuracy.

  python -m bench.steps_saved --results=bench/results/curation_fashion_mnist_50k.json

`bench.curation`'s steps fraction is the share of all data's steps that a filtered run needs to
reach all data's final test accuracy; it charges all data its whole run. Under label noise all
data's curve often peaks early and reaches its final accuracy before its last step. From the runs
stored in each curation results JSON (their accuracy curves; nothing is trained), this gives, for
the DataRater at its suggested keep and for every method and keep: the steps fraction, all data's
own share, the paired saving (own share minus the filtered run's, pairs = seeds) and the
break-even training runs both ways. Writes <out>.json and .md.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import os

from absl import flags
import numpy as np

from bench import cli as bench_cli
from bench import compare
from bench import provenance
from datarater.errors import UserError

_RESULTS = flags.DEFINE_list('results', [], 'Curation results JSON files (bench.curation).')
_OUT = flags.DEFINE_string('out', 'bench/results/steps_saved', 'Output prefix (.json, .md).')


def _figure(x) -> bool:
  """Whether x is a finite JSON number (not a string, a bool or null)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _number(x) -> bool:
  """Whether x is a finite number (or a string of one: a keep fraction as a JSON key)."""
  try:
    return not isinstance(x, bool) and np.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _check_curve(fail, curve, where: str) -> None:
  if (not isinstance(curve, list) or not curve or not all(
      isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)
      for p in curve)):
    fail(f'{where} has curve {curve!r}, not a list of [step, accuracy] pairs'[:300])


def check(path: str, results: dict) -> None:
  """Refuses curation results `results` (read from `path`) that lack what `rows_of` reads: one
  line naming the file and the first thing missing."""
  def fail(what):
    raise UserError(f'{path!r} is not a bench.curation results file ({what})')
  def need(obj, keys, where):
    for key in keys:
      if not isinstance(obj, dict) or key not in obj:
        fail(f'{where} has no {key!r}')
  runs, methods = results['runs'], results['methods']
  if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
    fail(f'methods is not a list of names: {methods!r}'[:200])
  if not isinstance(runs, dict) or not runs:
    fail('runs holds no noise rates')
  for noise, by_seed in runs.items():
    try:
      float(noise)
    except ValueError:
      fail(f'runs has {noise!r}, not a noise rate')
    if not isinstance(by_seed, dict) or not by_seed:
      fail(f'runs[{noise!r}] holds no seeds')
    for seed, r in by_seed.items():
      where = f'runs[{noise!r}][{seed!r}]'
      need(r, ('all', 'filtered', 'setup_example_gradients'), where)
      need(r['all'], ('curve', 'accuracy', 'steps', 'example_gradients'), f"{where}['all']")
      run = r['all']
      if (not _figure(run['accuracy']) or not _figure(run['steps']) or run['steps'] <= 0
          or not _figure(run['example_gradients'])):
        fail(f"{where}['all'] has accuracy {run['accuracy']!r}, steps {run['steps']!r} and "
             f"example_gradients {run['example_gradients']!r}, not numbers (steps positive)")
      _check_curve(fail, run['curve'], f"{where}['all']")
      if compare.steps_to_reach(run['curve'], run['accuracy']) is None:
        fail(f"{where}['all']'s curve never reaches its final accuracy {run['accuracy']!r}")
      need(r['filtered'], methods, f"{where}['filtered']")
      need(r['setup_example_gradients'], methods, f"{where}['setup_example_gradients']")
      for m in methods:
        if not _figure(r['setup_example_gradients'][m]):
          fail(f"{where}['setup_example_gradients'][{m!r}] is "
               f"{r['setup_example_gradients'][m]!r}, not a number")
      for m in methods:
        if not isinstance(r['filtered'][m], dict):
          fail(f"{where}['filtered'][{m!r}] is not an object of keeps")
        for keep, run in r['filtered'][m].items():
          what = f"{where}['filtered'][{m!r}][{keep!r}]"
          if not _number(keep):
            fail(f"{where}['filtered'][{m!r}] has {keep!r}, not a keep fraction")
          need(run, ('curve',), what)
          _check_curve(fail, run['curve'], what)
      if r.get('suggested_keep'):
        need(r['filtered'], ('datarater',), f"{where}['filtered']")
        need(r['filtered']['datarater'], (str(r['suggested_keep']),),
             f"{where}['filtered']['datarater'] (its suggested_keep)")


def rows_of(results: dict) -> list[dict]:
  """One row per (noise, setting) with steps fractions of every seed."""
  rows = []
  for noise, by_seed in results['runs'].items():
    rs = list(by_seed.values())
    setup = lambda m: int(np.mean([r['setup_example_gradients'][m] for r in rs]))
    all_data = int(np.mean([r['all']['example_gradients'] for r in rs]))
    settings = [(m, k, lambda r, m=m, k=k: r['filtered'][m].get(k))
                for m in results['methods'] for k in sorted(rs[0]['filtered'][m], key=float)
                if all(k in r['filtered'][m] for r in rs)]
    if all(r.get('suggested_keep') for r in rs):
      settings.append(('datarater', 'suggested',
                       lambda r: r['filtered']['datarater'][str(r['suggested_keep'])]))
    for method, keep, get in settings:
      reached = [compare.steps_to_reach(get(r)['curve'], r['all']['accuracy'])
                 for r in rs]
      fractions = [None if x is None else x / r['all']['steps'] for x, r in zip(reached, rs)]
      saved = compare.steps_saved(rs, fractions, setup(method), all_data)
      whole = (float(np.mean(fractions)) if all(f is not None for f in fractions) else None)
      rows.append({'noise': float(noise), 'method': method, 'keep': keep, 'seeds': len(rs),
                   'steps_fraction': fractions, 'steps_fraction_mean': whole,
                   'break_even_runs': compare.break_even(setup(method), all_data, whole),
                   **saved})
  return rows


def markdown(tables: dict) -> str:
  lines = ['Steps fraction: steps a filtered run needs to reach all data\'s final test accuracy, '
           'as a share of all data\'s steps; "all data, own": the share all data needs to reach '
           'its own final accuracy; saved: own share minus steps fraction, paired standard error '
           '(pairs = seeds); break-even: training runs after which the method\'s one-off cost is '
           'paid back, against all data run to the end / stopped at its own final accuracy.', '']
  cell = lambda x, f='{:.2f}': '-' if x is None else f.format(x)
  for path, rows in tables.items():
    lines += [f'## {path}', '', '| noise | method | keep | steps fraction | all data, own | saved '
              '| break-even (to the end) | break-even (own) |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
      s = r['saved_vs_all_own']
      saved = '-' if s is None else f'{s["diff"]:+.2f} ± {s["se"]:.2f}'
      lines.append(
          f'| {r["noise"]:.0%} | {r["method"]} | {r["keep"]} | {cell(r["steps_fraction_mean"])} '
          f'| {np.mean(r["all_steps_to_own_final"]):.2f} | {saved} '
          f'| {cell(r["break_even_runs"], "{:.0f}")} '
          f'| {cell(r["break_even_runs_vs_all_own"], "{:.0f}")} |')
    lines.append('')
  return '\n'.join(lines)


def main(argv):
  del argv
  if not _RESULTS.value:
    raise UserError('--results names no curation results file')
  tables = {}
  for path in _RESULTS.value:
    results = bench_cli.read_json(path, 'bench.curation results file', 'runs', 'methods')
    check(path, results)
    tables[os.path.relpath(path)] = rows_of(results)
  text = markdown(tables)
  provenance.write_results(_OUT.value, {'tables': tables}, text)
  print(text)


if __name__ == '__main__':
  bench_cli.run(main, __doc__)
