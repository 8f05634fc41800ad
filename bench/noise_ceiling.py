r"""How far any per-example score can separate the corrupted examples, with the config's own model.

  python -m bench.noise_ceiling --config=configs/fashion_mnist_bench.py --noise=0.2,0.4

A corrupted label is found by asking how likely a model finds it: score = log p(given label | x).
Per noise rate p and seed s (corruption draw = s, as in bench.valuation_noise), the config's task
trained with uniform weights gives three such detectors of the training split:
- `crossfit_noisy`: k-fold cross-fitting on the split itself, each fold scored by a model trained
  on the other folds' (corrupted) labels: what a detector that sees only the corrupted split can
  reach with this model (confident learning's recipe);
- `crossfit_clean`: the same folds, trained on the other folds' *true* labels: the model knows
  the labelling, so only the ambiguity of the images and the model's limits remain;
- `clean_other`: one model per seed trained on `--other_split` (other images of the dataset, never
  corrupted), scoring the whole split: the same with 9x more data.
AUROC of clean against corrupted, overall and per corruption kind, and each model's accuracy on
the validation split (the test split is not read). Writes <out>.json and .md.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import dataclasses
import platform
import time

from absl import flags
import jax
import numpy as np

from bench import cli as bench_cli
from bench import provenance, runs
from datarater import evaluation, tasks
from datarater.config_checks import MAX_SEED
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.policies import weighting
from datarater.trainer import Trainer
from inner_loop.optimizers import make_inner_optimizer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when run as a program, so tests can import this module (and others) freely."""
  bench_cli.config_file('configs/fashion_mnist_bench.py')()
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (corruption draw, init, order).')
  flags.DEFINE_list('noise', ['0.2', '0.4'], 'Corruption rates (data.label_noise).')
  flags.DEFINE_integer('folds', 5, 'Cross-fitting folds (2 to 99).')
  flags.DEFINE_integer('epochs', 8, 'Epochs of every detector model.')
  flags.DEFINE_string('other_split', 'train[5000:50000]',
                      'Uncorrupted images for `clean_other` ("" skips it).')
  flags.DEFINE_string('val_split', 'train[55000:]', 'Where detector accuracy is measured.')
  flags.DEFINE_string('out', 'bench/results/noise_ceiling', 'Output prefix.')
  bench_cli.define_config_check(  # what its models read
      'bench.noise_ceiling', ('data', 'task', 'train'),
      {'train.epochs': '--epochs', 'data.label_noise': '--noise', 'seed': '--seeds',
       'data.noise_seed': '--seeds'})


_FOLD_TAG = 0x464F4C44  # 'FOLD': the folds' own generators


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
  """The cross-fitting fold of each of n examples for `seed`: `folds` folds of sizes within one
  of each other, from a shuffle whose generator's seed starts with a tag of its own (seeded s
  alone it would be the corruption record's permutation of noise seed s)."""
  return np.random.default_rng([_FOLD_TAG, seed]).permutation(n) % folds


def with_clean_labels(split):
  """`split` with its original labels put back (corrupted inputs stay as they are)."""
  return dataclasses.replace(split, features={**split.features, **split.clean})


def train_model(config, task, fit, val, seed: int):
  """(parameters of a model of `task` trained on `fit` with uniform weights, its val accuracy)."""
  t = config.train
  trainer = Trainer(task, make_inner_optimizer(t.optimizer, t.learning_rate),
                    weighting.weighting_policy('uniform', len(fit)), t.batch_size,
                    batch_size_setting='train.batch_size')
  result = trainer.run(fit, {'val': val}, [seed], epochs=FLAGS.epochs)
  return (jax.tree.map(lambda p: p[0], result.params),
          float(result.final['val']['accuracy'][0]))


def log_likelihood(task, params, split) -> np.ndarray:
  """log p(given label | x) of every example of `split` (= minus its loss)."""
  return evaluation.score_split(lambda b: -task.per_example_loss(params, b), split)


def markdown(results: dict) -> str:
  kinds = sorted({k for r in results['runs'] for k in r['auroc_by_kind']})
  lines = [f'Noise AUROC of log p(given label | x) (mean ± std over seeds {results["seeds"]}), '
           f'{results["dataset"]} ({results["train_split"]}), task {results["task"]}, '
           f'{results["epochs"]} epochs per model, {results["folds"]}-fold cross-fitting; '
           f'`clean_other`: trained on {results["other_split"]}; val accuracy on '
           f'{results["val_split"]}:', '',
           '| noise | detector | overall | ' + ' | '.join(kinds) + ' | val accuracy |',
           '|---|---|---|' + '---|' * len(kinds) + '---|']
  cell = lambda xs: f'{np.mean(xs):.3f} ± {np.std(xs):.3f}'
  for noise in results['noise']:
    for name in ('crossfit_noisy', 'crossfit_clean', 'clean_other'):
      rs = [r for r in results['runs'] if r['noise'] == noise and r['detector'] == name]
      if not rs:
        continue
      lines.append(f'| {noise:.0%} | {name} | {cell([r["auroc"] for r in rs])} | '
                   + ' | '.join(cell([r['auroc_by_kind'][k] for r in rs]) for k in kinds)
                   + f' | {cell([r["val_accuracy"] for r in rs])} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  config = flags.FLAGS.config
  bench_cli.check_config()  # before any model (a negative learning rate trained, reported)
  noises = bench_cli.numbers('noise', FLAGS.noise, float, lambda x: 0 < x < 1,
                             'in (0, 1): at 0 there is nothing to detect')
  seeds = bench_cli.seeds(FLAGS.seeds)
  bench_cli.at_least('folds', FLAGS.folds, 2)  # each fold is scored by the others' models
  # Models are seeded 100 s + fold and clean_other 100 s + 99: fold 99 would share
  # clean_other's seed and fold 100 seed s + 1's fold 0 (the same initialisation and order).
  if FLAGS.folds > 99:
    raise UserError(f'--folds must be <= 99 (fold f of seed s trains with seed 100 s + f, '
                    f'clean_other with 100 s + 99), got {FLAGS.folds}')
  last = 99 if FLAGS.other_split else FLAGS.folds - 1  # the largest model seed is 100 s + last
  if 100 * max(seeds) + last > MAX_SEED:
    raise UserError(f'--seeds values must be <= {(MAX_SEED - last) // 100} (models are seeded up '
                    f'to 100 * seed + {last}), got {max(seeds)}')
  bench_cli.at_least('epochs', FLAGS.epochs, 1)
  bench_cli.out_folder(FLAGS.out)
  results = {'platform': platform.platform(), 'device': jax.devices()[0].device_kind,
             'dataset': config.data.name, 'task': config.task.name,
             'train_split': config.data.train_split, 'other_split': FLAGS.other_split,
             'val_split': FLAGS.val_split, 'noise': noises, 'seeds': seeds, 'folds': FLAGS.folds,
             'epochs': FLAGS.epochs, 'runs': []}
  t_start = time.time()
  val = pipeline.load_split(config.data, FLAGS.val_split)
  other = pipeline.load_split(config.data, FLAGS.other_split) if FLAGS.other_split else None
  other_models = {}

  def record(noise, s, name, train, scores, accuracy):
    run = {'noise': noise, 'seed': s, 'detector': name, 'val_accuracy': accuracy,
           'auroc': evaluation.noise_auroc(scores, train.is_corrupted),
           'auroc_by_kind': evaluation.auroc_by_kind(scores, train.corruption,
                                                     train.corruption_kinds)}
    results['runs'].append(run)
    print(f'noise {noise:.0%} seed {s} {name:15s} AUROC {run["auroc"]:.3f} '
          f'{ {k: round(v, 3) for k, v in run["auroc_by_kind"].items()} } val acc '
          f'{accuracy:.4f} [{time.time() - t_start:.0f} s]', flush=True)

  for noise in noises:
    for s in seeds:
      c = runs.seeded(config, noise, s)
      train = pipeline.load_split(c.data, c.data.train_split, corrupt=True)
      if FLAGS.folds > len(train):
        raise UserError(f'--folds must be at most the {len(train)} examples of '
                        f'{c.data.train_split!r}, got {FLAGS.folds}')
      task = tasks.make_task(c.task, train.info)
      fixed = with_clean_labels(train)
      folds = fold_of(len(train), FLAGS.folds, s)
      for name, fit_split in (('crossfit_noisy', train), ('crossfit_clean', fixed)):
        scores, accs = np.zeros(len(train)), []
        for f in range(FLAGS.folds):
          out = np.flatnonzero(folds == f)
          params, acc = train_model(c, task, fit_split.subset(np.flatnonzero(folds != f)), val,
                                    100 * s + f)
          scores[out] = log_likelihood(task, params, train.subset(out))
          accs.append(acc)
        record(noise, s, name, train, scores, float(np.mean(accs)))
      if other is not None:
        if s not in other_models:  # one model per seed scores every noise rate's split
          other_models[s] = train_model(c, task, other, val, 100 * s + 99)
        params, acc = other_models[s]
        record(noise, s, 'clean_other', train, log_likelihood(task, params, train), acc)
  results['total_s'] = time.time() - t_start
  md = markdown(results)
  provenance.write_results(FLAGS.out, results, md)
  print(md)
  print(f'wrote {FLAGS.out}.json and .md')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
