r"""The DataRater's per-kind AUROC on the text bench's corpus, with config overrides.

  python -m bench.lm_advance_probe --seed=5 --config.inner.advance_steps=10 \
      --config.inner.reset_every=100

Meta-trains the rater of the config (configs/text_bench.py unless --config says otherwise) with
its overrides, exports it, scores the training corpus and prints one JSON line: the seed, the
overrides, the rater's seconds and the AUROC of each corruption kind and of code against clean
prose. Writes them, with the config, to <out>.json and as a table row to <out>.md. The default
--out is not bench/results/lm_advance_probe: that .md is the analysis of several such runs, and
lm_advance_probe.jsonl their printed lines.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import json
import os
import tempfile
import time

from absl import flags
import numpy as np

from bench import cli as bench_cli
from bench import provenance
from bench.lm_curation import CONFIG_SECTIONS, learned, seeded
from datarater import config_checks, export, tasks
from datarater.data import pipeline
from datarater.meta_train import meta_train
from datarater.valuation import factory
from datarater.valuation.run import RunCache

_SEED = flags.DEFINE_integer('seed', 5, 'Seed of the rater, its inner models and the valuation.')
_OUT = flags.DEFINE_string('out', 'bench/results/lm_advance_probe_run',
                           'Output prefix (.json, .md).')


def markdown(result: dict) -> str:
  """The run as a table row: its seed, overrides, the AUROC of each kind and the rater's time."""
  kinds = list(result['auroc'])
  overrides = ', '.join(f'{k}={v}' for k, v in result['overrides'].items()) or 'none'
  return '\n'.join([
      f'`{provenance.command()}`', '',
      '| seed | overrides | ' + ' | '.join(k.replace('_', ' ') for k in kinds) + ' | rater s |',
      '|' + '---|' * (len(kinds) + 3),
      f"| {result['seed']} | {overrides} | " +
      ' | '.join(f"{result['auroc'][k]:.3f}" for k in kinds) + f" | {result['seconds']:.0f} |",
      '']) + '\n'


def define_flags() -> None:
  """--config (the text bench's), of which the rater's run and its valuation read
  CONFIG_SECTIONS."""
  bench_cli.config_file('configs/text_bench.py')()
  bench_cli.define_config_check('bench.lm_advance_probe', CONFIG_SECTIONS,
                                {'seed': '--seed', 'valuation.seed': '--seed'})


def main(argv):
  del argv
  bench_cli.check_config()
  seed, = bench_cli.numbers('seed', [str(_SEED.value)], int,
                            lambda x: 0 <= x <= config_checks.MAX_SEED,
                            f'in [0, {config_checks.MAX_SEED}]')
  bench_cli.out_folder(_OUT.value)
  c = seeded(flags.FLAGS.config, seed)
  c.log_every = c.checkpoint_every = c.outer.steps
  overrides = flags.FLAGS['config'].override_values  # {'inner.reset_every': 100, ...}
  with tempfile.TemporaryDirectory() as tmp:
    start = time.time()
    meta_train(c, os.path.join(tmp, 'run'))
    c.valuation.rater = os.path.join(tmp, 'rater')
    export.export_rater(os.path.join(tmp, 'run'), c.valuation.rater)
    seconds = time.time() - start
    train = pipeline.load_split(c.data, c.data.train_split, corrupt=True)
    heldout = pipeline.load_split(c.data, c.data.heldout_split)
    task = tasks.make_task(c.task, train.info)
    valuation = factory.build('datarater', c, task, train, heldout,
                              RunCache(os.path.join(tmp, 'runs'), 'probe'))
    values = np.asarray(valuation.values(train, c.valuation.score_batch_size), np.float64)
    out = learned(values, train, c.rater.temperature)
  print(json.dumps({'seed': seed, **overrides, 'seconds': seconds,
                    'auroc': {k: round(x, 3) for k, x in out['auroc'].items()}}))
  result = {'seed': seed, 'overrides': overrides, 'seconds': seconds, 'auroc': out['auroc']}
  # The config and its overrides: made_by's flags.
  provenance.write_results(_OUT.value, result, markdown(result))
  print(f'wrote {_OUT.value}.json and .md')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
