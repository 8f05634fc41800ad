r"""How well each valuation separates corrupted examples from clean ones, over seeds and noise.

  python -m bench.valuation_noise                                  # digits, 20% noise, 3 seeds
  python -m bench.valuation_noise --config=configs/fashion_mnist.py --noise=0.2,0.4 --rater_steps=600

Per noise rate p and seed s (corruption draw, initialisation and data order all = s), on the
config's task and data: each method's values over the training split, and the AUROC
P(value of a clean example > value of a corrupted one), overall and per corruption kind. Methods:
TracIn self-influence, held-out influence and held-out Grad-Cos, Mimic (last layer, cosine, all
layers), data value embedding, and (with --rater_steps > 0) a DataRater meta-trained here with the
same data. Also: data value embedding's value by training phase, and curricula: fresh models
trained (the valuation run's optimizer and length) with soft loss weights from the values or on a
hard top-20% subset, and with Grad-Mimic's online weights, against uniform, by test accuracy.
Writes <out>.json, .png and .md.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import logging
import os
import platform
import shutil
import tempfile
import time

from absl import flags
import jax
import numpy as np

from bench import cli as bench_cli
from bench import provenance, runs
from datarater import evaluation, files, policies
from datarater.config_checks import MAX_SEED
from datarater.errors import UserError
from datarater.policies import weighting
from datarater.trainer import Trainer
from datarater.valuation import factory
from datarater.valuation.run import RunCache
from inner_loop.optimizers import make_inner_optimizer

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (corruption, init, data order).')
_NOISE = flags.DEFINE_list('noise', ['0.2'], 'Corruption rates (data.label_noise).')
_VARIANTS = flags.DEFINE_list(
    'variants', ['tracin_self', 'tracin_heldout', 'tracin_heldout_cos', 'mimic', 'mimic_cos',
                 'mimic_all_layers', 'dvemb'], 'Which valuations to run.')
_RATER_STEPS = flags.DEFINE_integer('rater_steps', 0, 'Outer steps of a DataRater per (noise, '
                                    'seed), 0: no DataRater.')
_RATER_DIR = flags.DEFINE_string(
    'rater_dir', '', 'Keep each (noise, seed) rater in this folder and reuse finished ones (the '
    'same folder given to bench.curation shares them); default: temporary.')
_CURRICULUM = flags.DEFINE_bool('curriculum', True, 'Run the curriculum comparisons.')
_OUT = flags.DEFINE_string('out', 'bench/results/valuation_noise', 'Output prefix.')

VARIANTS = {  # name -> (method, valuation overrides)
    'tracin_self': ('tracin', {'tracin_mode': 'self'}),
    'tracin_heldout': ('tracin', {'tracin_mode': 'heldout'}),
    'tracin_heldout_cos': ('tracin', {'tracin_mode': 'heldout_cos'}),
    'mimic': ('mimic', {}),
    'mimic_cos': ('mimic', {'mimic_cosine': True}),
    'mimic_all_layers': ('mimic', {'mimic_layers': ''}),
    'dvemb': ('dvemb', {}),
    'datarater': ('datarater', {}),
}
CURRICULUM_SOURCES = ('tracin_self', 'tracin_heldout_cos')  # values that drive a curriculum


def fresh_accuracy(config, task, train, test, policy, seed: int) -> float:
  """Test accuracy of 2 fresh models trained like the valuation run, under `policy`."""
  v = config.valuation
  run = Trainer(task, make_inner_optimizer(v.optimizer, v.learning_rate), policy,
                v.batch_size, batch_size_setting='valuation.batch_size').run(
      train, {'test': test}, [1000 + 10 * seed, 1001 + 10 * seed], steps=v.train_steps)
  return float(np.mean(run.final['test']['accuracy']))


def curriculum(config, task, train, test, values, seed: int) -> dict:
  soft = weighting.curriculum_weights(values, 'weight', temperature=1.0)
  hard = weighting.curriculum_weights(values, 'select', fraction=0.2)
  setups = {'uniform': weighting.weighting_policy('uniform', len(train)),
            'loss_weights': weighting.table('soft', soft),
            'select_top20': weighting.table('top20', hard)}
  return {name: fresh_accuracy(config, task, train, test, p, seed) for name, p in setups.items()}


def mimic_online(config, task, train, heldout, test, seed: int, temperatures=(1.0, 0.1)) -> dict:
  out = {}
  for tau in temperatures:
    c = config.copy_and_resolve_references()
    c.policy.temperature = tau
    policy = policies.make_policy('mimic', policies.PolicyContext(train, heldout, task, c))
    out[f'mimic_online_tau{tau:g}'] = fresh_accuracy(c, task, train, test, policy, seed)
  return out


def markdown(results: dict) -> str:
  kinds = sorted({k for r in results['runs'] for k in r['auroc_by_kind']})
  inputs = ', '.join(f'{k} {v:g}' for k, v in results.get('input_corruption', {}).items() if v)
  lines = [f'Noise AUROC (mean ± std over seeds {results["seeds"]}), '
           f'{results["dataset"]} ({results.get("train_split", "train")}), task '
           f'{results["task"]}; noise = {results.get("label_noise_kind", "symmetric")} label noise'
           + (f' plus input corruptions ({inputs})' if inputs else '')
           + f'; DataRater: {results["rater_steps"]} outer steps; seconds: each variant\'s own '
           'wall, the training run the gradient methods share counted in the first that records '
           'it:', '',
           '| ' + ' | '.join(['noise', 'method', 'overall', *kinds, 'seconds']) + ' |',
           '|---|---|---|' + '---|' * len(kinds) + '---|']
  for noise in results['noise']:
    for name in results['variants']:
      rs = [r for r in results['runs'] if r['noise'] == noise and r['variant'] == name]
      if not rs:
        continue
      n = len(results['seeds'])  # a seed that failed is named: its row holds fewer
      cell = lambda xs: f'{np.mean(xs):.3f} ± {np.std(xs):.3f}' + (
          f' (n={len(xs)} of {n})' if len(xs) < n else '')
      per_kind = [cell([r['auroc_by_kind'][k] for r in rs if k in r['auroc_by_kind']])
                  if any(k in r['auroc_by_kind'] for r in rs) else '' for k in kinds]
      secs = [r['seconds'] for r in rs if r['seconds'] is not None]  # None: meta-training
      lines.append('| ' + ' | '.join([f'{noise:.0%}', name, cell([r['auroc'] for r in rs]),
                                      *per_kind, f'{np.mean(secs):.0f}' if secs else '']) + ' |')
  for f in results.get('failed', []):
    lines.append(f'\nFailed: {f["variant"]} at {f["noise"]:.0%}, seed {f["seed"]}: {f["error"]}')
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(results['noise']), figsize=(7 * len(results['noise']), 4.4),
                           squeeze=False)
  for ax, noise in zip(axes[0], results['noise']):
    names = [n for n in results['variants']
             if any(r['variant'] == n and r['noise'] == noise for r in results['runs'])]
    for i, n in enumerate(names):
      per_seed = [r['auroc'] for r in results['runs'] if r['variant'] == n and r['noise'] == noise]
      ax.bar(i, np.mean(per_seed), color='C0', alpha=0.6)
      ax.plot([i] * len(per_seed), per_seed, 'k.', ms=8)
    ax.axhline(0.5, color='gray', ls=':', lw=1, label='chance')
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
    ax.set(ylim=(0.0, 1.03), ylabel='AUROC clean vs corrupted',  # dots at 1.0 stay whole
           title=f'{results["dataset"]}, {noise:.0%} corrupted (bars: mean, dots: seeds)')
    ax.legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=110)
  plt.close(fig)


def define_flags() -> None:
  """--config, and what the runs read of it: the DataRater's sections with --rater_steps (its
  variant), the curriculum's with --curriculum."""
  bench_cli.config_file('configs/digits.py')()
  bench_cli.define_config_check(
      'bench.valuation_noise',
      lambda fv: ('data', 'task', 'valuation')
      + (('rater', 'inner', 'outer', 'final_eval') if fv.rater_steps else ())
      + (('train', 'policy') if fv.curriculum else ()),
      {'outer.steps': '--rater_steps', 'data.label_noise': '--noise', 'seed': '--seeds',
       'data.noise_seed': '--seeds', 'valuation.seed': '--seeds'},
      depends=('--rater_steps', '--curriculum'))


def main(argv):
  del argv
  config = flags.FLAGS.config
  variants = list(dict.fromkeys(  # the DataRater's too when it has outer steps
      bench_cli.names('variants', _VARIANTS.value, VARIANTS, empty_ok=bool(_RATER_STEPS.value))
      + (['datarater'] if _RATER_STEPS.value else [])))
  if 'datarater' in variants and not _RATER_STEPS.value:
    raise UserError('--variants datarater needs --rater_steps >= 1 (its outer steps)')
  bench_cli.check_config()  # before any run (a bad value had each variant 'fail', exit 0)
  noises = bench_cli.noise_rates(_NOISE.value)
  seeds = bench_cli.seeds(_SEEDS.value)
  if max(seeds) > (MAX_SEED - 1001) // 10:  # the fresh models' seeds: 1000 + 10 s, 1001 + 10 s
    raise UserError(f'--seeds values must be <= {(MAX_SEED - 1001) // 10} (fresh models are '
                    f'seeded 1001 + 10 * seed), got {max(seeds)}')
  bench_cli.at_least('rater_steps', _RATER_STEPS.value, 0)  # 0: no DataRater
  if _RATER_DIR.value:
    bench_cli.writable('rater_dir', _RATER_DIR.value, folder=True)
  bench_cli.out_folder(_OUT.value)
  results = {'platform': platform.platform(), 'device': jax.devices()[0].device_kind,
             'dataset': config.data.name, 'task': config.task.name, 'noise': noises,
             'seeds': seeds, 'variants': variants, 'rater_steps': _RATER_STEPS.value,
             'train_split': config.data.train_split,
             'label_noise_kind': config.data.label_noise_kind,
             'input_corruption': dict(config.data.input_corruption),
             'runs': [], 'failed': [], 'dvemb_phase': [], 'curriculum': [], 'mimic_online': []}
  if not _RATER_DIR.value:  # its 'run again to resume' would name a temporary folder, removed
    logging.getLogger('datarater').disabled = True  # the rater runs' own progress lines
  t_start = time.time()
  tmp_root = tempfile.mkdtemp(prefix='bench_valuation_')
  try:  # removed however the runs end
    for noise in noises:
      for s in seeds:
        base = runs.seeded(config, noise, s)
        train, heldout, test, task = runs.splits_and_task(base)
        # The variants of a method value the same recorded training run: recorded once.
        cache = RunCache(os.path.join(tmp_root, f'runs_{noise:g}_{s}'), 'bench')
        rater_dir = ''
        if 'datarater' in variants:
          t0 = time.perf_counter()
          rater_dir = runs.train_rater(base, _RATER_STEPS.value, runs.rater_workdir(
              _RATER_DIR.value or os.path.join(tmp_root, 'raters'), noise, s, _RATER_STEPS.value))
          results.setdefault('rater_seconds', []).append(time.perf_counter() - t0)
        for name in variants:
          method, overrides = VARIANTS[name]
          c = runs.seeded(config, noise, s, dict(overrides, rater=rater_dir))
          t0 = time.perf_counter()
          try:  # a method that fails (or gives non-finite values) is reported, the others go on
            val = factory.build(method, c, task, train, heldout, cache)
            values = val.values(train, c.valuation.score_batch_size)
            if not np.all(np.isfinite(values)):
              raise FloatingPointError(f'{int(np.sum(~np.isfinite(values)))} non-finite values')
          except Exception as e:  # pylint: disable=broad-except
            results['failed'].append({'noise': noise, 'seed': s, 'variant': name,
                                      'error': f'{type(e).__name__}: {e}'})
            print(f'noise {noise:.0%} seed {s} {name:20s} FAILED: {type(e).__name__}: {e}',
                  flush=True)
            continue
          secs = time.perf_counter() - t0
          run = {'noise': noise, 'seed': s, 'variant': name, 'seconds': secs,
                 'example_gradients': int(val.example_gradients),
                 'auroc': evaluation.noise_auroc(values, train.is_corrupted),
                 'auroc_by_kind': evaluation.auroc_by_kind(values, train.corruption,
                                                           train.corruption_kinds)}
          if name == 'datarater':
            run['seconds'] = None  # meta-training time is reported by launch.train_rater
          results['runs'].append(run)
          kinds = ', '.join(f'{k} {v:.3f}' for k, v in run['auroc_by_kind'].items())
          print(f'noise {noise:.0%} seed {s} {name:20s} AUROC {run["auroc"]:.3f} ({kinds}) '
                f'({secs:.1f} s) [{time.time() - t_start:.0f} s]', flush=True)
          if name == 'dvemb':
            phases = val.phase_values()
            results['dvemb_phase'].append({
                'noise': noise, 'seed': s,
                'mean_abs_value': [float(np.mean(np.abs(p))) for p in phases],
                'auroc': [evaluation.noise_auroc(p, train.is_corrupted) for p in phases]})
          if name == 'mimic' and _CURRICULUM.value:
            acc = mimic_online(c, task, train, heldout, test, s)
            results['mimic_online'].append({'noise': noise, 'seed': s, **acc})
            print('  mimic online: test accuracy ' + ', '.join(
                f'{k} {100 * v:.2f}%' for k, v in acc.items()), flush=True)
          if name in CURRICULUM_SOURCES and _CURRICULUM.value:
            acc = curriculum(c, task, train, test, values, s)
            results['curriculum'].append({'noise': noise, 'seed': s, 'source': name, **acc})
            print(f'  curriculum from {name}: test accuracy ' + ', '.join(
                f'{k} {100 * v:.2f}%' for k, v in acc.items()), flush=True)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  results['total_s'] = time.time() - t_start
  md = markdown(results)
  provenance.write_results(_OUT.value, results, md, lambda path: plot(results, path))
  print(md)
  print(f'wrote {_OUT.value}.json, .md and .png')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
