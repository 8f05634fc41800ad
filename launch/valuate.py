r"""Scores every training example: `python -m launch.valuate --method=M --config=C --workdir=DIR`.

M is one of tracin, mimic, dvemb (which train the task model with plain SGD in a fixed order, as
configs/valuate.py says, and value its examples) or datarater (which loads the rater trained by
launch.train_rater in DIR, or in config.valuation.rater_workdir, and scores the training split of
that run's own data config; any config works for it, e.g. configs/digits.py). Writes DIR/scores_<M>.parquet:
one row per training example, keyed by its TFDS example id (`id`), with the method's raw `score`,
the oriented `value` (higher = more useful), the training `label` and `is_corrupted` (the label
noise the config applied), for mimic a `keep` column (Grad-Mimic's offline filter), and
DIR/scores_<M>.json (config, and the AUROC of `value` against `is_corrupted`).
"""
import json
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ml_collections import config_flags

from datarater import checkpointing
from datarater.data import pipeline
from datarater.errors import UserError, exit_on_user_error
from datarater.evaluation import noise_auroc
from datarater.valuation import base, factory
from datarater.valuation.mimic import mimic_filter
from datarater.valuation.rater import RaterValuation

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags are defined when run as a program, so tests and tools can import this module freely."""
  config_flags.DEFINE_config_file('config', 'configs/valuate.py', 'Valuation config.')
  flags.DEFINE_string('method', None, f'One of {", ".join(factory.METHODS)}.')
  flags.DEFINE_string('workdir', None, 'Output folder (and, for datarater, the run to load).')


def write_parquet_atomic(path: str, columns: dict) -> None:
  """Writes the columns to `path` through a temporary file renamed into place."""
  tmp = f'{path}.tmp-{os.getpid()}'
  pq.write_table(pa.table(columns), tmp)
  os.replace(tmp, path)


def valuate(method: str, config, workdir: str, progress: bool = True) -> dict:
  """Fits `method`, scores the training split, writes the files; returns the summary."""
  if method not in factory.METHODS:
    raise UserError(f'unknown --method {method!r} (choose from {", ".join(factory.METHODS)})')
  if not workdir:
    raise UserError('--workdir is required')
  if method == 'datarater':
    # The rater scores the training split of its own run (same labels, same noise); the data
    # folder may be overridden by this config's data.data_dir.
    v = config.get('valuation')
    rater_dir = (v.rater_workdir if v else '') or workdir
    if not os.path.isdir(rater_dir):
      raise UserError(f'rater workdir {rater_dir!r} does not exist: for datarater it is the '
                      'launch.train_rater run to load')
    rater, params, rater_config, _ = checkpointing.load_trained_rater(rater_dir)
    valuation = RaterValuation(rater, params)
    d = rater_config.data
    data_dir = config.data.data_dir or d.data_dir
    train = pipeline.load_split(d.name, d.train_split, data_dir, d.label_noise, d.noise_seed)
    batch_size = v.score_batch_size if v else 256
  else:
    if 'valuation' not in config:
      raise UserError('the config has no `valuation` section: use configs/valuate.py')
    factory.make_projection(config.valuation)  # a bad projection name fails before any work
    d = config.data
    train = pipeline.load_split(d.name, d.train_split, d.data_dir, d.label_noise, d.noise_seed)
    heldout = pipeline.load_split(d.name, d.heldout_split, d.data_dir)
    valuation = factory.build(method, config, train, heldout, workdir)
    batch_size = config.valuation.score_batch_size
  # Trace one scoring call before anything is written: bad layer names etc. fail here.
  jax.eval_shape(valuation.score, train.take(np.arange(min(2, len(train)))))
  os.makedirs(workdir, exist_ok=True)
  scores = base.score_split(valuation.score, train, batch_size, progress=progress,
                            desc=f'{method} scores')
  values = scores if valuation.higher_is_better else -scores
  stem = os.path.join(workdir, f'scores_{method}')
  columns = {'id': train.ids.astype(np.int64), 'score': scores.astype(np.float64),
             'value': values.astype(np.float64), 'label': train.label.astype(np.int32),
             'is_corrupted': train.is_corrupted.astype(bool)}
  extra = {}
  if method == 'mimic':  # Grad-Mimic's offline filter: keep/drop with an automatic threshold.
    fraction = config.valuation.mimic_keep_fraction or None
    columns['keep'], extra['keep_threshold'] = mimic_filter(values, fraction)
    extra['kept'] = int(columns['keep'].sum())
  write_parquet_atomic(stem + '.parquet', columns)
  summary = {'method': method, 'valuation': valuation.name, 'num_examples': len(train),
             'higher_is_better': valuation.higher_is_better,
             'noise_auroc': noise_auroc(values, train.is_corrupted), **extra,
             'config': json.loads(config.to_json_best_effort())}
  checkpointing.write_json_atomic(stem + '.json', summary)
  return summary


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  with exit_on_user_error():
    summary = valuate(FLAGS.method, FLAGS.config, FLAGS.workdir)
  print(f'wrote {os.path.join(FLAGS.workdir, "scores_" + summary["method"] + ".parquet")}: '
        f'{summary["num_examples"]} examples, noise AUROC {summary["noise_auroc"]:.3f}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
