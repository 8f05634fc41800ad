r"""Exports a trained rater: `python -m launch.export_rater --workdir=DIR --out=RATER_DIR`.

DIR is a `launch.train_rater` run; RATER_DIR gets `params/` (orbax) and `rater.json`. Load it
anywhere with `datarater.load_rater(RATER_DIR)`, on any number of devices.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater import export
from datarater.errors import exit_on_user_error
from launch import cli


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  del argv
  flags.DEFINE_string('workdir', None, 'A launch.train_rater run folder.', flag_values=fv)
  flags.DEFINE_string('out', None, 'Folder to write the exported rater to.', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it is an earlier output of this '
                    'command.', flag_values=fv)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    meta = export.export_rater(fv.workdir, fv.out, fv.overwrite)
    reads = export.load_rater(fv.out).reads
  steps, planned = meta['outer_steps'], meta['config']['outer']['steps']
  unfinished = (f' of {planned}, its newest readable checkpoint: the run has not finished; run '
                'launch.train_rater there again, then export with --overwrite' if steps < planned
                else '')
  print(f'exported the rater of {fv.workdir} (outer step {steps}{unfinished}) to {fv.out} '
        f'(reads {", ".join(reads)} of {meta["data_info"]["name"]})')


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
