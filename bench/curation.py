r"""Curation benchmark: filtered and re-weighted training against all data and random subsets.

  python -m bench.curation                                    # digits, 0/20/40% noise x 3 seeds
  python -m bench.curation --config=configs/fashion_mnist.py --seeds=0,1,2,3,4

Per corruption rate p and seed s (corruption draw, rater, valuations, initialisation and data
order all seeded by s), on the config's task and data: a DataRater is meta-learned
(`datarater.meta_train`, the config's rater settings, --rater_steps outer steps); TracIn
self-influence and Grad-Mimic values are computed (the config's `valuation` section). Then fresh
task models (the config's `train` section, --epochs) are trained on (a) all data, (b) a uniformly
random subset of each keep fraction, (c) each method's filtered subset (the same exact top-k as
launch.filter) at each keep fraction and at the keep fraction the rater's own score histogram
suggests (the share of its upper cluster, `select.suggest_keep`), and (d) all data
with each method's online weights (the launch.train policies datarater, tracin_curriculum, mimic).
Reported: test accuracy (mean, std, and paired standard errors of the differences against all
data and against the random subset of the same size, pairs = seeds), accuracy against training
steps, the steps a filtered run needs to reach all data's final test accuracy (a fraction of all
data's steps: the DataRater paper's compute-saving measure), and compute in example-gradients:
training, and the one-off cost of each method (the rater's meta-training counted as in
`datarater.export.rater_training_compute`, a lower bound), with the break-even number of training
runs. Under noise all data's own curve often reaches its final accuracy before its last step; the
summary also gives that share per seed, the paired saving against it and the break-even runs at that
saving (`compare.steps_saved`; `bench.steps_saved` reads it off stored results). Writes
<out>.json, .md and .png.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import os
import platform
import shutil
import tempfile
import time

from absl import flags
import jax
import numpy as np

from bench import cli as bench_cli
from bench import compare
from bench import provenance
from bench import runs as bench_runs
from datarater import config_checks, evaluation, export, files, policies
from datarater.curation import select
from datarater.errors import UserError
from datarater.policies import weighting
from datarater.valuation import factory
from datarater.valuation.run import RunCache

_NOISE = flags.DEFINE_list('noise', ['0.0', '0.2', '0.4'], 'Corruption rates.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_SEEDS_BY_NOISE = flags.DEFINE_list(
    'seeds_by_noise', [], 'Per-noise seed counts overriding --seeds, e.g. 0.2:5 (seeds 0-4).')
_RATER_DIR = flags.DEFINE_string(
    'rater_dir', '', 'Keep each (noise, seed) rater in this folder and reuse finished ones (the '
    'same folder given to bench.valuation_noise shares them); default: temporary.')
_KEEP = flags.DEFINE_list('keep', ['0.5', '0.6', '0.7', '0.8', '0.9'], 'Keep fractions.')
METHODS = ('datarater', 'tracin_self', 'mimic')
_METHODS = flags.DEFINE_list('methods', list(METHODS), 'Methods.')
_RATER_STEPS = flags.DEFINE_integer('rater_steps', 600, 'Outer steps of each rater.')
_EPOCHS = flags.DEFINE_integer('epochs', 40, 'Training epochs of every task model.')
_EVALS = flags.DEFINE_integer('evals_per_epoch', 1, 'Test evaluations per epoch (curves).')
_OUT = flags.DEFINE_string('out', 'bench/results/curation', 'Output prefix.')
_RANDOM_SUBSET = 0x52414E44  # 'RAND': the random subsets' own generators


def train_run(config, task, split, test, policy, seed: int) -> dict:
  return compare.train_run(task, config.train, split, test, policy, seed, 'accuracy',
                           _EVALS.value, epochs=_EPOCHS.value)


def run_one(config, noise: float, seed: int, keeps, methods, tmp: str) -> dict:
  c = bench_runs.seeded(config, noise, seed)
  train, heldout, test, task = bench_runs.splits_and_task(c)
  values, setup, online, timing = {}, {}, {}, {}
  if 'datarater' in methods:
    t0 = time.time()
    rater_dir = bench_runs.train_rater(c, _RATER_STEPS.value, bench_runs.rater_workdir(
        _RATER_DIR.value or tmp, noise, seed, _RATER_STEPS.value))
    rater = export.load_rater(rater_dir)
    values['datarater'] = rater(train.features)
    setup['datarater'] = rater.training_example_gradients
    online['datarater'] = weighting.rater_weights(rater.rater, rater.params, rater.temperature,
                                                  len(train), setup['datarater'])
    timing['datarater'] = time.time() - t0
  ctx = policies.PolicyContext(train, heldout, task, c)
  cache = RunCache(os.path.join(tmp, 'runs'), 'bench')  # TracIn and Mimic read the same run
  for name, method in (('tracin_self', 'tracin'), ('mimic', 'mimic')):
    if name not in methods:
      continue
    t0 = time.time()
    val = factory.build(method, c, task, train, heldout, cache)
    values[name] = val.values(train, c.valuation.score_batch_size)
    setup[name] = val.example_gradients
    online[name] = (weighting.table('tracin_curriculum', weighting.curriculum_weights(
        values[name], temperature=c.policy.temperature), setup[name]) if name == 'tracin_self'
                    else policies.make_policy('mimic', ctx))
    timing[name] = time.time() - t0
  for m, v in values.items():  # (select_top's refusal named an example id, not the method)
    bad = int(np.sum(~np.isfinite(v)))
    if bad:
      raise UserError(f'{m} gave {bad} non-finite values at noise {noise:g}, seed {seed}: it '
                      'cannot rank the split (leave it out of --methods, or change its settings)')
  suggested = None
  if 'datarater' in values:  # the share of the rater's upper score cluster, exactly its count
    suggested = select.suggest_keep(values['datarater'])
  t0 = time.time()
  uniform = weighting.weighting_policy('uniform', len(train))
  out = {'all': train_run(c, task, train, test, uniform, seed), 'random': {},
         'filtered': {m: {} for m in methods}, 'online': {}, 'setup_example_gradients': setup,
         'suggested_keep': suggested,
         'auroc': {m: evaluation.noise_auroc(values[m], train.is_corrupted) for m in methods},
         'auroc_by_kind': {m: evaluation.auroc_by_kind(values[m], train.corruption,
                                                       train.corruption_kinds) for m in methods}}
  all_keeps = sorted(set(keeps) | ({suggested} if suggested and suggested < 1 else set()))
  for keep in all_keeps:
    k = select.keep_count(len(train), keep)
    # Its own draw per (seed, size): the same subset whichever other keeps the run holds.
    rand = np.sort(np.random.default_rng([_RANDOM_SUBSET, seed, k]).permutation(len(train))[:k])
    out['random'][keep] = train_run(c, task, train.subset(rand), test,
                                    weighting.weighting_policy('uniform', k), seed)
    # At the rater's suggested keep (if not a listed one): the rater's subset alone.
    for m in (methods if keep in keeps else ['datarater']):
      mask = select.select_top(values[m], keep)
      r = train_run(c, task, train.subset(np.flatnonzero(mask)), test,
                    weighting.weighting_policy('uniform', int(mask.sum())), seed)
      r['kept_corrupted'] = int((mask & train.is_corrupted).sum())
      out['filtered'][m][keep] = r
  if suggested is not None and suggested >= 1:  # the rater keeps everything: all data's run
    whole = {**out['all'], 'kept_corrupted': int(train.is_corrupted.sum())}
    out['random'][suggested] = out['filtered']['datarater'][suggested] = whole
  for m in methods:
    out['online'][m] = train_run(c, task, train, test, online[m], seed)
  timing['training'] = time.time() - t0
  out['seconds'] = timing
  return out


def checks(s: dict) -> dict:
  """The issue's checks on one noise rate's summary, DataRater at its suggested keep: better than
  all data and than the random subset by >= 2 paired standard errors, noise AUROC >= 0.95 (over
  all corrupted examples; the AUROC of each kind is reported beside it, not checked), steps to all
  data's final accuracy <= 0.7 of all data's."""
  d = s['datarater_at_suggested']
  beats = lambda x: bool(x['diff'] - 2 * x['se'] > 0)
  return {'beats_all_by_2se': beats(d['vs_all']), 'beats_random_by_2se': beats(d['vs_random']),
          'auroc': s['auroc']['datarater'], 'auroc_ge_0.95': s['auroc']['datarater'] >= 0.95,
          'auroc_by_kind': s['auroc_by_kind']['datarater'],
          'steps_fraction': d['steps_to_all_final_mean'],
          'steps_fraction_std': d['steps_to_all_final_std'],
          'steps_fraction_le_0.7': bool(d['steps_to_all_final_mean'] is not None and
                                        d['steps_to_all_final_mean'] <= 0.7)}


def summarize(runs: dict, noises, keeps, methods) -> dict:
  """Per noise: accuracy stats, paired differences, steps-to-target fractions, costs."""
  summary = {}
  for p in noises:
    rs = list(runs[str(p)].values())
    acc = lambda get: [get(r)['accuracy'] for r in rs]
    all_acc = acc(lambda r: r['all'])
    s = {'all': {**compare.stats(all_acc), 'example_gradients': int(np.mean(
        [r['all']['example_gradients'] for r in rs]))}, 'random': {}, 'filtered': {},
         'online': {}, 'auroc': {}, 'auroc_by_kind': {}, 'setup_example_gradients': {}}
    for k in keeps:
      if all(k in r['random'] for r in rs):
        s['random'][k] = compare.stats(acc(lambda r, k=k: r['random'][k]))
    for m in methods:
      s['auroc'][m] = float(np.mean([r['auroc'][m] for r in rs]))
      kinds = sorted({kind for r in rs for kind in r['auroc_by_kind'][m]})
      s['auroc_by_kind'][m] = {kind: float(np.mean([r['auroc_by_kind'][m][kind] for r in rs]))
                               for kind in kinds}
      s['setup_example_gradients'][m] = int(np.mean([r['setup_example_gradients'][m] for r in rs]))
      s['filtered'][m] = {}
      for k in keeps:
        if not all(k in r['filtered'][m] for r in rs):
          continue
        fil = acc(lambda r, k=k: r['filtered'][m][k])
        fractions = []
        for r in rs:
          reached = compare.steps_to_reach(r['filtered'][m][k]['curve'], r['all']['accuracy'])
          fractions.append(reached / r['all']['steps'] if reached is not None else None)
        got = [f for f in fractions if f is not None]
        mean_fraction = float(np.mean(got)) if len(got) == len(rs) else None
        s['filtered'][m][k] = {
            **compare.stats(fil), 'vs_all': compare.paired(fil, all_acc),
            'vs_random': compare.paired(fil, acc(lambda r, k=k: r['random'][k])),
            'example_gradients': int(np.mean([r['filtered'][m][k]['example_gradients']
                                              for r in rs])),
            'kept_corrupted': float(np.mean([r['filtered'][m][k]['kept_corrupted'] for r in rs])),
            'steps_to_all_final': fractions,
            'steps_to_all_final_mean': mean_fraction,
            'steps_to_all_final_std': float(np.std(got)) if len(got) == len(rs) else None,
            'break_even_runs': compare.break_even(s['setup_example_gradients'][m],
                                          s['all']['example_gradients'], mean_fraction),
            **compare.steps_saved(rs, fractions, s['setup_example_gradients'][m],
                          s['all']['example_gradients'])}
      on = acc(lambda r, m=m: r['online'][m])
      s['online'][m] = {**compare.stats(on), 'vs_all': compare.paired(on, all_acc)}
    sug = [r['suggested_keep'] for r in rs if r.get('suggested_keep')]
    if sug and len(sug) == len(rs):
      s['suggested_keep'] = sug
      dr = [r['filtered']['datarater'][r['suggested_keep']] for r in rs]
      fractions = [compare.steps_to_reach(x['curve'], r['all']['accuracy']) for x, r in zip(dr, rs)]
      fractions = [None if f is None else f / r['all']['steps'] for f, r in zip(fractions, rs)]
      got = [f for f in fractions if f is not None]
      mean_fraction = float(np.mean(got)) if len(got) == len(rs) else None
      s['random_at_suggested'] = compare.stats(
          [r['random'][r['suggested_keep']]['accuracy'] for r in rs])
      s['datarater_at_suggested'] = {
          **compare.stats([x['accuracy'] for x in dr]),
          'vs_all': compare.paired([x['accuracy'] for x in dr], all_acc),
          'vs_random': compare.paired([x['accuracy'] for x in dr],
                               [r['random'][r['suggested_keep']]['accuracy'] for r in rs]),
          'steps_to_all_final': fractions, 'steps_to_all_final_mean': mean_fraction,
          'steps_to_all_final_std': float(np.std(got)) if len(got) == len(rs) else None,
          'break_even_runs': compare.break_even(s['setup_example_gradients']['datarater'],
                                        s['all']['example_gradients'], mean_fraction),
          **compare.steps_saved(rs, fractions, s['setup_example_gradients']['datarater'],
                        s['all']['example_gradients'])}
      s['checks'] = checks(s)
    summary[str(p)] = s
  return summary


def markdown(summary: dict, keeps, methods, epochs: int, dataset: str) -> str:
  lines = [f'{dataset}: test accuracy (%) of fresh task models after {epochs} epochs, mean ± std '
           'over seeds; differences in points with paired standard errors (pairs = seeds); '
           '"steps to all" = steps a filtered run needs to reach all data\'s final test accuracy, '
           'as a fraction of all data\'s steps (mean ± std over seeds, - = not reached in some '
           'seed); compute in example-gradients (k = 1000); "break-even" = training runs (each '
           'stopped at all data\'s final accuracy) after which the method\'s one-off cost is paid '
           'back.', '',
           '| noise | setting | keep | accuracy | - all data | - random | steps to all | train | '
           'method cost | break-even runs |', '|---|---|---|---|---|---|---|---|---|---|']
  even = lambda x: '-' if x is None else f'{x:.1f}'
  steps_cell = lambda f: ('-' if f['steps_to_all_final_mean'] is None else
                          f'{f["steps_to_all_final_mean"]:.2f} ± {f["steps_to_all_final_std"]:.2f}')
  fmt = lambda s: f'{s["mean"]:.2f} ± {s["std"]:.2f}'
  dif = lambda d: f'{d["diff"]:+.2f} ± ' + (f'{d["se"]:.2f}' if np.isfinite(d['se']) else 'n/a')
  for p, s in summary.items():
    lines.append(f'| {float(p):.0%} | all data | 1.0 | {fmt(s["all"])} | | | 1.0 | '
                 f'{s["all"]["example_gradients"] / 1e3:.0f}k | 0 | |')
    for k in keeps:
      if k in s['random']:
        lines.append(f'| {float(p):.0%} | random subset | {k} | {fmt(s["random"][k])} | | | | | 0 '
                     '| |')
    for m in methods:
      cost = f'{s["setup_example_gradients"][m] / 1e3:.0f}k'
      for k in keeps:
        if k not in s['filtered'][m]:
          continue
        f = s['filtered'][m][k]
        lines.append(f'| {float(p):.0%} | {m} filtered | {k} | {fmt(f)} | {dif(f["vs_all"])} | '
                     f'{dif(f["vs_random"])} | {steps_cell(f)} | '
                     f'{f["example_gradients"] / 1e3:.0f}k | {cost} | {even(f["break_even_runs"])} |')
      o = s['online'][m]
      lines.append(f'| {float(p):.0%} | {m} online weights | 1.0 | {fmt(o)} | {dif(o["vs_all"])} '
                   f'| | | | {cost} | |')
    if 'datarater_at_suggested' in s:
      d = s['datarater_at_suggested']
      lines.append(f'| {float(p):.0%} | random subset at that keep (its - random baseline) | '
                   f'{np.mean(s["suggested_keep"]):.3f} | {fmt(s["random_at_suggested"])} | | | | '
                   '| 0 | |')
      lines.append(f'| {float(p):.0%} | DataRater at its suggested keep | '
                   f'{np.mean(s["suggested_keep"]):.3f} | {fmt(d)} | {dif(d["vs_all"])} | '
                   f'{dif(d["vs_random"])} | {steps_cell(d)} | | '
                   f'{s["setup_example_gradients"]["datarater"] / 1e3:.0f}k | '
                   f'{even(d["break_even_runs"])} |')
  lines += ['', 'Checks (DataRater at its suggested keep; pass = difference > 2 paired s.e.):', '']
  for p, s in summary.items():
    if 'checks' in s:
      c = s['checks']
      kinds = ', '.join(f'{k} {v:.3f}' for k, v in c['auroc_by_kind'].items())
      frac = '-' if c['steps_fraction'] is None else (f'{c["steps_fraction"]:.2f} ± '
                                                      f'{c["steps_fraction_std"]:.2f}')
      lines.append(f'- {float(p):.0%}: beats all data {c["beats_all_by_2se"]}, beats random '
                   f'{c["beats_random_by_2se"]}; noise AUROC {c["auroc"]:.3f} (>= 0.95: '
                   f'{c["auroc_ge_0.95"]}; by kind: {kinds}); steps to all data\'s final '
                   f'accuracy {frac} (<= 0.7: {c["steps_fraction_le_0.7"]})')
  return '\n'.join(lines) + '\n'


def plot(path: str, summary: dict, runs: dict, keeps, methods, dataset: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  by_keep = lambda d: {float(k): v for k, v in d.items()}  # stored JSON's keys are strings
  keeps = [float(k) for k in keeps]
  fig, axes = plt.subplots(2, len(summary), figsize=(5.5 * len(summary), 8), squeeze=False)
  for col, (p, s) in enumerate(summary.items()):
    ax = axes[0][col]
    random = by_keep(s['random'])
    ks = [k for k in keeps if k in random]
    ax.errorbar(ks + [1.0], [random[k]['mean'] for k in ks] + [s['all']['mean']],
                yerr=[random[k]['std'] for k in ks] + [s['all']['std']], capsize=3,
                label='random subset', color='gray', ls='--')
    for i, m in enumerate(methods):
      filtered = by_keep(s['filtered'][m])
      fk = [k for k in keeps if k in filtered]
      ax.errorbar(fk, [filtered[k]['mean'] for k in fk],
                  yerr=[filtered[k]['std'] for k in fk], capsize=3, marker='o',
                  color=f'C{i}', label=f'{m} filtered')
      o = s['online'][m]
      ax.errorbar([1.02 + 0.01 * i], [o['mean']], yerr=[o['std']], color=f'C{i}', marker='*',
                  ms=11, capsize=3, ls='none', label=f'{m} online weights')
    ax.set(title=f'{float(p):.0%} corrupted ({len(runs[p])} seeds)',
           xlabel='keep fraction (1.0 = all data)', ylabel='test accuracy (%), mean ± std')
    ax.grid(alpha=0.3)
    ax = axes[1][col]  # accuracy against steps, seed-averaged, at keep 0.8 (or the nearest)
    k = min(keeps, key=lambda x: abs(x - 0.8))
    rs = list(runs[p].values())
    for name, get, color in [('all data', lambda r: r['all'], 'k'),
                             (f'random {k}', lambda r: by_keep(r['random'])[k], 'gray')] + [
        (f'{m} filtered {k}', lambda r, m=m: by_keep(r['filtered'][m])[k], f'C{i}')
        for i, m in enumerate(methods)]:
      curves = [np.asarray(get(r)['curve']) for r in rs]
      n = min(len(c) for c in curves)
      mean = np.mean([c[:n, 1] for c in curves], 0)
      ax.plot(np.mean([c[:n, 0] for c in curves], 0), 100 * mean, color=color, label=name)
    ax.set(xlabel='training steps', ylabel='test accuracy (%), seed mean',
           title=f'{float(p):.0%} corrupted: accuracy vs steps, keep {k}')
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  axes[1][0].legend(fontsize=7)
  fig.suptitle(os.path.basename(path).removesuffix('.png') + (f' ({dataset})' if dataset else ''))
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def define_flags() -> None:
  """--config, and what its rater runs, valuations and fresh models read of it."""
  bench_cli.config_file('configs/digits.py')()
  bench_cli.define_config_check(
      'bench.curation', ('data', 'task', 'rater', 'inner', 'outer', 'final_eval', 'train',
                         'policy', 'valuation'),
      {'train.epochs': '--epochs', 'outer.steps': '--rater_steps', 'data.label_noise': '--noise',
       'seed': '--seeds', 'data.noise_seed': '--seeds', 'valuation.seed': '--seeds'})


def main(argv):
  del argv
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger('datarater').disabled = True  # the rater runs' own progress lines
  config = flags.FLAGS.config
  bench_cli.check_config()  # before any run
  noises = bench_cli.noise_rates(_NOISE.value)
  keeps = bench_cli.numbers('keep', _KEEP.value, float, lambda x: 0 < x <= 1, 'in (0, 1]',
                            distinct=True)
  seeds = bench_cli.seeds(_SEEDS.value)
  bench_cli.at_least('epochs', _EPOCHS.value, 1)
  bench_cli.at_least('rater_steps', _RATER_STEPS.value, 1)
  bench_cli.at_least('evals_per_epoch', _EVALS.value, 1)
  try:
    pairs = [(float(x.split(':')[0]), int(x.split(':')[1])) for x in _SEEDS_BY_NOISE.value]
  except (ValueError, IndexError):
    raise UserError('--seeds_by_noise must be NOISE:COUNT pairs separated by commas, got '
                    f'{",".join(_SEEDS_BY_NOISE.value)!r}') from None
  most = config_checks.MAX_SEED + 1
  bad = [x for x, (p, n) in zip(_SEEDS_BY_NOISE.value, pairs)
         if not (0 <= p < 1 and 1 <= n <= most)]
  if bad:
    raise UserError(f'--seeds_by_noise needs a noise in [0, 1) and a count in [1, {most}], got '
                    f'{bad[0]!r}')
  by_noise = {p: range(n) for p, n in pairs}
  if len(by_noise) < len(pairs):
    raise UserError(f'--seeds_by_noise names a noise twice: {",".join(_SEEDS_BY_NOISE.value)!r}')
  unused = sorted(set(by_noise) - set(noises))
  if unused:
    raise UserError(f'--seeds_by_noise names noise {unused[0]:g}, which --noise does not hold')
  methods = bench_cli.names('methods', _METHODS.value, METHODS)
  if _RATER_DIR.value:
    bench_cli.writable('rater_dir', _RATER_DIR.value, folder=True)
  bench_cli.out_folder(_OUT.value)
  runs, t_start = {}, time.time()
  tmp_root = tempfile.mkdtemp(prefix='bench_curation_')
  try:
    for p in noises:
      runs[str(p)] = {}
      for s in by_noise.get(p, seeds):
        print(f'noise {p:.0%} seed {s}: the valuations and raters, then fresh models on every '
              f'corpus ... [{time.time() - t_start:.0f} s]', flush=True)
        r = run_one(config, p, s, keeps, methods, os.path.join(tmp_root, f'{p}_{s}'))
        runs[str(p)][str(s)] = r
        k = min(keeps, key=lambda x: abs(x - 0.8))
        print(f'noise {p:.0%} seed {s}: all {100 * r["all"]["accuracy"]:.2f}% | random {k} '
              f'{100 * r["random"][k]["accuracy"]:.2f}% | ' + ' | '.join(
                  f'{m} {k} {100 * r["filtered"][m][k]["accuracy"]:.2f}% online '
                  f'{100 * r["online"][m]["accuracy"]:.2f}% (AUROC {r["auroc"][m]:.3f})'
                  for m in methods) + f' | suggested keep {r["suggested_keep"] or 0:.3f} | '
              f'{ {k: round(v) for k, v in r["seconds"].items()} } s '
              f'[{time.time() - t_start:.0f} s]', flush=True)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  summary = summarize(runs, noises, keeps, methods)
  table = markdown(summary, keeps, methods, _EPOCHS.value, config.data.name)
  print(table)
  provenance.write_results(_OUT.value, {
      'summary': summary, 'runs': runs, 'noise': noises,
      'seeds': {str(p): list(by_noise.get(p, seeds)) for p in noises}, 'keep': keeps,
      'methods': methods, 'epochs': _EPOCHS.value, 'rater_steps': _RATER_STEPS.value,
      'config': config.to_dict(), 'seconds': time.time() - t_start,
      'device': jax.devices()[0].device_kind, 'platform': platform.platform()},
      table, lambda path: plot(path, summary, runs, keeps, methods, config.data.name))
  print(f'wrote {_OUT.value}.json, .md and .png in {time.time() - t_start:.0f} s')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
