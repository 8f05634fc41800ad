r"""The CNN's 3x3 patches as nine strided slices against `lax.conv_general_dilated_patches`.

  python -m bench.cnn_patches          # Fashion-MNIST bench CNNs (needs dataset-fashion-mnist)
  python -m bench.cnn_patches --repeats=1 --examples=256 --batch=32 --inner_batch=16 \
      --out=/tmp/cnn_patches         # a quick run

Both give the same patches (`tests/test_cnn.py`), so the models and their results are the same;
this measures their speed on three jobs of `configs/fashion_mnist_bench.py`, compilation apart:
- `train`: the one trainer, full data, `--epochs` 2, the bench's task CNN on the first
  `--examples` 5,000 training images (its `train[:5000]`), batches of `--batch` 128
  (microseconds per example-gradient);
- `meta`: one compiled outer step of the bench's DataRater at K = `--population` 4, T =
  `--unrolls` 8, inner batches of `--inner_batch` 64, outer ones of `--batch` (milliseconds,
  median of `--calls` 5 calls after a warm-up);
- `features`: a CNN extractor's forward pass over the same images (microseconds per example):
  the selection runs' extractor until they took an MLP's hidden layer (`EXTRACTOR`; an MLP has no
  patches).
The two implementations alternate within each of `--repeats` rounds; the ratio lax / slices is
reported per round, with its mean and standard error. Writes <out>.json and .png (default
bench/results/cnn_patches).
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import contextlib
import functools
import platform
import textwrap
import time

from absl import flags
import jax
import numpy as np

from bench import cli as bench_cli
from bench import provenance
from bench.meta_memory import compile_step
from configs import digits_cnn, fashion_mnist_bench
from datarater import evaluation, files, tasks
from datarater.data import pipeline
from datarater.policies import selection
from datarater.tasks import cnn
from datarater.trainer import Trainer
from inner_loop import make_inner_optimizer


def define_flags() -> None:
  """Defined when run as a script, not on import (tests import it beside other benches)."""
  global _REPEATS, _OUT, _EXAMPLES, _BATCH, _INNER_BATCH, _POPULATION, _UNROLLS, _EPOCHS, _CALLS
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'Rounds; each times both implementations.')
  _EXAMPLES = flags.DEFINE_integer('examples', 5000, 'Training images (the first N of train).')
  _BATCH = flags.DEFINE_integer('batch', 128, 'train: batch size; meta: outer batch size.')
  _INNER_BATCH = flags.DEFINE_integer('inner_batch', 64, 'meta: inner batch size.')
  _POPULATION = flags.DEFINE_integer('population', 4, 'meta: K, the inner models.')
  _UNROLLS = flags.DEFINE_integer('unrolls', 8, 'meta: T, the unrolled inner steps.')
  _EPOCHS = flags.DEFINE_integer('epochs', 2, 'train: epochs timed.')
  _CALLS = flags.DEFINE_integer('calls', 5, 'meta: timed calls (median) after a warm-up.')
  _OUT = flags.DEFINE_string('out', 'bench/results/cnn_patches', 'Output path prefix.')


FEATURE_CHUNK = 512  # as features.extract
EXTRACTOR = digits_cnn.cnn(channels=(16, 32), strides=(2, 2), pool='flatten', hidden=64)

IMPLEMENTATIONS = {
    'lax': lambda x, s: jax.lax.conv_general_dilated_patches(
        x, (3, 3), (s, s), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
    'slices': cnn.patches_3x3,
}


@contextlib.contextmanager
def patches(name: str):
  """PatchConv traces with implementation `name` inside the block."""
  kept = cnn.patches_3x3
  cnn.patches_3x3 = IMPLEMENTATIONS[name]
  try:
    yield
  finally:
    cnn.patches_3x3 = kept


def time_train(config, train, epochs: int = 2) -> float:
  """Microseconds per example-gradient of `epochs` full-data epochs (compilation apart)."""
  task = tasks.make_task(config.task, train.info)
  trainer = Trainer(task, make_inner_optimizer('adam', config.train.learning_rate),
                    selection.full(len(train)), config.train.batch_size,
                    batch_size_setting='train.batch_size')
  run = trainer.run(train, {}, [0], epochs=epochs)
  return 1e6 * run.wall_s / run.example_gradients


def time_meta(config, info, calls: int = 5) -> float:
  """Milliseconds per outer step (median of `calls` after a warm-up)."""
  compiled, args, _, _ = compile_step(config, info)
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def time_features(train) -> float:
  """Microseconds per example of `EXTRACTOR`'s forward pass over the split (after a warm-up)."""
  task = tasks.make_task(EXTRACTOR, train.info)
  params = task.init(jax.random.PRNGKey(0))
  fn = functools.partial(jax.jit(task.embed), params)
  evaluation.score_split(fn, train, FEATURE_CHUNK, jit=False)  # compiles
  t0 = time.perf_counter()
  evaluation.score_split(fn, train, FEATURE_CHUNK, jit=False)
  return 1e6 * (time.perf_counter() - t0) / len(train)


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  jobs = list(results['ratio'])
  fig, ax = plt.subplots(figsize=(6, 3.5))
  means = [results['ratio'][j]['mean'] for j in jobs]
  ax.bar([textwrap.fill(j, 18) for j in jobs], means,  # labels in lines: they do not overlap
         yerr=[results['ratio'][j]['sem'] for j in jobs], capsize=4)
  ax.axhline(1.0, color='k', lw=0.8)
  ax.set_ylabel('time with lax patches / with slices')
  machine = results.get('cpu') or results['device']  # the run's, not the plotting one's
  ax.set_title(f'Fashion-MNIST bench CNNs, {machine}')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  for flag in (_REPEATS, _EXAMPLES, _BATCH, _INNER_BATCH, _POPULATION, _UNROLLS, _EPOCHS,
               _CALLS):
    bench_cli.at_least(flag.name, flag.value, 1)
  bench_cli.out_folder(_OUT.value)
  config = fashion_mnist_bench.get_config()
  config.data.train_split = f'train[:{_EXAMPLES.value}]'
  config.train.batch_size = config.outer.batch_size = _BATCH.value
  config.inner.batch_size = _INNER_BATCH.value
  config.inner.steps, config.inner.population = _UNROLLS.value, _POPULATION.value
  config.rater.readout = 'log_softmax'
  train = pipeline.load_split(config.data, config.data.train_split)
  k_t = f'K={_POPULATION.value}, T={_UNROLLS.value}'
  jobs = {'train (us/example-gradient)': lambda: time_train(config, train, _EPOCHS.value),
          f'meta (ms/outer step, {k_t})': lambda: time_meta(config, train.info, _CALLS.value),
          'features (us/example)': lambda: time_features(train)}
  times = {job: {name: [] for name in IMPLEMENTATIONS} for job in jobs}
  for r in range(_REPEATS.value):
    for job, measure in jobs.items():
      print(f'round {r}: timing {job} ...', flush=True)
      for name in IMPLEMENTATIONS:
        with patches(name):
          times[job][name].append(measure())
      print(f'round {r}: {job}: ' + ', '.join(f'{n} {v[-1]:.1f}' for n, v in times[job].items()),
            flush=True)
  ratio = {}
  for job, t in times.items():
    x = np.array(t['lax']) / np.array(t['slices'])
    ratio[job] = {'mean': float(x.mean()), 'sem': float(x.std(ddof=1) / np.sqrt(len(x)))
                  if len(x) > 1 else float('nan'), 'per_round': x.tolist()}
    print(f'{job}: lax {np.mean(t["lax"]):.1f}, slices {np.mean(t["slices"]):.1f}; '
          f'lax / slices {x.mean():.2f} +- {ratio[job]["sem"]:.2f}')
  results = {'times': times, 'ratio': ratio, 'repeats': _REPEATS.value,
             'device': jax.devices()[0].device_kind, 'cpu': platform.processor(),
             'config': f'configs/fashion_mnist_bench.py, {k_t}, log_softmax readout',
             'train_split': config.data.train_split}  # the other settings: made_by's flags
  provenance.write_results(_OUT.value, results, plot=lambda path: plot(results, path))
  print(f'wrote {_OUT.value}.json and .png')


if __name__ == '__main__':
  define_flags()
  bench_cli.run(main, __doc__)
