"""Meta-training a DataRater: the run behind `launch.train_rater`.

`meta_train(config, workdir)` trains (or resumes) the rater by meta-gradients through a population
of inner models on all devices of the job, and writes into `workdir`: config.json (with the data's
feature spec), metrics.jsonl (one record per logged step), orbax checkpoints, and at the end
report.json and rater_report.png: how well the scores separate corrupted from clean training
examples, and the held-out figures of fresh models trained with the rater's weights versus
uniform weights. Every process of a `jax.distributed` job runs it alike; process 0 alone writes
config.json, metrics.jsonl, the report and logs; every process writes its shards of the
checkpoints.
"""
import collections
import json
import logging
import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from datarater import (checkpointing, config_checks, evaluation, files, multihost, plots, seeding,
                       tasks)
from datarater.curation import select
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.mesh import check_batch_sizes, host_copy, make_mesh
from datarater.policies.base import weighting_policy
from datarater.policies.weighting import rater_weights
from datarater.progress import setup_logging
from datarater.trainer import Trainer, check_batch_splits
from inner_loop.weighting import check_batch_size
from outer_loop import estimators, meta_step, setup, sharding
from outer_loop.batches import MetaBatches, take_on_mesh

log = logging.getLogger('datarater')


SECTIONS = ('data', 'task', 'rater', 'inner', 'outer', 'final_eval')  # what a rater run reads
# A logged mean effective sample size of the weights below this fraction of the batch is reported
# as a collapse onto a few examples.
COLLAPSED_ESS = 0.1
HEARTBEAT_S = 60.0  # between logged steps, a short progress line at least this often
# Outer steps dispatched and unfinished, at most (the device has the next one queued while the
# host prepares the one after): XLA's CPU client queues at most 32 programs per device, and
# multi-device programs queued past that can deadlock in a collective (a rendezvous that aborts).
STEPS_IN_FLIGHT = 2


def run_checkpointer(config, workdir: str) -> checkpointing.RunCheckpointer:
  """Checkpoints in `workdir`, tied to the config and to how the meta-training stream shuffles
  (`data_stream`: a checkpoint of another shuffle cannot be resumed exactly) and to the contents
  of a `data.dataset_dir` (`checkpointing.path_inputs`); the config's sections a rater run does
  not read (`policy`, `valuation`, ...) may change, and the `outer` fields of estimators other
  than its own (`estimators.unread_fields`); a record without an estimator's own field holds its
  default (`estimators.defaults`). A finished run may be extended with
  more outer steps, except under a cosine outer schedule, whose decay the run length sets."""
  fingerprint = config.copy_and_resolve_references()
  with fingerprint.unlocked():
    fingerprint.data_stream = pipeline.STREAM_VERSION
  free = (checkpointing.NON_TRAJECTORY_FIELDS + checkpointing.unread_sections(config, SECTIONS)
          + estimators.unread_fields(config.outer.meta_gradient, config))
  if config.outer.schedule == 'cosine':
    free = tuple(f for f in free if f != 'outer.steps')
  return checkpointing.RunCheckpointer(workdir, fingerprint, free_fields=free,
                                      inputs=checkpointing.path_inputs(config.data),
                                      added_fields=estimators.defaults())


def fresh_state(config, problem) -> meta_step.OuterState:
  """A new rater run's state: the rater, its inner models and their resets, drawn from the run's
  own root key (`seeding.root_key(config.seed, 'rater')`)."""
  return meta_step.init_outer_state(problem, seeding.root_key(config.seed, 'rater'),
                                    config.inner.population)


def placed_fresh_state(config, problem, mesh) -> meta_step.OuterState:
  """`fresh_state` made by one program placed on `mesh` as a run places its state
  (`sharding.outer_state_sharding`). The start-up check and a new run call it alike, so on one
  process (the same mesh) the second loads it from the persistent compilation cache where one is
  set (the launchers set one: `launch.cli`): drawing K models compiles for seconds."""
  def start_state():
    return fresh_state(config, problem)
  return jax.jit(start_state, out_shardings=sharding.outer_state_sharding(
      mesh, jax.eval_shape(start_state)))()


def meta_train(config, workdir: str, stop_after: int | None = None, devices=None) -> dict:
  """Runs (or resumes) a rater training; returns the final report ({} if stopped early, and on
  processes other than 0 once a run has trained). The estimator's own fields `config.outer`
  lacks hold their defaults (`estimators.with_defaults`: a config built in Python)."""
  setup_logging()
  config = estimators.with_defaults(config)
  if not workdir:
    raise UserError('--workdir is required')
  if stop_after is not None and stop_after < 1:
    raise UserError(f'--stop_after must be >= 1, got {stop_after}')
  with multihost.together('checking its settings and data'):
    config_checks.validate(config, SECTIONS)
    if stop_after is not None and stop_after > config.outer.steps:  # it would never stop the run
      raise UserError(f'--stop_after={stop_after} is past the run\'s last outer step '
                      f'(outer.steps={config.outer.steps})')
    check_batch_size(config.inner.batch_size, 'inner.batch_size')
    mesh = make_mesh(config.inner.population, devices)
    check_batch_sizes(mesh, **{'inner.batch_size': config.inner.batch_size,
                               'outer.batch_size': config.outer.batch_size})
    if config.final_eval.num_models > 0:  # the report's fresh models: this process's devices
      check_batch_splits(config.inner.batch_size, config.final_eval.num_models,  # of the run
                         'inner.batch_size', mesh.local_devices)
    data = MetaBatches(config)
    for field, size, split in (('inner.batch_size', config.inner.batch_size, data.train),
                               ('outer.batch_size', config.outer.batch_size, data.heldout)):
      if size > len(split):
        raise UserError(f'{field}={size} is more than the {len(split)} examples it is drawn from')
    problem, estimator = setup.build_problem(config, data.info)
    for split in (data.train, data.heldout, data.eval):  # e.g. tokens outside the vocabulary
      problem.task.check_data(split.features)
      problem.rater.check_data(split.features)
    # A loss not finite at initialisation would skip outer.max_skipped_steps compiled steps:
    # checked at the run's initial state (`placed_fresh_state`), each model on its first batches,
    # placed on this process's devices as the run's mesh places them (K/npop models, B/nbatch
    # examples a device; no program spans processes while each checks alone), so the check
    # needs no more memory on a device than the run where the mesh is this process's.
    check_mesh = make_mesh(config.inner.population, mesh.local_devices)
    inner, outer = data.indices_at(0)
    initial = placed_fresh_state(config, problem, check_mesh)
    inner_params, rater_params = initial.population.params, initial.rater_params
    k = config.inner.population
    tasks.check_initial_loss(problem.task, inner_params, {
        f'the {inner.shape[2]} examples of its first inner batch':
            take_on_mesh(data.train, inner[:, 0], check_mesh),
        f'the {outer.shape[1]} examples of its first outer batch':
            take_on_mesh(data.heldout, outer, check_mesh)},
        models=[f'inner model {m} of inner.population={k}' for m in range(k)], per_model=True)
    # The rater scores splits in blocks of any size once trained (filter, valuate, policies):
    # each score must read its example alone (one rater, as every device of the run holds).
    tasks.check_per_example(problem.rater, host_copy(rater_params),
                            data.heldout.take(np.arange(min(4, len(data.heldout)))))
    del initial, inner_params, rater_params  # (the run makes its own, placed on its mesh)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise UserError(f'--workdir {workdir!r} exists and is not a folder')
    files.check_not_other_run(workdir, 'metrics.jsonl', 'rater run')
  pipeline.check_same_everywhere(pipeline.builder_of(config.data),
                                 pipeline.dataset_name(config.data))
  ckpt = run_checkpointer(config, workdir)
  resume_step = ckpt.check_compatible()
  if resume_step is not None and resume_step > config.outer.steps:
    raise UserError(f'--workdir {workdir!r} holds a checkpoint at outer step {resume_step}, past '
                    f'outer.steps={config.outer.steps}; use a new --workdir')
  if resume_step is not None and stop_after is not None and resume_step > stop_after:
    raise UserError(f'--workdir {workdir!r} holds a checkpoint at outer step {resume_step}, past '
                    f'--stop_after={stop_after}')
  # Every check passed: from here on the workdir is written, by this run alone.
  with multihost.workdir_lock(workdir):
    return _run(config, workdir, stop_after, mesh, data, problem, estimator, ckpt, resume_step)


def _run(config, workdir, stop_after, mesh, data, problem, estimator, ckpt, resume_step) -> dict:
  primary = jax.process_index() == 0

  rater_module = tasks.registry.module_of(config.rater.name)
  if primary and rater_module is None:
    log.warning('warning: rater %r is registered where no other process can import it (a script '
                'or a --config file): launch.export_rater and launch.filter will not know it; '
                'register it in a module on PYTHONPATH', config.rater.name)

  def write_config():
    if primary:
      files.write_json(os.path.join(workdir, 'config.json'), {
          'config': json.loads(config.to_json()), 'data_info': data.info.to_json(),
          'rater_module': rater_module})
  report_path = os.path.join(workdir, 'report.json')
  report = _finished_report(report_path, config) if resume_step == config.outer.steps else None
  if report is not None:
    write_config()
    if primary:
      log.info('this run finished at outer step %d; its report is %s', resume_step, report_path)
      log_report(config, report)
    return report

  example_inner, example_outer = data.host_batches_at(0)
  init = lambda: fresh_state(config, problem)
  step_fn, state_shardings, inner_sh, outer_sh = sharding.jit_outer_step(
      problem, estimator, mesh, jax.eval_shape(init), example_inner, example_outer)
  if resume_step is None:
    state, start, saved = placed_fresh_state(config, problem, mesh), 0, None
  else:
    state, meta = ckpt.restore_latest(checkpointing.abstract_like(jax.eval_shape(init),
                                                                  state_shardings))
    start = int(meta['step'])
    saved = (meta.get('extra') or {}).get('progress')
    if jax.process_index() == 0:
      log.info('resumed from the checkpoint at outer step %d', start)
  # Process 0 writes them: if it fails (or any process is signalled), every process stops here.
  with multihost.together('writing config.json and metrics.jsonl'):
    write_config()  # after the restore: a workdir whose checkpoints all fail to restore is kept
    metrics_log = (files.JsonlLog(os.path.join(workdir, 'metrics.jsonl'), 'step', start)
                   if primary else None)
  progress = _Progress(config, problem, data, metrics_log, start, saved)

  last_step = config.outer.steps if stop_after is None else min(stop_after, config.outer.steps)
  state = _outer_steps(config, mesh, data, ckpt, progress, step_fn, state, start, last_step,
                       inner_sh, outer_sh)
  if last_step < config.outer.steps:
    if primary:
      log.info('stopped after outer step %d (checkpointed); run again to resume', last_step)
    return {}
  return _score_and_report(config, workdir, data, problem, state, progress, metrics_log,
                           mesh.local_devices)


def _outer_steps(config, mesh, data, ckpt, progress, step_fn, state, start: int,
                 last_step: int, inner_sh, outer_sh):
  """Compiles the outer step (`step_fn`, jitted) and runs it from step `start` to `last_step`,
  recording and checkpointing as it goes; returns the state after the last step run (a signal
  to any process stops every process after one step, checkpointed there)."""
  primary = jax.process_index() == 0
  # Multi-process on CPU, each step finishes before the next is dispatched: with steps queued
  # ahead, a two-process run on 2 cores can hang mid-run (one device of a process waiting in the
  # cross-process all-reduce, the other's launch of the same step waiting behind XLA's limit on
  # queued programs).
  in_flight = 1 if jax.process_count() > 1 and jax.default_backend() == 'cpu' else STEPS_IN_FLIGHT
  if primary:
    log.info('training the rater: outer steps %d..%d on %d device(s) in %d process(es) (mesh %s), '
             'T=%d, K=%d, B=%d%s', start, config.outer.steps, mesh.devices.size,
             jax.process_count(), dict(mesh.shape), config.inner.steps, config.inner.population,
             config.inner.batch_size,
             f', advancing A={config.inner.advance_steps} steps before each unroll'
             if config.inner.advance_steps else '')
  def stopped(step, signum):
    if primary:
      log.info('stopped after outer step %d (checkpointed): %s was %s; run again to %s', step,
               'a process of this job' if jax.process_count() > 1 else 'the run',
               'sent SIGTERM' if signum == signal.SIGTERM else 'interrupted (Ctrl-C)',
               'write the report' if step == config.outer.steps else 'resume')

  # From the compilation on, Ctrl-C or SIGTERM to any process stops every process after one step,
  # checkpointed there (`StopVote`: the vote also takes one that comes while the pending
  # checkpoint writes finish, as they do whatever happens).
  with multihost.StopVote(mesh.devices, start, stopped) as vote, ckpt.closing():
    if start < last_step:
      t0 = time.time()
      if primary:
        log.info('compiling the outer step (once, %s meta-gradients) ...',
                 config.outer.meta_gradient)
      with multihost.together('compiling the outer step'):  # (an error here, alone, would leave
        batches = data.device_batches_at(start, inner_sh, outer_sh)  # the others in the first
        step_fn = step_fn.lower(state, *batches).compile()  # step: the vote below is not reached)
      if primary:
        log.info('compiled in %.1f s', time.time() - t0)
    progress.start_clock(start)
    for step in range(start, last_step):
      state, metrics = step_fn(state, *batches)
      progress.add(metrics)
      done = step + 1
      # The next step's batches, gathered while this one runs, before the vote (an error on one
      # process stops every process there).
      if done < last_step:
        batches = data.device_batches_at(done, inner_sh, outer_sh)
      progress.wait(in_flight - 1)  # then at most in_flight steps are ever queued unfinished
      ckpt.check()  # this process's part of the last checkpoint failed: every process stops here
      stop = vote.after(done)
      record_now = done % config.log_every == 0 or done == config.outer.steps
      save_now = done % config.checkpoint_every == 0 or done == last_step or stop
      if record_now or save_now:
        progress.check_skipped(done)
      if record_now:
        # Process 0 alone logs: a failure there (a full disk) stops every process here, not in the
        # next step or checkpoint, which the others would wait in for good.
        with multihost.together(f'logging outer step {done}'):
          if primary:
            progress.record(done, state)
        progress.restart(done)
      elif primary:
        progress.heartbeat(done)
      if save_now:  # collective: every process writes its shards
        ckpt.save(done, state, data.position(done), {'progress': progress.saved()})
      if stop:
        break
  return state


def _score_and_report(config, workdir, data, problem, state, progress, metrics_log,
                      devices) -> dict:
  """Process 0 scores the final rater and reports (its fresh models on `devices`, its own of the
  run's) while the others wait for it here (not at exit, where JAX aborts a job whose processes
  end over 300 s apart); if it fails, its scores are not finite, or any process is signalled,
  every process stops. The report on process 0, else {}."""
  primary = jax.process_index() == 0
  scores = problem_line = None
  with multihost.together('scoring the final rater'):
    if primary:
      rater_params, last_iterate = _reported_rater(problem, state)
      scores = progress.scores(rater_params, config.outer.steps, 'reported')
      problem_line = unscorable(config, scores)
  if not multihost.agree(problem_line is None):
    raise UserError(problem_line or unscorable(config, None))
  report = {}
  with multihost.together('writing the report'):
    if primary:
      report = final_report(config, workdir, data, problem, rater_params, metrics_log.history,
                            int(host_copy(state.skipped)),
                            last_iterate if problem.ema else None, scores,
                            progress.scored.get((config.outer.steps, 'last_iterate')),
                            devices=devices)
  return report


def _reported_rater(problem, state):
  """Host copies of (the rater as reported, its last iterate): averaged here, on this process's
  copies, since process 0 alone logs and reports."""
  host = host_copy(state.replace(population=None, opt_state=None))
  return jax.device_get(problem.rater_params_of(host)), host.rater_params


class _Progress:
  """What a rater run logs between its records: the sums of the step metrics since the last
  record (on the host, of the steps waited for), the step they start after (`since`), the step
  since which the meta-gradient has been 0, and the clock behind steps/s and the ETA. `saved()`
  goes into each checkpoint, so that a resumed run writes the records an uninterrupted one
  would. Process 0 writes the records (metrics.jsonl, a progress line, the rater's noise AUROC,
  and each kind's where the training split records several)."""

  def __init__(self, config, problem, data, metrics_log, start: int, saved: Optional[dict]):
    self._config, self._problem, self._data, self._log = config, problem, data, metrics_log
    saved = saved or {'totals': None, 'since': start, 'flat_since': None}
    self.since, self._flat_since = saved['since'], saved['flat_since']
    self.totals = saved['totals'] and {k: np.float32(v) for k, v in saved['totals'].items()}
    self._longest_run = None  # the most steps skipped in a row since the last check
    self._queued = collections.deque()  # the metrics of the steps not yet waited for
    self._score = jax.jit(problem.rater.score)  # compiled once, reused at every record
    corrupted = data.train.is_corrupted
    # else no AUROC, and no scoring pass over the training split at each record
    self._measurable = bool(corrupted.any() and not corrupted.all())
    # several kinds recorded: each one's AUROC too, on the same scores (one kind's is the overall)
    self._by_kind = self._measurable and len(np.unique(data.train.corruption[corrupted])) > 1
    self.scored = {}  # the scores of the last record, by step and role: the report reuses them
    self.start_clock(start)

  def start_clock(self, step: int) -> None:
    self._t0 = self._last_line = time.time()
    self._timed_from = step

  def add(self, metrics: dict) -> None:
    """Queues the metrics of the step just dispatched (on the devices) for `wait`."""
    self._queued.append(metrics)

  def wait(self, unfinished: int = 0) -> None:
    """Waits for every queued step but the last `unfinished` and adds their metrics to the sums,
    on the host in float32 in step order (no program per step: the loop's queue stays short)."""
    while len(self._queued) > unfinished:
      metrics = host_copy(jax.block_until_ready(self._queued.popleft()))
      in_a_row = metrics.pop('skipped_in_a_row')
      self._longest_run = (in_a_row if self._longest_run is None
                           else np.maximum(self._longest_run, in_a_row))
      self.totals = metrics if self.totals is None else {k: self.totals[k] + v
                                                         for k, v in metrics.items()}

  def restart(self, step: int) -> None:
    """After the record at `step`: sums and clock from there."""
    self.start_clock(step)
    self.since, self.totals = step, None

  def saved(self) -> dict:
    self.wait()
    return {'totals': self.totals and {k: float(v) for k, v in self.totals.items()},
            'since': self.since, 'flat_since': self._flat_since}

  def check_skipped(self, step: int) -> None:
    """Stops the run (one line) when the meta-gradient has not been finite at
    outer.max_skipped_steps steps in a row (by `step`), or at every step of a shorter run (whose
    rater would be reported untrained, as it was initialised)."""
    self.wait()
    in_a_row, self._longest_run = int(self._longest_run), None
    config = self._config
    if in_a_row >= min(config.outer.max_skipped_steps, config.outer.steps):
      raise UserError(
          f'the meta-gradient was not finite at {in_a_row} outer steps in a row (by step '
          f'{step}); the rater was left as it was and its last checkpoint holds finite values. '
          f'Lower inner.learning_rate ({config.inner.learning_rate:g}) or outer.learning_rate '
          f'({config.outer.learning_rate:g}), or check that the task\'s loss is finite at '
          'initialisation')

  def _rate(self, done: int) -> float:
    return (done - max(self.since, self._timed_from)) / (time.time() - self._t0)

  def _eta(self, done: int) -> str:
    """' | ETA ...' to the run's last step at the rate since the clock started ('' at the end)."""
    steps = self._config.outer.steps
    if done >= steps:
      return ''
    left = (steps - done) * (time.time() - self._t0) / max(done - max(self.since,
                                                                      self._timed_from), 1)
    return f' | ETA {left:.0f} s' if left < 90 else f' | ETA {left / 60:.0f} min'

  def heartbeat(self, done: int) -> None:
    """A short progress line if none has been logged for HEARTBEAT_S."""
    if time.time() - self._last_line > HEARTBEAT_S:
      self.wait()  # step `done` has run (dispatch runs ahead of it)
      log.info('step %5d/%d | %.2f steps/s%s (metrics every %d steps)', done,
               self._config.outer.steps, self._rate(done), self._eta(done),
               self._config.log_every)
      self._last_line = time.time()

  def scores(self, params, step: int, role: str) -> np.ndarray:
    """The scores of rater `params` (host copies) of the training split, as recorded at `step`
    for `role`, or computed."""
    if (step, role) not in self.scored:
      self.scored[step, role] = evaluation.score_split(
          lambda b: self._score(params, b), self._data.train, jit=False)
    return self.scored[step, role]

  def record(self, done: int, state) -> None:
    """Process 0's record of step `done`: metrics.jsonl, a progress line, warnings. Means over the
    steps since the last record that were not skipped (single steps jump at member resets);
    skipped steps and diverged inner models are counted."""
    config = self._config
    self.wait()
    sums = {k: float(v) for k, v in self.totals.items()}
    counts = ('skipped_steps', 'diverged_members')
    taken = done - self.since - sums['skipped_steps']
    record = {'step': done, **{k: v / taken if taken else float('nan')
                               for k, v in sums.items() if k not in counts},
              **{k: int(sums[k]) for k in counts}, 'steps_per_sec': self._rate(done)}
    if self._measurable:
      self.scored.clear()
      rater, last_iterate = _reported_rater(self._problem, state)
      train, scores = self._data.train, self.scores(rater, done, 'reported')
      record['noise_auroc'] = evaluation.noise_auroc(scores, train.is_corrupted)
      if self._by_kind:  # as the report's
        record['auroc_by_kind'] = evaluation.auroc_by_kind(scores, train.corruption,
                                                           train.corruption_kinds)
      if self._problem.ema:  # the rater scored above is the average; its last iterate beside it
        record['noise_auroc_last_iterate'] = evaluation.noise_auroc(
            self.scores(last_iterate, done, 'last_iterate'), train.is_corrupted)
    self._log.write(record)
    extra = ''.join(f' | {record[k]} {k.replace("_", " ")}' for k in counts if record[k])
    auroc = f' | noise AUROC {record["noise_auroc"]:.3f}' if self._measurable else ''
    log.info('step %5d/%d | outer loss %.4f | inner loss %.4f | meta-grad norm %.3g | '
             'weights ESS %.2f%s | %.1f steps/s%s', done, config.outer.steps,
             record['outer_loss'], record['inner_loss'], record['meta_grad_norm'],
             record['weight_ess'], auroc, record['steps_per_sec'], extra + self._eta(done))
    self._last_line = time.time()
    if record['weight_ess'] < COLLAPSED_ESS:
      log.info("warning: the rater's weights rest on a few examples of each batch "
               '(effective sample size %.1f%% of it): the inner models fit those alone. '
               'outer.learning_rate=%g may be too large, or rater.temperature=%g too low',
               100 * record['weight_ess'], config.outer.learning_rate, config.rater.temperature)
    if record['meta_grad_norm'] == 0.0 and not record['skipped_steps']:
      self._flat_since = self._flat_since or self.since + 1
      log.info('warning: the meta-gradient has been exactly 0 since outer step %d: the '
               "rater's weights have saturated (outer.learning_rate=%g may be too large)",
               self._flat_since, config.outer.learning_rate)
    else:
      self._flat_since = None


def unscorable(config, scores: Optional[np.ndarray]) -> Optional[str]:
  """The line that stops a run whose final rater's scores of the training split overflow
  (finite parameters, e.g. ~1e28 after huge outer steps), else None; `scores` None: process 0's
  scores, as another process reports them."""
  if scores is not None and np.isfinite(scores).all():
    return None
  where = (f'on {int((~np.isfinite(scores)).sum())} of {len(scores)} training examples'
           if scores is not None else "on process 0's training examples")
  return (f"the rater's scores are not finite {where} after outer step {config.outer.steps} "
          f'(its checkpoints are kept); outer.learning_rate={config.outer.learning_rate:g} may '
          'be too large')


def fresh_model_results(config, data, problem, rater_params, devices=None) -> dict:
  """Fresh task models trained `final_eval.train_steps` steps with the rater's weights and with
  uniform weights (same seeds: same initialisations and data order); held-out and eval figures.
  {} when `final_eval.num_models` is 0. `devices`: those they train on (a Trainer's; meta_train
  gives this process's devices of the rater run), by default every device of this process."""
  fe = config.final_eval
  if fe.num_models < 1:
    return {}
  policies = {'rater': rater_weights(problem.rater, rater_params, problem.temperature,
                                     len(data.train)),
              'uniform': weighting_policy('uniform', len(data.train))}
  seeds = [config.seed * fe.num_models + m for m in range(fe.num_models)]
  results = {}
  for name, policy in policies.items():
    lr = f'inner.learning_rate ({config.inner.learning_rate:g})'
    run = Trainer(problem.task, problem.inner_optimizer, policy, config.inner.batch_size,
                  learning_rate_setting=lr, devices=devices).run(
        data.train, {'heldout': data.heldout, 'eval': data.eval}, seeds, steps=fe.train_steps)
    results[name] = {split: {k: float(np.mean(v)) for k, v in metrics.items()}
                     for split, metrics in run.final.items() if split in ('heldout', 'eval')}
  return results


def _finished_report(path: str, config) -> Optional[dict]:
  """The report a finished run wrote, if it reports this config's steps and fresh models (a run
  extended, or given other final_eval settings, reports again, as does one whose report is
  unreadable or lacks what `log_report` prints)."""
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, ValueError):
    return None
  if (not isinstance(report, dict) or report.get('outer_steps') != config.outer.steps
      or report.get('final_eval') != config.final_eval.to_dict()):
    return None
  models = report.get('fresh_models')
  if 'noise_auroc' not in report or not isinstance(models, dict) or not all(
      isinstance(r, dict) and isinstance(r.get('eval'), dict)
      and isinstance(r.get('heldout'), dict) and 'loss' in r['heldout']
      for r in models.values()):
    return None
  return report


def final_report(config, workdir, data, problem, rater_params, history, skipped: int,
                 last_iterate, scores: np.ndarray, last=None, devices=None) -> dict:
  """Noise AUROC of `scores` (the rater's, finite, of the training split), the keep their
  histogram suggests, and fresh models trained with rater vs uniform weights.

  `last_iterate`: the rater's last parameters when `rater_params` is their Polyak average; its
  AUROCs are reported beside. `last`: its scores if already computed (by the last log step).
  `devices`: those the fresh models train on (`fresh_model_results`).
  """
  auroc = evaluation.noise_auroc(scores, data.train.is_corrupted)
  fe = config.final_eval
  if fe.num_models:
    log.info('training fresh models for the report: %d per weighting, %d steps ...',
             fe.num_models, fe.train_steps)
  results = fresh_model_results(config, data, problem, rater_params, devices)
  by_kind = evaluation.auroc_by_kind(scores, data.train.corruption, data.train.corruption_kinds)
  report = {'noise_auroc': auroc, 'auroc_by_kind': by_kind,
            'suggested_keep': select.suggest_keep(scores),  # as launch.filter --suggest_keep
            'label_noise': config.data.label_noise, 'fresh_models': results,
            'outer_steps': config.outer.steps, 'skipped_steps': skipped,
            'final_eval': config.final_eval.to_dict()}
  if last_iterate is not None:
    if last is None:
      last = evaluation.score_split(lambda b: problem.rater.score(last_iterate, b), data.train)
    report['last_iterate'] = {
        'noise_auroc': evaluation.noise_auroc(last, data.train.is_corrupted),
        'auroc_by_kind': evaluation.auroc_by_kind(last, data.train.corruption,
                                                  data.train.corruption_kinds)}
  report = files.json_safe(report)  # returned as written (an AUROC not defined is None)
  # The plot first: report.json marks the run finished (a rerun then only prints it). A plot
  # that fails is a warning: the report is written without it.
  title = (f'Rater run on {pipeline.dataset_name(config.data)} {config.data.train_split}, '
           f'{config.outer.steps} outer steps')
  figure = os.path.join(workdir, 'rater_report.png')
  drawn = plots.draw_or_warn(lambda path: plots.save_rater_report(
      path, history, scores, data.train.corruption, data.train.corruption_kinds, title,
      report['suggested_keep']), figure)
  files.write_json(os.path.join(workdir, 'report.json'), report)
  log_report(config, report)
  log.info('wrote %s', ' and '.join([os.path.join(workdir, 'report.json')] + [figure] * drawn))
  return report


def log_report(config, report: dict) -> None:
  if report.get('skipped_steps'):
    log.info('%d outer steps were skipped (meta-gradient not finite)', report['skipped_steps'])
  auroc = report['noise_auroc']  # None where no example (or every one) is recorded corrupted
  by_kind = report.get('auroc_by_kind') or {}
  if auroc is not None and set(by_kind) <= {'label_symmetric', 'label_confusion'}:
    log.info('noise AUROC of the rater scores on %s: %.4f (label noise %.0f%%)',
             config.data.train_split, auroc, 100 * config.data.label_noise)
  elif auroc is not None:  # several kinds (planted or the dataset's own record): each
    kinds = ', '.join(f'{k} {v:.3f}' if v is not None else f'{k} n/a'
                      for k, v in by_kind.items())
    log.info('noise AUROC of the rater scores on %s: %.4f (by kind: %s)',
             config.data.train_split, auroc, kinds)
  shown = lambda v, percent: ('n/a' if v is None or not np.isfinite(v)  # a diverged model
                              else f'{100 * v:.2f}%' if percent else f'{v:.4f}')
  for name, r in report['fresh_models'].items():
    metrics = ', '.join(f'{config.data.eval_split} {k} {shown(v, k == "accuracy")}'
                        for k, v in sorted(r['eval'].items(), key=lambda kv: kv[0] != 'loss'))
    log.info('fresh models trained %d steps with %s weights: held-out loss %s, %s',
             config.final_eval.train_steps, name, shown(r['heldout']['loss'], False), metrics)
