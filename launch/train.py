r"""Trains task models from scratch under a weighting policy and reports per-epoch figures.

  python -m launch.train --config=configs/train.py --weighting=datarater --rater=RATER_DIR
  python -m launch.train --dataset_dir=OUT_DIR --config.data.label_noise=0   # a filtered dataset

--weighting is a name in `datarater.training.POLICIES` (uniform, datarater,
datarater_batch_filter, mimic, tracin_curriculum, scores, ...). Trains one model per config.train.seeds (vmapped) on the train
split (of config.data.name, or of the TFDS folder --dataset_dir, e.g. launch.filter's output), and
after every epoch prints held-out (config.data.heldout_split) and eval-split loss and accuracy
with the examples (example-gradients) and steps spent. --workdir gets history.jsonl, report.json and
orbax checkpoints every config.train.checkpoint_every epochs: run again with the same --workdir to
resume (or, for --weighting, to extend a finished run to more --config.train.epochs).
"""
import os

from absl import app, flags
from absl import logging as absl_logging
import tensorflow_datasets as tfds
import ml_collections
from ml_collections import config_flags

from datarater import checkpointing, models, training
from datarater.data import pipeline
from datarater.errors import UserError, exit_on_user_error
from inner_loop.optimizers import make_inner_optimizer

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', 'configs/train.py', 'Training config file.')
  flags.DEFINE_string('weighting', 'uniform', 'Policy name (datarater.training.POLICIES).')
  flags.DEFINE_string('rater', '', 'Exported rater folder (for --weighting=datarater).')
  flags.DEFINE_string('scores', '', 'Scores parquet (for --weighting=scores).')
  flags.DEFINE_string('dataset_dir', '', 'Train on this TFDS folder instead of config.data.name.')
  flags.DEFINE_string('workdir', '', 'Optional output folder: history.jsonl, report.json, '
                      'checkpoints (a rerun resumes).')
  flags.DEFINE_integer('stop_after', None, 'Checkpoint and exit after this many epochs (a '
                       'preemption drill; with --selection, epochs of the seeds in turn).')
  # issue 5 (datarater.selection): per-epoch data selection instead of a weighting policy.
  flags.DEFINE_enum('selection', '', ['', 'full', 'random', 'infobatch', 'sae'],
                    'Train on a per-epoch subset (ratio config.selection_ratio); needs '
                    '--config=configs/selection.py.')


def run_checkpointer(config, workdir: str, weighting: str, rater: str, scores: str,
                     dataset_dir: str, selection: str) -> checkpointing.RunCheckpointer:
  """Checkpoints in `workdir`, tied to the config and to the flags that shape the run.

  The epoch count may change on resume for a weighting run (an epoch's data order depends on
  (seed, epoch) only), not for a selection run (its curriculum spans the epochs).
  """
  fingerprint = config.copy_and_resolve_references()
  with fingerprint.unlocked():
    fingerprint.launch = ml_collections.ConfigDict({
        'weighting': weighting, 'selection': selection, 'scores': scores and os.path.abspath(scores),
        'rater': rater and os.path.abspath(rater),
        'dataset_dir': dataset_dir and os.path.abspath(dataset_dir)})
  free = checkpointing.NON_TRAJECTORY_FIELDS + ('train.checkpoint_every',)
  if not selection:
    free += ('train.epochs',)
  return checkpointing.RunCheckpointer(workdir, fingerprint, free_fields=free)


def run(config, weighting: str, rater: str = '', scores: str = '', dataset_dir: str = '',
        workdir: str = '', log=print, selection: str = '', stop_after: int | None = None) -> dict:
  """Trains (or, from `workdir`'s checkpoint, resumes) the runs; returns the report.

  If `stop_after` ends training early, returns {'stopped_after': epochs done} and writes no report.
  """
  if selection and weighting != 'uniform':  # issue 5: selection trains with uniform weights
    raise UserError(f'--selection={selection} cannot be combined with --weighting={weighting}')
  d, t = config.data, config.train
  ckpt, resume = None, None
  if workdir:
    ckpt = run_checkpointer(config, workdir, weighting, rater, scores, dataset_dir, selection)
    resume = ckpt.check_compatible()
    if resume is not None and not selection and resume > t.epochs:
      raise UserError(f'workdir {workdir!r} holds a checkpoint at epoch {resume}, past '
                      f'--config.train.epochs={t.epochs}')
  elif stop_after is not None:
    raise UserError('--stop_after needs --workdir (the checkpoint is written there)')
  if dataset_dir:
    if not os.path.exists(os.path.join(dataset_dir, 'dataset_info.json')):
      raise UserError(f'--dataset_dir {dataset_dir!r} is not a TFDS dataset folder')
    builder = tfds.builder_from_directory(os.path.abspath(dataset_dir))
    load = lambda s, noise=0.0: pipeline.read_split(builder, s, noise, d.noise_seed)
  else:
    load = lambda s, noise=0.0: pipeline.load_split(d.name, s, d.data_dir, noise, d.noise_seed)
  train, heldout, evals = load(d.train_split, d.label_noise), load(d.heldout_split), load(d.eval_split)
  task = models.task_model(train.num_classes, tuple(config.task_model.hidden), config.task_model.activation)
  loss_fn = lambda p, b: models.per_example_loss(task.apply, p, b)
  policy = training.make_policy(weighting, training.PolicyContext(
      train, heldout, task, loss_fn, rater, scores, t.temperature, config, int(t.seeds[0]),
      t.filter_rho))
  trainer = training.Trainer(task, make_inner_optimizer(t.optimizer, t.learning_rate), policy.weight_fn)
  history_log = None
  if workdir:  # every check passed: from here on the workdir is written
    os.makedirs(workdir, exist_ok=True)
    history_log = checkpointing.JsonlLog(os.path.join(workdir, 'history.jsonl'), 'epoch',
                                         0 if selection else (resume or 0))
    if resume is not None:
      log(f'resuming from the checkpoint at epoch {resume}' +
          (' (epochs of the seeds in turn)' if selection else ''))

  def on_epoch(r):
    log(f'epoch {r["epoch"]:3d} | examples {r["examples"]:7d} | steps {r["steps"]:5d} | '
        f'held-out loss {r["heldout_loss"]:.4f} acc {100 * r["heldout_accuracy"]:.2f}% | '
        f'{d.eval_split} acc {100 * r["eval_accuracy"]:.2f}% (+-{100 * r["eval_accuracy_std"]:.2f})')
    if history_log:
      history_log.write(r)
  if selection:  # issue 5: selection policies train through datarater.selection (loss feedback)
    from datarater.selection.run import run_selection  # pylint: disable=g-import-not-at-top
    report = run_selection(config, selection, (train, heldout, evals), log=on_epoch,
                           checkpoints=ckpt, stop_after=stop_after)
    weighting = f'selection={selection}@{config.selection_ratio}'
  else:
    report = trainer.fit(train, {'heldout': heldout, 'eval': evals}, epochs=t.epochs,
                         batch_size=t.batch_size, seeds=list(t.seeds), policy=policy, log=on_epoch,
                         checkpoints=ckpt, checkpoint_every=t.get('checkpoint_every', 1),
                         stop_after=stop_after)
  if 'stopped_after' in report:
    log(f'stopped after epoch {report["stopped_after"]} (checkpointed); run again with the same '
        '--workdir to resume')
    return {'stopped_after': report['stopped_after']}
  report.update(weighting=weighting, num_train=len(train), dataset_dir=dataset_dir)
  if workdir:
    checkpointing.write_json_atomic(os.path.join(workdir, 'report.json'), report)
  log(f'{weighting}: {report["example_gradients"]} example-gradients in {report["steps"]} steps '
      f'(+{report["setup_example_gradients"]} to make the policy)')
  return report


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  with exit_on_user_error():
    run(FLAGS.config, FLAGS.weighting, FLAGS.rater, FLAGS.scores, FLAGS.dataset_dir, FLAGS.workdir,
        selection=FLAGS.selection, stop_after=FLAGS.stop_after)


if __name__ == '__main__':
  define_flags()
  app.run(main)
