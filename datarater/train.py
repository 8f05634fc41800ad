"""Training task models from scratch under a policy: the run behind `launch.train`.

`train(config, policy, ...)` reads the config's splits (or the TFDS folder `data.dataset_dir`, e.g.
a filtered dataset), makes the task and the policy (`datarater.policies`: weighting, online
filtering or per-epoch selection), and trains one model per `train.seeds` with the one trainer,
printing held-out and eval figures after every epoch. With a `workdir` it writes history.jsonl,
orbax checkpoints every `train.checkpoint_every` epochs, and at the end train_report.png (losses
and eval metrics over steps, per seed: `plots.train_figure`) and report.json; a rerun resumes
(or extends a finished run to more epochs, for policies whose choices do not span the epochs).
"""
import contextlib
import json
import os
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from datarater import (checkpointing, config_checks, evaluation, export, files, multihost,
                       plots, policies, seeding, tasks)
from datarater.data import corruption, pipeline, source
from datarater.errors import UserError
from datarater.mesh import BATCH
from datarater.trainer import Trainer, check_batch_splits, initial_params, seeds_mesh
from inner_loop.optimizers import make_inner_optimizer


# What every training run reads; a policy's own sections besides are in policies.SECTIONS.
SECTIONS = ('data', 'task', 'train', 'policy')


def run_checkpointer(config, workdir: str, policy: str, rater: str, scores: str,
                     spans_epochs: bool) -> checkpointing.RunCheckpointer:
  """Checkpoints in `workdir`, tied to the config, to the launcher inputs that shape the run
  (their paths, and the contents of those named by path alone: `checkpointing.path_inputs`) and
  to how seeds become keys (`key_derivation`: a checkpoint of other keys is not resumed mixed).

  The epoch count may change on resume unless the policy's choices span the epochs; so may the
  config's sections the policy does not read, and the fields it does not read of those it reads
  in part (`policies.unread_fields`: e.g. valuation.dvemb_steps for tracin_curriculum).
  """
  fingerprint = config.copy_and_resolve_references()
  with fingerprint.unlocked():
    fingerprint.launch = ml_collections.ConfigDict({
        'policy': policy, 'scores': scores and os.path.abspath(scores),
        'rater': rater and os.path.abspath(rater)})
    fingerprint.key_derivation = seeding.KEYS_VERSION
  free = (checkpointing.NON_TRAJECTORY_FIELDS + ('train.checkpoint_every', 'train.stream', 'seed')
          + checkpointing.unread_sections(config, SECTIONS + policies.SECTIONS.get(policy, ()))
          + policies.unread_fields(policy, config))
  if not spans_epochs:
    free += ('train.epochs',)
  inputs = checkpointing.path_inputs(config.data, scores=scores)
  if rater:  # what is read from it: a run's report or config written again changes nothing
    with multihost.together('reading the rater'):  # (each process alone: one failing stops all)
      digest = rater_digest(rater)
    inputs['--rater'] = checkpointing.PathInput(rater, '', digest)
  return checkpointing.RunCheckpointer(workdir, fingerprint, free_fields=free, inputs=inputs,
                                       extra_fields=('history', 'wall_s', 'steps'),
                                       added_fields=policies.defaults(policy))


def rater_digest(path: str) -> str:
  """sha256 (its first 16 hex digits) of the parameters and temperature `load_rater(path)`
  gives: what a policy reads from a rater, exported or a rater run (its newest readable
  checkpoint)."""
  loaded = export.load_rater(path)
  return files.digest({'params': jax.device_get(loaded.params),
                       'temperature': np.float64(loaded.temperature)})[:16]


def format_record(record: dict, eval_split: str) -> str:
  """One line per epoch: compute spent, then each split's metrics (mean +- std over seeds)."""
  parts = [f'epoch {record["epoch"]:5.1f}', f'examples {record["example_gradients"]:8d}',
           f'steps {record["step"]:6d}']
  for split, label in (('heldout', 'held-out'), ('eval', eval_split)):
    for metric, values in record.get(split, {}).items():
      values = np.array([np.nan if v is None else v for v in values], float)  # null: diverged
      mean = float(np.mean(values))
      shown = f'{100 * mean:.2f}%' if metric == 'accuracy' else f'{mean:.4f}'
      if len(values) > 1:
        std = float(np.std(values))
        shown += f' (std {100 * std:.2f})' if metric == 'accuracy' else f' (std {std:.4f})'
      parts.append(f'{label} {metric} {shown}')
  return ' | '.join(parts)


def policy_name(config, policy: Optional[str] = None) -> str:
  """The policy a run trains under: `policy`, else `config.policy.name`; refuses one not named
  or unknown."""
  if policy is None and 'policy' not in config:  # (a config of another launcher)
    raise UserError("the config has no policy section: give --policy or a config with one")
  name = config.policy.name if policy is None else policy  # '' (--policy=) is no name
  if name not in policies.POLICIES:
    raise UserError(f'unknown policy {name!r} (choose from {", ".join(sorted(policies.POLICIES))})')
  return name


def sections_read(config, policy: Optional[str] = None) -> tuple[str, ...]:
  """The config sections a run of `policy` (`policy_name`) reads."""
  return SECTIONS + policies.SECTIONS[policy_name(config, policy)]


def train(config, policy: Optional[str] = None, *, rater: str = '', scores: str = '',
          workdir: str = '', stop_after: Optional[int] = None,
          log: Callable[[str], None] = print) -> dict:
  """Trains (or, from `workdir`'s checkpoint, resumes) the runs; returns the report.

  `policy` overrides `config.policy.name`; a policy's own field the config lacks takes its
  default (`policies.with_defaults`). If `stop_after` ends training early, returns
  {'stopped_after': epochs done} and writes no report. In a `jax.distributed` job every process
  runs it alike: one mesh spans their devices, each makes the policy alone (`same_policy` checks
  they made the same) but for the scores of the training split a policy is made from
  (`policies.FromScores`: tracin_curriculum's values, datarater_accept's reference scores), each
  process scoring its share of the blocks, and process 0 alone logs and writes history.jsonl,
  train_report.png and report.json.
  """
  if jax.process_index() != 0:
    log = lambda line: None
  config = policies.with_defaults(config)
  with multihost.together('checking its settings and data'):
    name, train_split, heldout, evals, task = _checked_inputs(config, policy, rater, scores,
                                                              workdir, stop_after)
    d, t = config.data, config.train
    contents = {f'data.{field}': (d[field], contents_digest(split)) for field, split in
                (('train_split', train_split), ('heldout_split', heldout), ('eval_split', evals))}
  pipeline.check_same_everywhere(pipeline.builder_of(d), pipeline.dataset_name(d))
  check_same_contents(contents, pipeline.dataset_name(d))
  ckpt = None
  if workdir:  # checked before the policy's set-up (a TracIn fit, an SAE's training)
    ckpt = run_checkpointer(config, workdir, name, rater, scores, spans_epochs=False)
    resume = ckpt.check_compatible()
    if resume is not None and resume > t.epochs:
      raise UserError(f'workdir {workdir!r} holds a checkpoint at epoch {resume}, past '
                      f'train.epochs={t.epochs}')
  with multihost.together('making the policy'):
    made = policies.start_policy(name, policies.PolicyContext(
        train_split, heldout, task, config, rater=rater, scores=scores))
  # A policy made from scores of the split: scored once, each process its blocks, voting after
  # each; outside the stage above, where a process that failed alone casts one vote in all.
  if isinstance(made, policies.FromScores):
    values = evaluation.score_split_shared(made.score, train_split, made.desc)
  with multihost.together('making the policy'):
    if isinstance(made, policies.FromScores):
      made = made.finish(values)
    if made.check_data and hasattr(train_split, 'features'):  # streamed: the trainer checks
      made.check_data(train_split.features)  # each chunk
  same_policy(name, made, rater, scores)
  trainer = Trainer(task, make_inner_optimizer(t.optimizer, t.learning_rate), made, t.batch_size,
                    learning_rate_setting=f'train.learning_rate ({t.learning_rate:g})',
                    devices=jax.devices())
  if ckpt is not None and made.spans_epochs:  # its choices depend on train.epochs: compared too
    ckpt.free_fields = tuple(f for f in ckpt.free_fields if f != 'train.epochs')
    ckpt.check_compatible()  # (the inputs' digests are not read again)
  # Every check passed: from here on the workdir is written, by this run alone.
  with multihost.workdir_lock(workdir) if workdir else contextlib.nullcontext():
    return _run(config, name, workdir, stop_after, log, train_split, heldout, evals, task, made,
                trainer, ckpt)


def contents_digest(split) -> Optional[str]:
  """sha256 of a split held in memory (its features, ids and corruption record: what the
  trainer places on the devices and reports); None for a streamed one (`source.Source`: the
  trainer compares each chunk it reads) and in a job of one process."""
  if jax.process_count() == 1 or not hasattr(split, 'features'):
    return None
  return files.digest({'features': split.features, 'ids': split.ids,
                       'corruption': split.corruption})


def check_same_contents(contents: dict, dataset: str) -> None:
  """UserError on every process of a `jax.distributed` job, naming the first split (config
  field -> (split expression, `contents_digest`)) whose contents not every process holds alike
  (a host's copy of the data prepared or corrupted otherwise): the trainer places each
  process's own copy on its devices (`mesh.from_host`), without comparing them."""
  if jax.process_count() == 1:
    return
  for field, (split, digest) in contents.items():
    if digest is not None and not multihost.same_everywhere(digest):
      raise UserError(f'the processes of this job hold different contents of {field} {split!r} '
                      f'of dataset {dataset!r} (this process, {jax.process_index()}: sha256 '
                      f'{digest[:16]}): give every process the same prepared data')


def same_policy(name: str, made: policies.Policy, rater: str, scores: str) -> None:
  """UserError on every process of a `jax.distributed` job unless every process made policy
  `name` with the same `aux` (rater parameters, weights table, reference model, SAE statistics):
  each reads the policy's inputs and runs its set-up alone, which one program on the same data,
  config and seeds makes the same unless a file changed while they read it."""
  if jax.process_count() == 1 or multihost.same_everywhere(
      files.digest(jax.device_get(made.aux))):
    return
  given = ' and '.join(f'--{k} {v!r}' for k, v in (('rater', rater), ('scores', scores)) if v)
  why = (f'{given} read differently (a run still training? another copy on a host?)' if given else
         'its set-up gave each process another result (not deterministic on these devices?)')
  raise UserError(f'the processes of this job made policy {name} differently: {why}: run again, '
                  'or run one process')


def _checked_inputs(config, policy, rater, scores, workdir, stop_after):
  """(policy name, train split or its source, held-out and eval splits, task) of a run whose
  settings and data pass every check made before the policy's set-up; each process checks alone."""
  name = policy_name(config, policy)
  policies.check_inputs(name, rater=rater, scores=scores)
  config_checks.validate(config, sections_read(config, name))
  d, t = config.data, config.train
  check_batch_splits(t.batch_size, len(t.seeds), 'train.batch_size', jax.devices())
  if stop_after is not None and not workdir:
    raise UserError('--stop_after needs --workdir (the checkpoint is written there)')
  if stop_after is not None and stop_after < 1:
    raise UserError(f'--stop_after must be >= 1, got {stop_after}')
  if stop_after is not None and stop_after > t.epochs:  # it would never stop the run
    raise UserError(f'--stop_after={stop_after} is past the run\'s last epoch '
                    f'(train.epochs={t.epochs})')
  if t.get('stream', False):  # read as the steps go (the trainer checks each chunk it reads)
    if name in policies.WHOLE_SPLIT:
      raise UserError(f'policy {name} reads the whole training split (its features): it cannot '
                      'stream it (set train.stream=False)')
    train_split = source.open_source(d, d.train_split, corrupt=True)
  else:
    train_split = pipeline.load_split(d, d.train_split, corrupt=True)
  heldout = pipeline.load_split(d, d.heldout_split)
  evals = pipeline.load_split(d, d.eval_split)
  if t.batch_size > len(train_split):  # an epoch would be one batch, mostly padding
    raise UserError(f'train.batch_size={t.batch_size} is more than the {len(train_split)} '
                    f'examples of data.train_split={d.train_split!r}')
  task = tasks.make_task(config.task, train_split.info)
  corruption.from_config(d).check_targets(train_split.info, task)
  for split in (train_split, heldout, evals):  # e.g. tokens outside the vocabulary
    if hasattr(split, 'features'):
      task.check_data(split.features)
  # Before the policy's set-up and the trainer's compile, which step 1's NaN would waste: every
  # seed's model as the trainer initialises it, on this process's devices (each process checks
  # alone; in a job of one process, the trainer's), the batch split over them as its steps do.
  tasks.check_initial_loss(task, initial_params(task, t.seeds), {
      f'the first {t.batch_size} examples of data.train_split': jax.device_put(
          train_split.take(np.arange(t.batch_size)),
          NamedSharding(seeds_mesh(len(t.seeds)), P(BATCH)))},
      models=[f'model seed {s}' for s in t.seeds])
  if workdir:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise UserError(f'--workdir {workdir!r} exists and is not a folder')
    files.check_not_other_run(workdir, 'history.jsonl', 'training run')
  return name, train_split, heldout, evals, task


def _run(config, name, workdir, stop_after, log, train_split, heldout, evals, task, made, trainer,
         ckpt) -> dict:
  d, t = config.data, config.train
  history_log, restored = None, 0

  def on_start(epoch):  # the epoch of the checkpoint restored (an older one if the newest is bad)
    nonlocal history_log, restored
    restored = epoch
    if workdir and jax.process_index() == 0:
      history_log = files.JsonlLog(os.path.join(workdir, 'history.jsonl'), 'epoch', epoch)
    if epoch:
      log(f'resuming from the checkpoint at epoch {epoch}')
  origin = d.get('dataset_dir', '') or f'{d.name}:{d.train_split}'
  if hasattr(train_split, 'features'):
    held = f'{int(train_split.is_corrupted.sum())} corrupted'
  else:
    held = 'streamed'
  log(f'training {len(t.seeds)} {task.__class__.__name__} model(s) (seeds '
      f'{", ".join(map(str, t.seeds))}) on {origin} ({len(train_split)} examples, {held}) for '
      f'{t.epochs} epochs, policy {name} ({made.num_selected} examples per epoch)')

  def on_record(record):
    log(format_record(record, d.eval_split))
    if history_log:
      history_log.write(record)
  result = trainer.run(train_split, {'heldout': heldout, 'eval': evals}, t.seeds, epochs=t.epochs,
                       log=on_record, checkpointer=ckpt, checkpoint_every=t.checkpoint_every,
                       stop_after=stop_after, on_start=on_start)
  if result.stopped_after is not None:
    log(f'stopped after epoch {result.stopped_after} (checkpointed); run again with the same '
        '--workdir to resume')
    return {'stopped_after': result.stopped_after}
  report = {'policy': name, 'num_train': len(train_split), **result.report(),
            'config': json.loads(config.to_json_best_effort())}
  if history_log and history_log.history and restored >= t.epochs:  # finished: its last record
    log(f'this run finished at epoch {restored}; its last record:')
    log(format_record(history_log.history[-1], d.eval_split))
  log(f'{name}: {result.example_gradients:,} example-gradients in {result.steps:,} steps per model '
      f'(+{result.setup_example_gradients:,} example-gradients and {result.setup_forwards:,} '
      'forwards spent once to make the policy)')
  if workdir:  # the figure first: report.json marks the run finished
    settings = ''.join(f', {f} {config.policy[f]}' for f in policies.FIELDS[name] if '.' not in f)
    title = (f'launch.train: {config.task.name} on {origin} ({len(train_split)} examples, {held})'
             f'\npolicy {name}{settings}; {made.num_selected} examples per epoch, batch '
             f'{t.batch_size}, {len(t.seeds)} seed(s)')
    figure = os.path.join(workdir, 'train_report.png')
    with multihost.together('writing report.json'):
      if jax.process_index() == 0:
        drawn = plots.draw_or_warn(lambda path: plots.save_train_report(
            path, report['history'], t.seeds, title, d.eval_split), figure)
        files.write_json(os.path.join(workdir, 'report.json'), report)
        log(f'wrote {os.path.join(workdir, "report.json")}, history.jsonl'
            + f' and {figure}' * drawn)
  return report


