r"""Filters a TFDS dataset with a rater or a scores file into a new TFDS dataset.

  python -m launch.filter --dataset=sklearn_digits --split=train --rater=RATER_DIR --keep=0.8 \
      --out=OUT_DIR
  python -m launch.filter --dataset=sklearn_digits --split=train --scores=scores.parquet \
      --min_score=0.0 --out=OUT_DIR

Runs `datarater.curation.filter.filter_dataset` (see there for what OUT_DIR receives); the kept
examples load with `tfds.builder_from_directory(OUT_DIR)`. `--label_noise` applies the training
pipeline's recorded symmetric label noise to the filtered splits first, for experiments.
"""
from absl import app
from absl import flags
from absl import logging as absl_logging

from datarater.curation.filter import THRESHOLD_MODES, filter_dataset
from datarater.data.corruption import Corruption
from datarater.errors import exit_on_user_error

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('dataset', 'sklearn_digits', 'TFDS dataset name (prepared in --data_dir).')
  flags.DEFINE_string('data_dir', '', 'TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).')
  flags.DEFINE_list('split', ['train'], 'Split(s) to filter; other splits are copied unchanged.')
  flags.DEFINE_string('rater', None, 'An exported rater (launch.export_rater) or a rater run.')
  flags.DEFINE_string('scores', None, 'A scores file: `id` and `value` or `score` columns.')
  flags.DEFINE_float('keep', None, 'Fraction of each filtered split to keep, in (0, 1].')
  flags.DEFINE_float('min_score', None, 'Keep examples scoring >= this (instead of --keep).')
  flags.DEFINE_enum('threshold', 'exact', THRESHOLD_MODES, 'How --keep finds its threshold.')
  flags.DEFINE_bool('balance', False, 'Per-class balance: each class keeps its --keep share.')
  flags.DEFINE_float('label_noise', 0.0, 'Symmetric label noise applied to the filtered splits.')
  flags.DEFINE_integer('noise_seed', 0, 'Seed of --label_noise.')
  flags.DEFINE_bool('copy_other_splits', True, 'Copy the splits not filtered into OUT_DIR.')
  flags.DEFINE_integer('batch_size', 1024, 'Examples read and scored at a time.')
  flags.DEFINE_string('out', None, 'Output folder (a TFDS dataset folder).')
  flags.DEFINE_bool('overwrite', False, 'Replace OUT_DIR if it exists.')


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  with exit_on_user_error():
    report = filter_dataset(
        FLAGS.dataset, FLAGS.out, FLAGS.split, rater=FLAGS.rater, scores=FLAGS.scores,
        keep=FLAGS.keep, min_score=FLAGS.min_score, threshold=FLAGS.threshold,
        balance=FLAGS.balance, data_dir=FLAGS.data_dir,
        corruption=Corruption(FLAGS.label_noise, FLAGS.noise_seed),
        copy_other_splits=FLAGS.copy_other_splits, batch_size=FLAGS.batch_size,
        overwrite=FLAGS.overwrite)
  for s, info in report['splits'].items():
    print(f'{s}: kept {info["kept"]} of {info["num_examples"]} examples')
  print(f'wrote {FLAGS.out} (tfds.builder_from_directory({FLAGS.out!r}))')


if __name__ == '__main__':
  define_flags()
  app.run(main)
