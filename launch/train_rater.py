r"""Meta-learns a DataRater: `python -m launch.train_rater --config=configs/digits.py --workdir=DIR`.

Trains the rater by meta-gradients through a population of inner models (see outer_loop/), on all
local devices. Writes into DIR: config.json, metrics.jsonl (one JSON record per logged step),
orbax checkpoints (run again with the same DIR to resume), and at the end report.json and
rater_report.png: how well the scores separate corrupted from clean training examples, and the
held-out loss of fresh models trained with the rater's weights versus uniform weights.
"""
import json
import logging
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import numpy as np
from ml_collections import config_flags

from datarater import checkpointing, evaluation, plots
from datarater.data import pipeline
from datarater.errors import UserError, exit_on_user_error
from inner_loop.weighting import uniform_weights
from launch import distributed
from outer_loop import meta_step, setup, sharding
from outer_loop.batches import MetaBatches

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags are defined when run as a program, so tests and tools can import this module freely."""
  config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Experiment config file.')
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, report.')
  flags.DEFINE_integer('stop_after', None,
                       'Checkpoint and exit after this outer step (a preemption drill).')
  distributed.define_flags()

log = logging.getLogger('datarater')


def _setup_logging() -> None:
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  absl_logging.set_verbosity(absl_logging.WARNING)  # Library chatter (orbax, tfds) off.


def train(config, workdir: str, stop_after: int | None = None, devices=None) -> dict:
  """Runs (or resumes) a rater training; returns the final report (empty if stopped early).

  Runs on every process of a `jax.distributed` job alike; process 0 alone writes files and logs.
  """
  _setup_logging()
  primary = distributed.is_primary()
  if not workdir:
    raise UserError('--workdir is required')
  setup.validate_config(config)
  mesh = sharding.make_mesh(config.inner.population, devices)
  sharding.check_batch_sizes(mesh, **{'inner.batch_size': config.inner.batch_size,
                                      'outer.batch_size': config.outer.batch_size})
  data = MetaBatches(config)
  ckpt = checkpointing.RunCheckpointer(workdir, config)
  resume_step = ckpt.check_compatible()
  # Every check passed: from here on the workdir is written.
  if primary:
    os.makedirs(workdir, exist_ok=True)
    checkpointing.write_json_atomic(os.path.join(workdir, 'config.json'), {
        'config': json.loads(config.to_json()), 'input_spec': data.input_spec()})

  example_inner, example_outer = data.host_batches_at(0)
  example = jax.tree.map(lambda x: x[0, 0], example_inner)
  problem, task, rater = setup.build_problem(config, data.train.num_classes, example)
  key = jax.random.PRNGKey(config.seed)
  init = lambda: meta_step.init_outer_state(
      problem, rater.init(jax.random.fold_in(key, 1), example), jax.random.fold_in(key, 2),
      config.inner.population)
  step_fn, state_shardings, inner_sh, outer_sh = sharding.jit_outer_step(
      problem, mesh, jax.eval_shape(init), example_inner, example_outer)

  if resume_step is None:
    state, start = jax.jit(init, out_shardings=state_shardings)(), 0
  else:
    state, meta = ckpt.restore(resume_step, checkpointing.abstract_like(
        jax.eval_shape(init), state_shardings))
    start = int(meta['step'])
    log.info('resumed from the checkpoint at outer step %d', start)
  metrics_log = (checkpointing.JsonlLog(os.path.join(workdir, 'metrics.jsonl'), 'step', start)
                 if primary else None)

  score_batch = jax.jit(rater.apply)  # compiled once, reused at every logging step

  def noise_auroc(rater_params):
    params = sharding.host_copy(rater_params)
    scores = evaluation.score_split(lambda b: score_batch(params, b), data.train, jit=False)
    return evaluation.noise_auroc(scores, data.train.is_corrupted)

  last_step = config.outer.steps if stop_after is None else min(stop_after, config.outer.steps)
  if primary:
    log.info('training the rater: outer steps %d..%d on %d device(s) in %d process(es) (mesh %s), '
             'T=%d, K=%d, B=%d', start, config.outer.steps, mesh.devices.size,
             jax.process_count(), dict(mesh.shape), config.inner.steps, config.inner.population,
             config.inner.batch_size)
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
  return final_report(config, workdir, data, problem, task, rater,
                      sharding.host_copy(state.rater_params), metrics_log.history)


def final_report(config, workdir, data, problem, task, rater, rater_params, history) -> dict:
  """Noise AUROC of the scores and fresh models trained with rater vs uniform weights."""
  scores = evaluation.score_split(lambda b: rater.apply(rater_params, b), data.train)
  auroc = evaluation.noise_auroc(scores, data.train.is_corrupted)
  weightings = {'rater': problem.weight_fn(rater_params), 'uniform': uniform_weights}
  fe = config.final_eval
  results = {}
  for name, weight_fn in weightings.items():
    results[name] = evaluation.train_fresh_models(
        task, problem.inner_optimizer, weight_fn, data.train, {'heldout': data.heldout, 'eval': data.eval},
        steps=fe.train_steps, batch_size=config.inner.batch_size, num_models=fe.num_models,
        seed=config.seed)
  report = {'noise_auroc': auroc, 'label_noise': config.data.label_noise,
            'fresh_models': results, 'outer_steps': config.outer.steps}
  checkpointing.write_json_atomic(os.path.join(workdir, 'report.json'), report)
  plots.save_rater_report(os.path.join(workdir, 'rater_report.png'), history, scores,
                          data.train.is_corrupted)
  log.info('noise AUROC of the rater scores on %s: %.4f (label noise %.0f%%)',
           config.data.train_split, auroc, 100 * config.data.label_noise)
  for name, r in results.items():
    log.info('fresh models trained %d steps with %s weights: held-out loss %.4f, %s loss %.4f, '
             '%s accuracy %.2f%%', fe.train_steps, name, r['heldout']['loss'],
             config.data.eval_split, r['eval']['loss'], config.data.eval_split,
             100 * r['eval']['accuracy'])
  log.info('wrote %s and %s', os.path.join(workdir, 'report.json'),
           os.path.join(workdir, 'rater_report.png'))
  return report


def main(argv):
  del argv
  distributed.initialize_from_flags()
  with exit_on_user_error():
    train(FLAGS.config, FLAGS.workdir, stop_after=FLAGS.stop_after)


if __name__ == '__main__':
  define_flags()
  app.run(main)
