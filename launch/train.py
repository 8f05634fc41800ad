r"""Trains task models from scratch under a policy and reports per-epoch figures.

  python -m launch.train --config=configs/digits.py --policy=datarater --rater=RATER_DIR
  python -m launch.train --config.data.dataset_dir=OUT_DIR --config.data.label_noise=0
  python -m launch.train --config=configs/selection.py --policy=sae --config.policy.ratio=0.7

--policy is a name in `datarater.policies.POLICIES`: weighting (uniform, datarater, scores,
tracin_curriculum, mimic), online filtering (datarater_batch_filter, datarater_accept) or
per-epoch selection (full, random, infobatch, sae). Runs `datarater.train.train`, over several
processes too (`launch.distributed`'s flags), every policy and streaming.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
from absl import flags

from datarater import policies
from datarater.errors import UserError, exit_on_user_error
from datarater.train import policy_name, sections_read, train
from launch import cli, distributed


def define_flags(fv: flags.FlagValues = flags.FLAGS, argv=None) -> None:
  distributed.define_flags(fv)  # first: see distributed.stop_job_after_flag_error
  cli.define_config_file('config', 'configs/digits.py', 'Experiment config file.', fv, argv,
                         complete=policies.with_defaults)
  flags.DEFINE_string('policy', None, 'Policy name (default: config.policy.name).',
                      flag_values=fv)
  flags.DEFINE_string('rater', '', 'An exported rater or a rater run (datarater policies).',
                      flag_values=fv)
  flags.DEFINE_string('scores', '', 'A scores file (policy scores).', flag_values=fv)
  flags.DEFINE_string('workdir', '', 'Optional output folder: history.jsonl, report.json, '
                      'train_report.png, checkpoints (a rerun resumes).', flag_values=fv)
  flags.DEFINE_integer('stop_after', None, 'Checkpoint and exit after this many epochs (a '
                       'preemption drill).', flag_values=fv)
  cli.define_valuation_method(valuation_method, fv)
  cli.define_override_check(check_flags, fv, depends=('--policy', '--workdir'))


def valuation_method(fv: flags.FlagValues):
  """(the valuation method the run's policy builds, `policies.VALUATION`: tracin for
  tracin_curriculum; the flag or field naming the policy), or None for a policy building none."""
  if fv.policy is not None:
    name, shown = fv.policy, f'--policy={fv.policy}'
  else:
    name = fv.config.get('policy', {}).get('name')
    shown = f'policy.name={name!r}'
  method = policies.VALUATION.get(name) if isinstance(name, str) else None
  return (method, shown) if method else None


def check_flags(fv: flags.FlagValues = flags.FLAGS, paths=None) -> None:
  """Refuses a config override (of `paths`, default: the command line's) the run would not
  read: of a section (or top-level field), of a `policy` field its policy does not read, or one a
  flag leaves unread (policy.name beside --policy, train.checkpoint_every without --workdir)."""
  paths = fv['config'].override_values if paths is None else paths
  for path, flag, unread in (('policy.name', f'--policy={fv.policy}', fv.policy is not None),
                             ('train.checkpoint_every', 'no --workdir', not fv.workdir)):
    if unread and path in paths:
      raise UserError(f'--config.{path} is not read by launch.train with {flag}')
  cli.refuse_unread_sections(fv, sections_read(fv.config, fv.policy), 'launch.train', paths=paths)
  policies.check_fields(policy_name(fv.config, fv.policy), paths)


def main(argv, fv: flags.FlagValues = flags.FLAGS):
  del argv
  with exit_on_user_error():
    distributed.initialize_from_flags(fv)  # first: a process given a flag the others are
    check_flags(fv)  # not stops every process, the others with a line naming it
    train(fv.config, fv.policy, rater=fv.rater, scores=fv.scores, workdir=fv.workdir,
          stop_after=fv.stop_after)


if __name__ == '__main__':
  cli.run(main, define_flags, __doc__)
