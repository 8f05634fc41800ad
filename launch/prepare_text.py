r"""Prepares a folder of your own text files as a dataset for configs/text.py.

  python -m launch.prepare_text --source=MY_TEXT --out=MY_DATASET
  python -m launch.train_rater --config=configs/text.py --config.data.dataset_dir=MY_DATASET \
      --workdir=DIR

Runs `datarater.data.text_folder.prepare_text` (see there: files assigned whole to train, heldout
and test, cut into python_text's 128-byte sequences, heldout and test less the windows train
also holds, test less those heldout also holds); OUT is a TFDS dataset folder.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater.data import text_folder
from datarater.errors import exit_on_user_error
from launch import cli


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  del argv
  d = lambda kind, *args: getattr(flags, f'DEFINE_{kind}')(*args, flag_values=fv)
  d('string', 'source', None, 'Folder of text files (read recursively; hidden ones skipped).')
  d('string', 'heldout_source', '', 'Folder of trusted text for heldout and test (then every '
    'file of --source goes to train).')
  d('list', 'suffixes', list(text_folder.SUFFIXES), 'File name endings to read.')
  d('float', 'heldout_fraction', 0.1, 'Share of the sequences in split heldout.')
  d('float', 'test_fraction', 0.1, 'Share of the sequences in split test (train: the rest).')
  d('integer', 'seed', 0, 'Seed of the shuffle that assigns files to splits.')
  d('integer', 'max_windows', 0, 'Sequences taken from each file at most (0: all).')
  d('string', 'out', None, 'Output folder (a TFDS dataset folder).')
  d('bool', 'overwrite', False, 'Replace OUT if it is an earlier output of this command.')


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    report = text_folder.prepare_text(
        fv.source, fv.out, fv.suffixes, heldout_fraction=fv.heldout_fraction,
        test_fraction=fv.test_fraction, seed=fv.seed, max_windows=fv.max_windows,
        overwrite=fv.overwrite, heldout_source=fv.heldout_source)
  for s, t in report['total'].items():
    dropped = ', '.join(f'{t[f"dropped_as_in_{r}"]} dropped: also in {r}'
                        for r in text_folder.SPLITS if f'dropped_as_in_{r}' in t)
    print(f'{s}: {t["sequences"]} sequences from {t["documents"]} files' +
          (f' ({dropped})' if dropped else ''))
  print(f'wrote {fv.out} (--config.data.dataset_dir={fv.out})')


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
