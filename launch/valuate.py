r"""Values every training example with one method -> a scores file keyed by TFDS id.

  python -m launch.valuate --method=tracin --config=configs/digits.py --workdir=DIR

--method is one of `datarater.valuation.factory.METHODS` (datarater with
--config.valuation.rater=RATER). Runs
`datarater.valuation.run.valuate`: DIR gets scores_<method>.parquet and scores_<method>.json.
"""

from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater.errors import exit_on_user_error
from datarater.valuation.factory import METHODS, check_fields
from datarater.valuation.run import SECTIONS, unread, valuate
from launch import cli, distributed


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  distributed.define_flags(fv)  # first: see distributed.stop_job_after_flag_error
  cli.define_config_file('config', 'configs/digits.py', 'Experiment config file.', fv, argv)
  flags.DEFINE_string('method', None, f'One of {", ".join(METHODS)}.', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'Output folder.', flag_values=fv)
  cli.define_valuation_method(
      lambda fv: (fv.method, f'--method={fv.method}') if fv.method else None, fv)
  cli.define_override_check(check_flags, fv, depends=('--method',))


def check_flags(fv: flags.FlagValues = flags.FLAGS, paths=None) -> None:
  """Refuses a config override (of `paths`, default: the command line's) the run would not
  read: of a section (or top-level field), a field of one its method does not read (`run.unread`)
  or a `valuation` field of another method."""
  paths = fv['config'].override_values if paths is None else paths
  if fv.method not in METHODS:  # (an unknown one is refused by name)
    cli.refuse_unread_sections(fv, SECTIONS, 'launch.valuate', paths=paths)
    return
  cli.refuse_unread_sections(fv, SECTIONS, f'launch.valuate --method={fv.method}',
                             unread=unread(fv.method), paths=paths)
  check_fields(fv.method, paths)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    distributed.initialize_from_flags(fv)  # first: a process given a flag the others are
    check_flags(fv)  # not stops every process, the others with a line naming it
    summary = valuate(fv.method, fv.config, fv.workdir)
  if not summary:  # another process of a multi-process job wrote the files
    return
  auroc = summary['noise_auroc']  # None where no example (or every one) is recorded corrupted
  print(f'wrote {summary["scores_file"]}: '
        f'{summary["num_examples"]} examples' +
        (f', noise AUROC {auroc:.3f}' if auroc is not None else ''))
  if 'topk' in summary:
    top = summary['topk']
    print(f'wrote {top["file"]}: the {top["k"]} most '
          f'supporting and opposing training examples of each of {top["num_test"]} examples of '
          f'split {top["split"]!r}')


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
