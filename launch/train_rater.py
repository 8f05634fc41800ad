r"""Meta-learns a DataRater (`launch.train_rater --config=configs/digits.py --workdir=DIR`).

Runs `datarater.meta_train.meta_train` on all devices of the job (see that module for what DIR
receives); run it again with the same DIR to resume.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater.errors import exit_on_user_error
from datarater.meta_train import SECTIONS, meta_train
from launch import cli, distributed
from outer_loop import estimators


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  """Flags are defined when run as a program, so tests and tools can import this module freely."""
  distributed.define_flags(fv)  # first: see distributed.stop_job_after_flag_error
  cli.define_config_file('config', 'configs/digits.py', 'Experiment config file.', fv, argv,
                         complete=estimators.with_defaults)  # an estimator's own fields
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, report.',
                      flag_values=fv)
  flags.DEFINE_integer('stop_after', None,
                       'Checkpoint and exit after this outer step (a preemption drill).',
                       flag_values=fv)
  cli.define_override_check(check_flags, fv)


def check_flags(fv: flags.FlagValues = flags.FLAGS, paths=None) -> None:
  """Refuses a config override (of `paths`, default: the command line's) of a section the run
  does not read."""
  cli.refuse_unread_sections(fv, SECTIONS, 'launch.train_rater', top_level=True, paths=paths)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    distributed.initialize_from_flags(fv)  # first: a process given a flag the others are
    check_flags(fv)  # not stops every process, the others with a line naming it
    meta_train(fv.config, fv.workdir, stop_after=fv.stop_after)


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
