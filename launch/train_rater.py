r"""Meta-learns a DataRater: `python -m launch.train_rater --config=configs/digits.py --workdir=DIR`.

Runs `datarater.meta_train.meta_train` on all devices of the job (see that module for what DIR
receives); run it again with the same DIR to resume.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from datarater.errors import exit_on_user_error
from datarater.meta_train import meta_train
from launch import distributed

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags are defined when run as a program, so tests and tools can import this module freely."""
  config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, report.')
  flags.DEFINE_integer('stop_after', None,
                       'Checkpoint and exit after this outer step (a preemption drill).')
  distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  with exit_on_user_error():
    meta_train(FLAGS.config, FLAGS.workdir, stop_after=FLAGS.stop_after)


if __name__ == '__main__':
  define_flags()
  app.run(main)
