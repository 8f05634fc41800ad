r"""Trains task models from scratch under a policy and reports per-epoch figures.

  python -m launch.train --config=configs/digits.py --policy=datarater --rater=RATER_DIR
  python -m launch.train --config.data.dataset_dir=OUT_DIR --config.data.label_noise=0
  python -m launch.train --config=configs/selection.py --policy=sae --config.policy.ratio=0.7

--policy is a name in `datarater.policies.POLICIES`: weighting (uniform, datarater, scores,
tracin_curriculum, mimic), online filtering (datarater_batch_filter, datarater_accept) or
per-epoch selection (full, random, infobatch, sae). Runs `datarater.train.train`.
"""
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from datarater.errors import exit_on_user_error
from datarater.train import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Experiment config file.')
  flags.DEFINE_string('policy', None, 'Policy name (default: config.policy.name).')
  flags.DEFINE_string('rater', '', 'An exported rater or a rater run (datarater policies).')
  flags.DEFINE_string('scores', '', 'A scores file (policy scores).')
  flags.DEFINE_string('workdir', '', 'Optional output folder: history.jsonl, report.json, '
                      'checkpoints (a rerun resumes).')
  flags.DEFINE_integer('stop_after', None, 'Checkpoint and exit after this many epochs (a '
                       'preemption drill).')


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  with exit_on_user_error():
    train(FLAGS.config, FLAGS.policy, rater=FLAGS.rater, scores=FLAGS.scores,
          workdir=FLAGS.workdir, stop_after=FLAGS.stop_after)


if __name__ == '__main__':
  define_flags()
  app.run(main)
