r"""Curation benchmark: filtered and re-weighted training vs all data and random subsets.

  python -m bench.curation            # 0/20/40% noise x 3 seeds, keep 0.5..0.9
  python -m bench.curation --quick    # 20% noise, 3 seeds, keep {0.5, 0.8}, 300-step raters

Measured on 2 CPU cores shared with other jobs (load ~5): the full sweep 22 min, of which ~75% is
meta-training the nine 600-step raters (`--rater_steps=300` halves that); --quick ~6 min.

On sklearn_digits, per label-noise rate p and seed s (noise draw, rater, valuations, task init and
data order all seeded by s): a DataRater is meta-learned (launch.train_rater, configs/digits.py)
and exported; TracIn self-influence and Grad-Mimic values are computed (configs/valuate.py). Then a
fresh task model (configs/train.py: MLP 128-128, Adam 1e-3, batch 128, fixed epochs) is trained on
(a) all data, (b) a uniformly random subset, (c) each method's filtered subset (the same exact
top-k as launch.filter) for every keep fraction, and (d) all data with each method's online
weights (launch.train policies). Reported: test accuracy (mean +- std over seeds) and compute in
example-gradients: training (epochs x examples) and, separately, the one-off cost of making the
method (the rater's meta-training counted as in datarater.export.rater_training_compute, a lower
bound; the valuations' recorded runs). Writes bench/results/curation{,_quick}.{json,png,md}.
"""
import json
import os
import platform
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np

from configs import digits as digits_config
from configs import train as train_config
from datarater import checkpointing, export, filtering, models, training
from datarater.data import pipeline
from datarater.evaluation import noise_auroc
from inner_loop.optimizers import make_inner_optimizer

FLAGS = flags.FLAGS
METHODS = ('datarater', 'tracin_self', 'mimic')
ONLINE = {'datarater': 'datarater', 'tracin_self': 'tracin_curriculum', 'mimic': 'mimic'}


def define_flags() -> None:
  flags.DEFINE_bool('quick', False, 'Smaller sweep: 20% noise, keep {0.5, 0.8}, 300 rater steps.')
  flags.DEFINE_list('noise', ['0.0', '0.2', '0.4'], 'Label-noise rates.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_list('keep', ['0.5', '0.6', '0.7', '0.8', '0.9'], 'Keep fractions.')
  flags.DEFINE_integer('rater_steps', 600, 'Outer steps of each rater (configs/digits.py: 600).')
  flags.DEFINE_integer('epochs', 40, 'Training epochs of every task model.')
  flags.DEFINE_string('data_dir', '', 'TFDS data_dir.')
  flags.DEFINE_string('out', '', 'Output prefix (default bench/results/curation[_quick]).')


def subset(split: pipeline.Split, mask: np.ndarray) -> pipeline.Split:
  idx = np.flatnonzero(mask)
  return pipeline.Split(split.image[idx], split.label[idx], split.clean_label[idx],
                        split.is_corrupted[idx], np.arange(len(idx)), split.num_classes)


def make_rater(noise: float, seed: int, steps: int, data_dir: str, tmp: str):
  c = digits_config.get_config()
  c.seed, c.data.noise_seed, c.data.label_noise, c.data.data_dir = seed, seed, noise, data_dir
  c.outer.steps, c.log_every, c.checkpoint_every = steps, steps, steps
  c.final_eval.train_steps, c.final_eval.num_models = 1, 1  # its report is not used here
  from launch import train_rater  # pylint: disable=g-import-not-at-top
  train_rater.train(c, os.path.join(tmp, 'run'))
  export.export_rater(os.path.join(tmp, 'run'), os.path.join(tmp, 'rater'), overwrite=True)
  return export.load_rater(os.path.join(tmp, 'rater'))


def run_one(noise, seed, keeps, args, trainers, tmp) -> dict:
  cfg = train_config.get_config()
  cfg.data.data_dir, cfg.data.label_noise, cfg.data.noise_seed = args['data_dir'], noise, seed
  v = cfg.valuation
  v.order_seed = v.init_seed = seed
  d = cfg.data
  train = pipeline.load_split(d.name, d.train_split, d.data_dir, noise, seed)
  heldout = pipeline.load_split(d.name, d.heldout_split, d.data_dir)
  test = pipeline.load_split(d.name, d.eval_split, d.data_dir)
  task, loss_fn = trainers['task'], trainers['loss_fn']
  ctx = training.PolicyContext(train, heldout, task, loss_fn, temperature=1.0,
                               valuation_config=cfg, seed=seed)
  t0 = time.time()
  rater = make_rater(noise, seed, args['rater_steps'], d.data_dir, tmp)
  timing = {'rater': time.time() - t0}
  values, setup, policies = {}, {}, {}
  values['datarater'] = rater(train.take(np.arange(len(train))))
  setup['datarater'] = rater.training_example_gradients
  policies['datarater'] = training.rater_policy(rater)
  t0 = time.time()
  policies['tracin_self'] = training.make_policy('tracin_curriculum', ctx)
  setup['tracin_self'] = policies['tracin_self'].setup_example_gradients
  from datarater.valuation import base, factory  # pylint: disable=g-import-not-at-top
  values['tracin_self'] = base.score_split(factory.build('tracin', cfg, train, heldout).value,
                                           train, progress=False)
  timing['tracin'] = time.time() - t0
  t0 = time.time()
  values['mimic'] = base.score_split(factory.build('mimic', cfg, train, heldout).value, train,
                                     progress=False)
  policies['mimic'] = training.make_policy('mimic', ctx)
  setup['mimic'] = training.valuation_compute('mimic', cfg, len(train))
  timing['mimic'] = time.time() - t0

  def fit(split, policy, trainer='uniform'):
    r = trainers[trainer].fit(split, {'test': test}, epochs=args['epochs'], batch_size=128,
                              seeds=[seed], policy=policy)
    return {'accuracy': r['final']['test_accuracy'], 'loss': r['final']['test_loss'],
            'example_gradients': r['example_gradients'], 'num_train': len(split)}

  t0 = time.time()
  uniform = training.Policy('uniform')
  out = {'all': fit(train, uniform), 'random': {}, 'filtered': {m: {} for m in METHODS},
         'online': {}, 'setup_example_gradients': setup,
         'auroc': {m: noise_auroc(values[m], train.is_corrupted) for m in METHODS}}
  rng = np.random.default_rng([seed, 7])
  for keep in keeps:
    k = filtering.keep_count(len(train), keep)
    rand = np.zeros(len(train), bool)
    rand[rng.permutation(len(train))[:k]] = True
    out['random'][keep] = fit(subset(train, rand), uniform)
    for m in METHODS:
      mask = filtering.select_top(values[m], keep)
      r = fit(subset(train, mask), uniform)
      r['kept_corrupted'] = int((mask & train.is_corrupted).sum())
      out['filtered'][m][keep] = r
  for m in METHODS:
    out['online'][m] = fit(train, policies[m], ONLINE[m])
  timing['training'] = time.time() - t0
  out['seconds'] = timing
  return out


def summarize(results: dict, noises, keeps) -> dict:
  """Mean and std over seeds of every (noise, setting)."""
  def stats(rows):
    acc = np.array([r['accuracy'] for r in rows])
    return {'accuracy_mean': float(acc.mean()), 'accuracy_std': float(acc.std()),
            'example_gradients': int(np.mean([r['example_gradients'] for r in rows])),
            'num_train': int(np.mean([r['num_train'] for r in rows]))}
  summary = {}
  for p in noises:
    runs = list(results[str(p)].values())
    s = {'all': stats([r['all'] for r in runs]),
         'random': {k: stats([r['random'][k] for r in runs]) for k in keeps},
         'filtered': {m: {k: stats([r['filtered'][m][k] for r in runs]) for k in keeps}
                      for m in METHODS},
         'online': {m: stats([r['online'][m] for r in runs]) for m in METHODS},
         'setup_example_gradients': {m: int(np.mean([r['setup_example_gradients'][m]
                                                     for r in runs])) for m in METHODS},
         'auroc': {m: float(np.mean([r['auroc'][m] for r in runs])) for m in METHODS}}
    summary[str(p)] = s
  return summary


def markdown(summary: dict, keeps, epochs: int) -> str:
  lines = [f'Test accuracy (%) of a fresh MLP after {epochs} epochs, mean +- std over seeds; '
           'compute in example-gradients (k = 1000): training + one-off method cost.', '',
           '| noise | setting | keep | accuracy | train | method cost |', '|---|---|---|---|---|---|']
  fmt = lambda s: f'{100 * s["accuracy_mean"]:.2f} +- {100 * s["accuracy_std"]:.2f}'
  for p, s in summary.items():
    lines.append(f'| {float(p):.0%} | all data | 1.0 | {fmt(s["all"])} | '
                 f'{s["all"]["example_gradients"] / 1e3:.0f}k | 0 |')
    for k in keeps:
      lines.append(f'| {float(p):.0%} | random subset | {k} | {fmt(s["random"][k])} | '
                   f'{s["random"][k]["example_gradients"] / 1e3:.0f}k | 0 |')
    for m in METHODS:
      cost = f'{s["setup_example_gradients"][m] / 1e3:.0f}k'
      for k in keeps:
        f = s['filtered'][m][k]
        lines.append(f'| {float(p):.0%} | {m} filtered | {k} | {fmt(f)} | '
                     f'{f["example_gradients"] / 1e3:.0f}k | {cost} |')
      o = s['online'][m]
      lines.append(f'| {float(p):.0%} | {m} online weights | 1.0 | {fmt(o)} | '
                   f'{o["example_gradients"] / 1e3:.0f}k | {cost} |')
  return '\n'.join(lines) + '\n'


def plot(path: str, summary: dict, keeps) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4), squeeze=False)
  ks = list(keeps)
  for ax, (p, s) in zip(axes[0], summary.items()):
    def line(rows, label, **kw):
      m = [100 * r['accuracy_mean'] for r in rows]
      e = [100 * r['accuracy_std'] for r in rows]
      ax.errorbar(ks + [1.0], m + [100 * s['all']['accuracy_mean']],
                  yerr=e + [100 * s['all']['accuracy_std']], capsize=3, label=label, **kw)
    line([s['random'][k] for k in keeps], 'random subset', color='gray', ls='--')
    for m, c in zip(METHODS, ('C0', 'C1', 'C2')):
      line([s['filtered'][m][k] for k in keeps], f'{m} filtered', color=c, marker='o')
      o = s['online'][m]
      ax.errorbar([1.02], [100 * o['accuracy_mean']], yerr=[100 * o['accuracy_std']], color=c,
                  marker='*', ms=11, capsize=3, ls='none', label=f'{m} online weights')
    ax.set_title(f'{float(p):.0%} label noise'); ax.set_xlabel('keep fraction (1.0 = all data)')
    ax.set_ylabel('test accuracy (%)'); ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger('datarater').disabled = True  # the rater runs' own progress lines
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  quick = FLAGS.quick
  noises = [0.2] if quick else [float(x) for x in FLAGS.noise]
  keeps = ['0.5', '0.8'] if quick else FLAGS.keep
  seeds = [int(s) for s in FLAGS.seeds]
  rater_steps = 300 if quick and FLAGS['rater_steps'].using_default_value else FLAGS.rater_steps
  args = {'data_dir': FLAGS.data_dir, 'epochs': FLAGS.epochs, 'rater_steps': rater_steps}
  out = FLAGS.out or ('bench/results/curation_quick' if quick else 'bench/results/curation')
  cfg = train_config.get_config()
  task = models.task_model(10, tuple(cfg.task_model.hidden), cfg.task_model.activation)
  loss_fn = lambda p, b: models.per_example_loss(task.apply, p, b)
  opt = make_inner_optimizer('adam', cfg.train.learning_rate)
  trainers = {'task': task, 'loss_fn': loss_fn}
  for name in ('uniform', *ONLINE.values()):
    policy_fn = {'uniform': training.uniform_weight_fn,
                 'tracin_curriculum': lambda t, p, b: t[b['index']]}.get(name)
    trainers[name] = None if policy_fn is None else training.Trainer(task, opt, policy_fn)
  results, t_start = {}, time.time()
  tmp_root = tempfile.mkdtemp(prefix='bench_curation_')
  try:
    for p in noises:
      results[str(p)] = {}
      for s in seeds:
        # Policies that close over per-run functions (rater, mimic) get their Trainer on first use.
        r = run_one_with_trainers(p, s, [float(k) for k in keeps], args, trainers, opt,
                                  os.path.join(tmp_root, f'{p}_{s}'))
        results[str(p)][str(s)] = r
        print(f'noise {p:.0%} seed {s}: all {100 * r["all"]["accuracy"]:.2f}% | ' + ' | '.join(
            f'{m} keep0.8 {100 * r["filtered"][m][0.8]["accuracy"]:.2f}% online '
            f'{100 * r["online"][m]["accuracy"]:.2f}%' for m in METHODS if 0.8 in r['filtered'][m])
            + f' | random keep0.8 {100 * r["random"].get(0.8, {"accuracy": float("nan")})["accuracy"]:.2f}%'
            + f' | {r["seconds"]}', flush=True)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  fkeeps = [float(k) for k in keeps]
  summary = summarize(results, noises, fkeeps)
  table = markdown(summary, fkeeps, args['epochs'])
  print(table)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  checkpointing.write_json_atomic(out + '.json', {
      'summary': summary, 'runs': results, 'args': args, 'noise': noises, 'seeds': seeds,
      'keep': fkeeps, 'seconds': time.time() - t_start, 'device': jax.devices()[0].device_kind,
      'platform': platform.platform(), 'note': 'accuracy = test split; compute = example-gradients'})
  with open(out + '.md.tmp', 'w') as f:
    f.write(table)
  os.replace(out + '.md.tmp', out + '.md')
  plot(out + '.png', summary, fkeeps)
  print(f'wrote {out}.json, {out}.md and {out}.png in {time.time() - t_start:.0f} s')


def run_one_with_trainers(p, s, keeps, args, trainers, opt, tmp):
  """run_one, after giving the datarater and mimic policies a shared Trainer (one compile)."""
  if trainers.get('datarater') is None:
    def rater_weights(rater_state, params, batch):
      module, tau, rater_params = trainers['rater_module'], 1.0, rater_state
      from inner_loop.weighting import softmax_weights  # pylint: disable=g-import-not-at-top
      scores = module.apply(rater_params, {'image': batch['image'], 'label': batch['label']})
      return jax.lax.stop_gradient(softmax_weights(scores, tau))
    trainers['rater_module'] = models.Rater(10, tuple(digits_config.get_config().rater.hidden))
    trainers['datarater'] = training.Trainer(trainers['task'], opt, rater_weights)
  if trainers.get('mimic') is None:
    trainers['mimic'] = _LazyTrainer(trainers['task'], opt)
  return run_one(p, s, keeps, args, trainers, tmp)


class _LazyTrainer:
  """A Trainer built from the first policy it is given (its weight_fn is the same every run)."""

  def __init__(self, task, opt):
    self.task, self.opt, self.trainer = task, opt, None

  def fit(self, split, evals, *, policy, **kw):
    if self.trainer is None:
      self.trainer = training.Trainer(self.task, self.opt, policy.weight_fn)
    return self.trainer.fit(split, evals, policy=policy, **kw)


if __name__ == '__main__':
  define_flags()
  app.run(main)
