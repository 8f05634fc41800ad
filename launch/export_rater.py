r"""Exports a trained rater: `python -m launch.export_rater --workdir=DIR --out=RATER_DIR`.

DIR is a `launch.train_rater` run; RATER_DIR gets `params/` (orbax) and `rater.json`. Load it
anywhere with `datarater.load_rater(RATER_DIR)`, on any number of devices.
"""
from absl import app
from absl import flags
from absl import logging as absl_logging

from datarater import export
from datarater.errors import UserError, exit_on_user_error

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A launch.train_rater run folder.')
  flags.DEFINE_string('out', None, 'Folder to write the exported rater to.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  with exit_on_user_error():
    if not FLAGS.workdir:
      raise UserError('--workdir is required')
    meta = export.export_rater(FLAGS.workdir, FLAGS.out, FLAGS.overwrite)
  print(f'exported the rater of {FLAGS.workdir} to {FLAGS.out} '
        f'(reads {", ".join(meta["data_info"]["spec"])} of {meta["data_info"]["name"]})')


if __name__ == '__main__':
  define_flags()
  app.run(main)
