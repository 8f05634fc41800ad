r"""Two versions of the code on the same seeds: per figure, the paired difference and a verdict.

  python -m bench.versions --before=OLD_PREFIX --after=NEW_PREFIX --out=bench/results/redesign_check

Each prefix names the outputs of one tree's runs, any of: PREFIX_seeds.json from
`bench.train_rater_seeds`, PREFIX_curation.json from `bench.curation` (one noise rate),
PREFIX_valuation.json from `bench.valuation_noise` (one noise rate) and PREFIX_selection.json from
`bench.selection` (runs paired by fold and seed; a fold only one side ran is left out). For every
figure (noise AUROC, fresh-model test accuracy and held-out loss; curation accuracy per row and
AUROC per method; each valuation's AUROC; selection accuracy per policy and ratio) it reports both
means, their spread over seeds, the difference after minus before with its paired standard error
(pairs = seeds), and the verdict of the rule fixed before the runs: `reproduces` if the difference
is no worse than 2 standard errors, else `regression` (for a loss, higher is worse);
`undetermined` with fewer than 2 seeds. A value not defined (null: a diverged model) on a seed
is left out of the pair; undefined after but defined before is a `regression` whatever the other
seeds show. Writes OUT.json and OUT.md.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import os

from absl import flags
import numpy as np

from bench import cli as bench_cli
from bench import provenance
from bench.compare import paired
from datarater.errors import UserError

SEEDS_FIGURES = (  # (key, label, scale, higher is better)
    ('noise_auroc', 'noise AUROC', 1.0, True),
    ('test_accuracy_rater', 'test accuracy (%), rater weights', 100.0, True),
    ('test_accuracy_uniform', 'test accuracy (%), uniform', 100.0, True),
    ('heldout_loss_rater', 'held-out loss, rater weights', 1.0, False),
    ('heldout_loss_uniform', 'held-out loss, uniform', 1.0, False))


def seeds_figures(path: str) -> dict:
  """{label: {seed: value}} of a bench.train_rater_seeds output."""
  seeds = bench_cli.read_json(path, 'bench.train_rater_seeds output', 'seeds')['seeds']
  return {label: {s: (r[key], scale, better) for s, r in seeds.items()}
          for key, label, scale, better in SEEDS_FIGURES}


def curation_figures(path: str) -> dict:
  """{label: {seed: value}} of a bench.curation output at its one noise rate."""
  runs = bench_cli.read_json(path, 'bench.curation output', 'runs')['runs']
  if len(runs) != 1:
    raise UserError(f'{path}: expected one noise rate, found {sorted(runs)}')
  (noise, by_seed), = runs.items()
  out = {}
  def add(label, seed, value, scale):
    out.setdefault(f'curation {float(noise):.0%}: {label}', {})[seed] = (value, scale, True)
  for seed, r in by_seed.items():
    add('all data, accuracy (%)', seed, r['all']['accuracy'], 100.0)
    for keep, v in r['random'].items():
      add(f'random subset {keep}, accuracy (%)', seed, v['accuracy'], 100.0)
    for method, by_keep in r['filtered'].items():
      for keep, v in by_keep.items():
        add(f'{method} filtered {keep}, accuracy (%)', seed, v['accuracy'], 100.0)
    for method, v in r['online'].items():
      add(f'{method} online weights, accuracy (%)', seed, v['accuracy'], 100.0)
    for method, v in r['auroc'].items():
      add(f'{method} noise AUROC', seed, v, 1.0)
  return out


def valuation_figures(path: str) -> dict:
  """{label: {seed: value}} of a bench.valuation_noise output at one noise rate: its `runs`
  records, or (older versions of the bench) its `auroc` table {method: {seed: value}}."""
  d = bench_cli.read_json(path, 'bench.valuation_noise output')
  if 'runs' not in d and 'auroc' not in d:
    raise UserError(f"{path!r} is not a bench.valuation_noise output (it has no 'runs')")
  if 'runs' in d:
    if len(set(r['noise'] for r in d['runs'])) > 1:
      raise UserError(f'{path}: expected one noise rate')
    table = {}
    for r in d['runs']:
      table.setdefault(r['variant'], {})[str(r['seed'])] = r['auroc']
  else:
    table = d['auroc']
  return {f'valuation: {method} noise AUROC': {s: (v, 1.0, True) for s, v in per_seed.items()}
          for method, per_seed in table.items()}


def selection_figures(path: str) -> dict:
  """{label: {pair: value}} of a bench.selection output: test accuracy per (noise, policy, ratio),
  paired by (fold, seed), keyed fold * 1000 + seed."""
  runs = bench_cli.read_json(path, 'bench.selection output', 'runs')['runs']
  out = {}
  for r in runs:
    label = f'selection {r["noise"]:.0%}: {r["policy"]} r={r["ratio"]}, accuracy (%)'
    out.setdefault(label, {})[str(1000 * r['fold'] + r['seed'])] = (r['test_accuracy'], 100.0, True)
  return out


READERS = {'seeds': seeds_figures, 'curation': curation_figures, 'valuation': valuation_figures,
           'selection': selection_figures}


def compare(before: dict, after: dict) -> list[dict]:
  rows = []
  for label, b in before.items():
    seeds = sorted(set(b) & set(after.get(label, {})), key=int)
    if not seeds:
      continue
    scale, better = b[seeds[0]][1], b[seeds[0]][2]
    x0 = np.array([b[s][0] for s in seeds], dtype=float)  # null (not defined) -> NaN
    x1 = np.array([after[label][s][0] for s in seeds], dtype=float)
    lost = int(np.sum(np.isfinite(x0) & ~np.isfinite(x1)))  # defined before, not after
    both = np.isfinite(x0) & np.isfinite(x1)
    x0, x1 = x0[both], x1[both]
    n = len(x0)
    d = paired(x1, x0, scale) if n >= 2 else {'diff': float('nan'), 'se': float('nan')}
    worse = -d['diff'] if better else d['diff']  # > 0: after is worse
    spread = lambda x: float(scale * x.std(ddof=1)) if n >= 2 else float('nan')
    rows.append({'figure': label, 'seeds': n, 'undefined_after': lost,
                 'before_mean': float(scale * x0.mean()) if n else float('nan'),
                 'before_std': spread(x0),
                 'after_mean': float(scale * x1.mean()) if n else float('nan'),
                 'after_std': spread(x1), 'diff': d['diff'], 'paired_se': d['se'],
                 'verdict': ('regression' if lost else 'undetermined' if n < 2 else
                             'regression' if worse > 2 * d['se'] else 'reproduces')})
  return rows


def define_flags() -> None:
  for name, help_ in (('before', 'Output prefix of the old tree\'s runs.'),
                      ('after', 'Output prefix of the new tree\'s runs.'),
                      ('out', 'Output prefix of OUT.json and OUT.md.')):
    flags.DEFINE_string(name, None, help_)
    flags.mark_flag_as_required(name)


def _checked(read, path: str, kind: str) -> dict:
  """read(path), refused in one line where a record lacks a figure or one is not a number
  (null, a figure not defined in that run, is kept)."""
  try:
    figures = read(path)
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    raise UserError(f'{path!r} is not a {kind} output as expected: {type(e).__name__} '
                    f'{e}') from None
  for label, by_seed in figures.items():
    for seed, (value, _, _) in by_seed.items():
      if not str(seed).lstrip('-').isdigit():
        raise UserError(f'{path!r}: {label} has seed {seed!r}, not an integer')
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f'{path!r}: {label} of seed {seed} is {value!r}, not a number')
  return figures


def main(argv):
  del argv
  fv = flags.FLAGS
  figures = {}
  for side in ('before', 'after'):
    prefix, figures[side] = fv[side].value, {}
    for kind, read in READERS.items():
      if os.path.exists(f'{prefix}_{kind}.json'):
        figures[side].update(_checked(read, f'{prefix}_{kind}.json', kind))
    if not figures[side]:
      raise UserError(f'--{side} {prefix!r}: no {prefix}_{{{",".join(READERS)}}}.json')
  bench_cli.out_folder(fv.out)
  rows = compare(figures['before'], figures['after'])
  lines = ['| figure | seeds | before | after | after - before | verdict |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["figure"]} | {r["seeds"]} | {r["before_mean"]:.3f} +- {r["before_std"]:.3f}'
                 f' | {r["after_mean"]:.3f} +- {r["after_std"]:.3f} | {r["diff"]:+.3f} +- '
                 f'{r["paired_se"]:.3f} | {r["verdict"]}'
                 + (f' ({r["undefined_after"]} seed(s) null after) |' if r['undefined_after']
                    else ' |'))
  print('\n'.join(lines))
  provenance.write_results(fv.out, {'before': fv.before, 'after': fv.after, 'rows': rows},
                           '\n'.join(lines) + '\n')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
