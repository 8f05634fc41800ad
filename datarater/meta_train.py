"""Meta-training a DataRater: the run behind `launch.train_rater`.

`meta_train(config, workdir)` trains (or resumes) the rater by meta-gradients through a population
of inner models on all devices of the job, and writes into `workdir`: config.json (with the data's
feature spec), metrics.jsonl (one record per logged step), orbax checkpoints, and at the end
report.json and rater_report.png: how well the scores separate corrupted from clean training
examples, and the held-out figures of fresh models trained with the rater's weights versus
uniform weights. Every process of a `jax.distributed` job runs it alike; process 0 alone writes
files and logs.
"""
import json
import logging
import os
import sys
import time

import jax
import numpy as np

from datarater import checkpointing, evaluation, files, plots
from datarater.errors import UserError
from datarater.policies import weighting
from datarater.trainer import Trainer
from outer_loop import meta_step, setup, sharding
from outer_loop.batches import MetaBatches

log = logging.getLogger('datarater')


class _Stdout(logging.StreamHandler):
  """A handler that writes to whatever `sys.stdout` is when a line is logged."""

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    del value


def setup_logging() -> None:
  """Progress lines on stdout, library chatter (orbax, TFDS) off."""
  if not log.handlers:
    handler = _Stdout()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)


def validate_config(config) -> None:
  """One-line errors for hyper-parameters that cannot work, before anything is written."""
  checks = [
      (config.inner.steps >= 1, f'inner.steps (T) must be >= 1, got {config.inner.steps}'),
      (config.inner.population >= 1,
       f'inner.population (K) must be >= 1, got {config.inner.population}'),
      (config.rater.temperature > 0,
       f'rater.temperature (tau) must be > 0, got {config.rater.temperature}'),
      (config.inner.reset_every >= 1,
       f'inner.reset_every (R) must be >= 1, got {config.inner.reset_every}'),
      (config.inner.batch_size >= 1, f'inner.batch_size must be >= 1, got {config.inner.batch_size}'),
      (config.outer.batch_size >= 1, f'outer.batch_size must be >= 1, got {config.outer.batch_size}'),
      (config.outer.steps >= 0, f'outer.steps must be >= 0, got {config.outer.steps}'),
      (config.inner.learning_rate > 0,
       f'inner.learning_rate must be > 0, got {config.inner.learning_rate}'),
      (config.outer.learning_rate > 0,
       f'outer.learning_rate must be > 0, got {config.outer.learning_rate}'),
      (0 <= config.data.label_noise < 1,
       f'data.label_noise must be in [0, 1), got {config.data.label_noise}'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)


def meta_train(config, workdir: str, stop_after: int | None = None, devices=None) -> dict:
  """Runs (or resumes) a rater training; returns the final report (empty if stopped early)."""
  setup_logging()
  primary = jax.process_index() == 0
  if not workdir:
    raise UserError('--workdir is required')
  validate_config(config)
  mesh = sharding.make_mesh(config.inner.population, devices)
  sharding.check_batch_sizes(mesh, **{'inner.batch_size': config.inner.batch_size,
                                      'outer.batch_size': config.outer.batch_size})
  data = MetaBatches(config)
  problem, estimator = setup.build_problem(config, data.info)
  ckpt = checkpointing.RunCheckpointer(workdir, config)
  resume_step = ckpt.check_compatible()
  # Every check passed: from here on the workdir is written.
  if primary:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, 'config.json'), {
        'config': json.loads(config.to_json()), 'data_info': data.info.to_json()})

  report_path = os.path.join(workdir, 'report.json')
  if resume_step == config.outer.steps and os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
    if primary:
      log.info('this run finished at outer step %d; its report is %s', resume_step, report_path)
      log_report(config, report)
    return report

  example_inner, example_outer = data.host_batches_at(0)
  init = lambda: meta_step.init_outer_state(problem, jax.random.PRNGKey(config.seed),
                                            config.inner.population)
  step_fn, state_shardings, inner_sh, outer_sh = sharding.jit_outer_step(
      problem, estimator, mesh, jax.eval_shape(init), example_inner, example_outer)

  if resume_step is None:
    state, start = jax.jit(init, out_shardings=state_shardings)(), 0
  else:
    state, meta = ckpt.restore(resume_step, checkpointing.abstract_like(
        jax.eval_shape(init), state_shardings))
    start = int(meta['step'])
    log.info('resumed from the checkpoint at outer step %d', start)
  metrics_log = (files.JsonlLog(os.path.join(workdir, 'metrics.jsonl'), 'step', start)
                 if primary else None)

  score = jax.jit(problem.rater.score)  # compiled once, reused at every logging step

  def noise_auroc(rater_params):
    params = sharding.host_copy(rater_params)
    scores = evaluation.score_split(lambda b: score(params, b), data.train, jit=False)
    return evaluation.noise_auroc(scores, data.train.is_corrupted)

  last_step = config.outer.steps if stop_after is None else min(stop_after, config.outer.steps)
  if primary:
    log.info('training the rater: outer steps %d..%d on %d device(s) in %d process(es) (mesh %s), '
             'T=%d, K=%d, B=%d', start, config.outer.steps, mesh.devices.size,
             jax.process_count(), dict(mesh.shape), config.inner.steps, config.inner.population,
             config.inner.batch_size)
  if start < last_step:
    t0 = time.time()
    if primary:
      log.info('compiling the outer step (once, %s meta-gradients) ...', config.outer.meta_gradient)
    step_fn = step_fn.lower(state, *data.device_batches_at(start, inner_sh, outer_sh)).compile()
    if primary:
      log.info('compiled in %.1f s', time.time() - t0)
  t0, s0, totals = time.time(), start, None
  for step in range(start, last_step):
    state, metrics = step_fn(state, *data.device_batches_at(step, inner_sh, outer_sh))
    totals = metrics if totals is None else jax.tree.map(jax.numpy.add, totals, metrics)
    done = step + 1
    if primary and (done % config.log_every == 0 or done == last_step):
      # Averages over the steps since the last record (single steps jump at member resets).
      metrics = {k: float(v) / (done - s0) for k, v in sharding.host_copy(totals).items()}
      rate = (done - s0) / (time.time() - t0)
      record = {'step': done, **metrics, 'steps_per_sec': rate,
                'noise_auroc': noise_auroc(state.rater_params)}
      metrics_log.write(record)
      log.info('step %5d/%d | outer loss %.4f | inner loss %.4f | meta-grad norm %.3g | '
               'noise AUROC %.3f | %.1f steps/s', done, config.outer.steps, record['outer_loss'],
               record['inner_loss'], record['meta_grad_norm'], record['noise_auroc'], rate)
      t0, s0, totals = time.time(), done, None
    if done % config.checkpoint_every == 0 or done == last_step:
      ckpt.save(done, state, data.position(done))  # collective: every process writes its shards
  ckpt.close()
  if last_step < config.outer.steps:
    if primary:
      log.info('stopped after outer step %d (checkpointed); run again to resume', last_step)
    return {}
  if not primary:
    return {}
  return final_report(config, workdir, data, problem, sharding.host_copy(state.rater_params),
                      metrics_log.history)


def fresh_model_results(config, data, problem, rater_params) -> dict:
  """Fresh task models trained `final_eval.train_steps` steps with the rater's weights and with
  uniform weights (same seeds: same initialisations and data order); held-out and eval figures.
  None when `final_eval.num_models` is 0."""
  fe = config.final_eval
  if fe.num_models < 1:
    return {}
  policies = {'rater': weighting.rater_weights(problem.rater, rater_params,
                                               problem.temperature, len(data.train)),
              'uniform': weighting.weighting('uniform', len(data.train))}
  seeds = [config.seed * fe.num_models + m for m in range(fe.num_models)]
  results = {}
  for name, policy in policies.items():
    run = Trainer(problem.task, problem.inner_optimizer, policy, config.inner.batch_size).run(
        data.train, {'heldout': data.heldout, 'eval': data.eval}, seeds, steps=fe.train_steps)
    results[name] = {split: {k: float(np.mean(v)) for k, v in metrics.items()}
                     for split, metrics in run.final.items() if split in ('heldout', 'eval')}
  return results


def final_report(config, workdir, data, problem, rater_params, history) -> dict:
  """Noise AUROC of the scores and fresh models trained with rater vs uniform weights."""
  scores = evaluation.score_split(lambda b: problem.rater.score(rater_params, b), data.train)
  auroc = evaluation.noise_auroc(scores, data.train.is_corrupted)
  fe = config.final_eval
  if fe.num_models:
    log.info('training fresh models for the report: %d per weighting, %d steps ...',
             fe.num_models, fe.train_steps)
  results = fresh_model_results(config, data, problem, rater_params)
  report = {'noise_auroc': auroc, 'auroc_by_kind': evaluation.auroc_by_kind(scores, data.train),
            'label_noise': config.data.label_noise, 'fresh_models': results,
            'outer_steps': config.outer.steps}
  files.write_json(os.path.join(workdir, 'report.json'), report)
  plots.save_rater_report(os.path.join(workdir, 'rater_report.png'), history, scores,
                          data.train.is_corrupted)
  log_report(config, report)
  log.info('wrote %s and %s', os.path.join(workdir, 'report.json'),
           os.path.join(workdir, 'rater_report.png'))
  return report


def log_report(config, report: dict) -> None:
  log.info('noise AUROC of the rater scores on %s: %.4f (label noise %.0f%%)',
           config.data.train_split, report['noise_auroc'], 100 * config.data.label_noise)
  for name, r in report['fresh_models'].items():
    metrics = ', '.join(f'{config.data.eval_split} {k} ' +
                        (f'{100 * v:.2f}%' if k == 'accuracy' else f'{v:.4f}')
                        for k, v in sorted(r['eval'].items(), key=lambda kv: kv[0] != 'loss'))
    log.info('fresh models trained %d steps with %s weights: held-out loss %.4f, %s',
             config.final_eval.train_steps, name, r['heldout']['loss'], metrics)
