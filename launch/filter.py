r"""Filters a TFDS dataset with a rater or a scores file into a new TFDS dataset.

  python -m launch.filter --dataset=sklearn_digits --split=train --rater=RATER_DIR --keep=0.8 \
      --out=OUT_DIR
  python -m launch.filter --dataset=sklearn_digits --split=train --scores=scores.parquet \
      --min_score=0.0 --out=OUT_DIR
  python -m launch.filter --dataset=sklearn_digits --rater=RATER_DIR --suggest_keep --out=OUT_DIR

Runs `datarater.curation.filter.filter_dataset` (see there for what OUT_DIR receives); the kept
examples load with `tfds.builder_from_directory(OUT_DIR)`. `--label_noise` applies the training
pipeline's recorded symmetric label noise to the filtered splits first, for experiments.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater.config_checks import MAX_SEED
from datarater.curation.filter import THRESHOLD_MODES, filter_dataset
from datarater.data.corruption import Corruption
from datarater.errors import UserError, exit_on_user_error
from launch import cli, distributed


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  del argv
  distributed.define_flags(fv)  # first: see distributed.stop_job_after_flag_error
  d = lambda kind, *args: getattr(flags, f'DEFINE_{kind}')(*args, flag_values=fv)
  d('string', 'dataset', 'sklearn_digits',
    'TFDS dataset name (prepared in --data_dir), or a TFDS dataset folder.')
  d('string', 'data_dir', '', 'TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).')
  d('list', 'split', ['train'], 'Split(s) to filter; other splits are copied unchanged.')
  d('string', 'rater', None, 'An exported rater (launch.export_rater) or a rater run.')
  d('string', 'scores', None, 'A scores file: `id` and `value` or `score` columns.')
  d('float', 'keep', None, 'Fraction of each filtered split to keep, in (0, 1].')
  d('float', 'min_score', None, 'Keep examples scoring >= this (instead of --keep).')
  d('bool', 'suggest_keep', False, 'Keep the share of the upper cluster of each split\'s scores '
    '(2-means; instead of --keep).')
  d('enum', 'threshold', 'exact', THRESHOLD_MODES, 'How --keep finds its threshold.')
  d('bool', 'balance', False, 'Per-class balance: each class keeps its --keep share.')
  d('float', 'label_noise', 0.0, 'Symmetric label noise applied to the filtered splits.')
  d('integer', 'noise_seed', 0, 'Seed of --label_noise.')
  d('bool', 'copy_other_splits', True, 'Copy the splits not filtered into OUT_DIR.')
  d('integer', 'batch_size', 1024, 'Examples read and scored at a time.')
  d('string', 'out', None, 'Output folder (a TFDS dataset folder).')
  d('bool', 'overwrite', False, 'Replace OUT_DIR if it is an earlier output of this command.')


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    distributed.initialize_from_flags(fv)  # first: a process given a flag the others are not
    # stops every process, the others with a line naming it
    if not 0 <= fv.label_noise < 1:  # checked here to name the flag, not the config field
      raise UserError(f'--label_noise must be in [0, 1), got {fv.label_noise}')
    if not 0 <= fv.noise_seed <= MAX_SEED:
      raise UserError(f'--noise_seed must be in [0, {MAX_SEED}], got {fv.noise_seed}')
    report = filter_dataset(
        fv.dataset, fv.out, fv.split, rater=fv.rater, scores=fv.scores, keep=fv.keep,
        min_score=fv.min_score, suggest_keep=fv.suggest_keep, threshold=fv.threshold,
        balance=fv.balance, data_dir=fv.data_dir,
        corruption=Corruption(fv.label_noise, fv.noise_seed),
        copy_other_splits=fv.copy_other_splits, batch_size=fv.batch_size, overwrite=fv.overwrite)
  if not report['splits']:  # another process of a multi-process job: process 0 wrote it
    return
  for s, info in report['splits'].items():
    print(f'{s}: kept {info["kept"]} of {info["num_examples"]} examples'
          + (f' (suggested keep {info["keep"]:.3f})' if fv.suggest_keep else '')
          + (f', {info["kept_corrupted"]} of its {info["corrupted"]} corrupted'
             if 'corrupted' in info else ''))
  print(f'wrote {fv.out} (tfds.builder_from_directory({fv.out!r}))')


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
