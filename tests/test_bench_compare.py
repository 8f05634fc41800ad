"""What the curation benchmarks compute from their runs: when a curve reaches a target (either
direction, optionally interpolated), paired statistics, and bench.lm_curation's reading of what a
method learned (AUROC of each kind against clean prose, the rater's mean weight per group)."""
import math
import os

import jax
import numpy as np
import pytest

from bench import compare, lm_curation
from datarater.data import pipeline
from tests import forked


def test_steps_to_reach_first_crossing_either_direction_interpolated_or_not():
  loss = [(10, 3.0), (20, 2.5), (30, 2.0), (40, 2.2)]
  assert compare.steps_to_reach(loss, 2.5, higher_is_better=False) == 20
  assert compare.steps_to_reach(loss, 2.25, higher_is_better=False) == 30
  assert compare.steps_to_reach(loss, 2.25, higher_is_better=False,
                                interpolate=True) == pytest.approx(25)
  assert compare.steps_to_reach(loss, 3.5, higher_is_better=False, interpolate=True) == 10
  assert compare.steps_to_reach(loss, 1.9, higher_is_better=False) is None
  # A NaN evaluation before the crossing is skipped: the line runs from the last finite one.
  gap = [(10, 0.5), (20, float('nan')), (30, 0.8)]
  assert compare.steps_to_reach(gap, 0.7) == 30
  assert compare.steps_to_reach(gap, 0.7, interpolate=True) == pytest.approx(10 + 20 * 2 / 3)
  accuracy = [(1, 0.5), (2, 0.7)]
  assert compare.steps_to_reach(accuracy, 0.6) == 2
  assert compare.steps_to_reach(accuracy, 0.6, interpolate=True) == pytest.approx(1.5)
  assert lm_curation._fraction(loss, 2.25) == pytest.approx(25 / 40)  # pylint: disable=protected-access
  assert lm_curation._fraction(loss, 1.0) is None  # pylint: disable=protected-access


def test_a_noise_table_row_missing_a_seed_says_how_many_it_holds():
  """A method that failed on one of two seeds was averaged over the other, shown as '± 0.000'
  under a heading of both seeds."""
  run = lambda seed, auroc: {'noise': 0.2, 'variant': 'mimic', 'seed': seed, 'auroc': auroc,
                             'auroc_by_kind': {}, 'seconds': 1.0}
  results = {'seeds': [0, 1], 'dataset': 'd', 'task': 't', 'rater_steps': 0, 'noise': [0.2],
             'variants': ['mimic'], 'runs': [run(0, 0.75)],
             'failed': [{'noise': 0.2, 'seed': 1, 'variant': 'mimic', 'error': 'x'}]}
  def markdown(results):  # in a process of its own: bench.valuation_noise defines its flags
    done = forked.call(_print_noise_markdown, results, env=os.environ, timeout=120)  # on import
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [l for l in done.stdout.splitlines() if l.startswith('|')]
    assert len({l.count('|') for l in rows}) == 1, rows  # no kinds: as many cells in each row
    return done.stdout
  assert '| 20% | mimic | 0.750 ± 0.000 (n=1 of 2) |' in markdown(results)
  results['runs'].append(run(1, 0.25))
  assert '| 20% | mimic | 0.500 ± 0.250 |' in markdown(results)


def _print_noise_markdown(results: dict) -> None:
  from bench import valuation_noise  # pylint: disable=g-import-not-at-top
  print(valuation_noise.markdown(results), flush=True)


def test_paired_differences_and_stats():
  d = compare.paired([1.0, 2.0, 4.0], [0.5, 1.0, 2.0], scale=1.0)
  assert d['diff'] == pytest.approx(7 / 6)
  assert d['se'] == pytest.approx(np.std([0.5, 1.0, 2.0], ddof=1) / np.sqrt(3))
  assert compare.stats([0.25, 0.75])['mean'] == pytest.approx(50.0)


def _mean(xs):
  total = 0.0
  for x in xs:
    total += x
  return total / len(xs)


def _sum_of_squares(xs):
  """sum (x_i - mean)^2 by a loop, in Python floats (float64)."""
  m, total = _mean(xs), 0.0
  for x in xs:
    total += (x - m) * (x - m)
  return total


@pytest.mark.parametrize('n', [1, 2, 5])
def test_stats_std_divides_by_n_and_paired_se_by_n_minus_1(n):
  """The README's reading: a `+-` after a mean (stats' std) is the population standard deviation,
  sqrt(sum (x - mean)^2 / n); paired's se is the sample std of the differences (n - 1) over
  sqrt(n). Against both definitions written out, on values where n and n - 1 differ."""
  rng = np.random.default_rng(n)
  a, b = list(rng.uniform(0.5, 1.0, n)), list(rng.uniform(0.5, 1.0, n))
  s = compare.stats(a)  # scale 100: points
  points = [100.0 * x for x in a]
  assert s['n'] == n
  assert s['mean'] == pytest.approx(_mean(points), rel=1e-12)
  assert s['std'] == pytest.approx(math.sqrt(_sum_of_squares(points) / n), rel=1e-12, abs=1e-12)
  d = compare.paired(a, b, scale=1.0)
  diffs = [x - y for x, y in zip(a, b)]
  assert d['diff'] == pytest.approx(_mean(diffs), rel=1e-12)
  if n == 1:
    assert math.isnan(d['se'])  # no spread to estimate from one pair
  else:
    sample_std = math.sqrt(_sum_of_squares(diffs) / (n - 1))
    assert d['se'] == pytest.approx(sample_std / math.sqrt(n), rel=1e-12)
    assert s['std'] < math.sqrt(_sum_of_squares(points) / (n - 1))  # n, not n - 1


def test_steps_saved_charges_all_data_only_until_its_own_final_accuracy():
  """Two seeds worked by hand. All data peaks early: seed 0 reaches its final 0.80 at step 20 of
  80 (share 0.25), seed 1 only at its end (share 1). The filtered runs reach all data's final
  accuracy at steps 20 and 40 (fractions 0.25, 0.5): saved 0 and 0.5, mean 0.25; against all data
  run to the end, 0.75 and 0.5."""
  runs = [{'all': {'curve': [(20, 0.80), (40, 0.85), (80, 0.80)], 'accuracy': 0.80, 'steps': 80}},
          {'all': {'curve': [(20, 0.70), (40, 0.75), (80, 0.80)], 'accuracy': 0.80, 'steps': 80}}]
  assert [compare.fraction_to_own_final(r['all']) for r in runs] == [0.25, 1.0]
  out = compare.steps_saved(runs, [0.25, 0.5], setup=1000, all_data=100)
  assert out['saved_vs_all_own']['diff'] == pytest.approx(0.25)
  assert out['saved_vs_all_own']['se'] == pytest.approx(np.std([0.0, 0.5], ddof=1) / np.sqrt(2))
  # Paid back after setup / (all_data * saving) runs: 1000 / (100 * 0.25) = 40 stopped at the own
  # final accuracy, 1000 / (100 * (1 - 0.375)) = 16 against all data run to the end.
  assert out['break_even_runs_vs_all_own'] == pytest.approx(40)
  assert compare.break_even(1000, 100, 0.375) == pytest.approx(16)
  assert compare.break_even(1000, 100, 0.5, all_fraction=0.4) is None  # never paid back
  assert compare.steps_saved(runs, [0.25, None], 1000, 100)['saved_vs_all_own'] is None


def test_learned_reads_kinds_against_clean_prose_and_weights_per_group():
  # domain 0 = prose, 1 = code; kinds: clean, random_bytes, boilerplate
  domain = np.array([0, 0, 0, 0, 1, 1, 0, 0])
  record = np.array([0, 0, 0, 0, 0, 0, 1, 2], np.int8)
  values = np.array([5.0, 6.0, 7.0, 8.0, 0.0, 9.0, 1.0, 6.5])
  info = pipeline.DataInfo('text', {'domain': jax.ShapeDtypeStruct((), np.int32)},
                           {'domain': 2}, None, {'domain': ('prose', 'code')})
  split = pipeline.Split({'domain': domain}, np.arange(8), record,
                         ('clean', 'random_bytes', 'boilerplate'), info)
  got = lm_curation.learned(values, split, temperature=2.0)
  assert got['auroc']['random_bytes'] == 1.0  # below every clean prose value
  assert got['auroc']['boilerplate'] == pytest.approx(0.5)  # above 2 of the 4 clean prose
  assert got['auroc']['code'] == pytest.approx(0.5)  # code: 0 (below all) and 9 (above all)
  w = np.exp(values / 2.0)
  w /= w.mean()
  assert got['mean_weight']['clean prose'] == pytest.approx(w[:4].mean())
  assert got['mean_weight']['code'] == pytest.approx(w[4:6].mean())
  assert got['mean_weight']['boilerplate'] == pytest.approx(w[7])
  assert got['mean_weight_domain']['all prose'] == pytest.approx(w[domain == 0].mean())
  assert 'mean_weight' not in lm_curation.learned(values, split)


def test_the_harm_probe_table_holds_every_kind_any_row_measured():
  """A row's AUROCs cover the kinds its sample drew: the table took its columns from the first
  row (dropping the others' group effects) and failed on a later row lacking one (KeyError)."""
  from bench import lm_harm_probe  # pylint: disable=g-import-not-at-top
  row = lambda age, kinds: {
      'size': 'inner', 'seed': 0, 'age': age, 'heldout_loss': 2.0,
      'group_effect': {'clean': -0.01, 'random_bytes': 0.02, 'truncated': 0.0},
      **{f'auroc_{m}': {k: 0.25 for k in kinds} for m in ('sgd', 'adam', 'loss')}}
  md = lm_harm_probe.markdown([row(1, ['truncated']), row(2, ['random_bytes'])], {})
  header, _, first, second = [l for l in md.splitlines() if l.startswith('|')][:4]
  cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
  assert cells(header)[4:] == ['clean change', 'random_bytes change', 'truncated change',
                               'random_bytes AUROC', 'truncated AUROC']
  assert cells(first)[4:] == ['-0.010', '+0.020', '+0.000', '- / -', '0.25 / 0.25']
  assert cells(second)[-2:] == ['0.25 / 0.25', '- / -']


def test_the_text_bench_config_passes_the_lm_benches_checks():
  """The checks lm_curation and lm_advance_probe run before any run accept their own config."""
  from configs import text_bench  # pylint: disable=g-import-not-at-top
  from datarater import config_checks  # pylint: disable=g-import-not-at-top
  config_checks.validate(text_bench.get_config(), lm_curation.CONFIG_SECTIONS)
  lm_curation.check_bench(text_bench.get_config('bench'))


def test_the_lm_bench_figure_draws_runs_evaluated_once(tmp_path):
  """A fresh LM whose steps end before its second evaluation (a smoke run's few
  --bench.transfer.steps) has a one-point curve: the figure read the second point, an IndexError
  after every run, leaving no figure. The stored results, each curve cut to its last point."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'bench', 'results', 'lm_curation.json')) as f:
    results = json.load(f)
  for seed in results['seeds'].values():
    for run in (r for by_keep in seed['runs'].values() for r in by_keep.values()):
      run['curve'] = run['curve'][-1:]
  path = tmp_path / 'lm_curation.png'
  lm_curation.plot(str(path), results['summary'], results['seeds'],
                   ml_collections.ConfigDict(results['bench']))
  assert path.stat().st_size > 0
