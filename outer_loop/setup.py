"""From a config to the bi-level problem: models, optimizers, checks on the hyper-parameters."""
import ml_collections
import optax

from datarater import models
from datarater.errors import UserError
from inner_loop.optimizers import make_inner_optimizer, make_step_inverse
from inner_loop.unroll import init_inner_state
from outer_loop.meta_step import META_GRADIENT_MODES, MIXED_RECOMPUTE, MetaProblem
from outer_loop import mixed_mode


def validate_config(config: ml_collections.ConfigDict) -> None:
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
  make_inner_optimizer(config.inner.optimizer, config.inner.learning_rate)  # checks the name
  if config.outer.meta_gradient not in META_GRADIENT_MODES:
    raise UserError(f'unknown outer.meta_gradient {config.outer.meta_gradient!r} '
                    f'(choose from {", ".join(META_GRADIENT_MODES)})')
  recompute = config.outer.get('mixed_recompute', 'auto')
  if recompute not in MIXED_RECOMPUTE:
    raise UserError(f'unknown outer.mixed_recompute {recompute!r} '
                    f'(choose from {", ".join(MIXED_RECOMPUTE)})')
  if recompute == 'invert' and make_step_inverse(config.inner.optimizer, 1.0) is None:
    raise UserError(f"outer.mixed_recompute='invert' needs an inner optimizer that can be run "
                    f"backwards (momentum, adam), got inner.optimizer={config.inner.optimizer!r}")
  boundaries = config.outer.get('mixed_boundaries', 'replay')
  if boundaries not in mixed_mode.BOUNDARIES:
    raise UserError(f'unknown outer.mixed_boundaries {boundaries!r} '
                    f'(choose from {", ".join(mixed_mode.BOUNDARIES)})')
  if config.outer.get('mixed_segment', 0) < 0:
    raise UserError(f'outer.mixed_segment must be >= 0 (0: default), '
                    f'got {config.outer.mixed_segment}')


def make_outer_optimizer(outer: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with global-norm clipping and a linear warm-up to a constant learning rate."""
  schedule = optax.linear_schedule(0.0, outer.learning_rate, max(outer.warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(outer.clip_norm), optax.adam(schedule))


def build_problem(config: ml_collections.ConfigDict, num_classes: int, example_batch: dict):
  """Returns (MetaProblem, task model, rater) for batches shaped like `example_batch`."""
  task = models.task_model(num_classes, config.task_model.hidden, config.task_model.activation)
  rater = models.Rater(num_classes, config.rater.hidden, config.rater.activation)
  inner_opt = make_inner_optimizer(config.inner.optimizer, config.inner.learning_rate)
  image = example_batch['image']

  def task_loss(params, batch):
    return models.per_example_loss(task.apply, params, batch)

  def init_member(key):
    return init_inner_state(task.init(key, image), inner_opt)

  problem = MetaProblem(task_loss=task_loss, rater_apply=rater.apply, init_member=init_member,
                        inner_optimizer=inner_opt, outer_optimizer=make_outer_optimizer(config.outer),
                        temperature=config.rater.temperature, reset_every=config.inner.reset_every,
                        meta_gradient=config.outer.meta_gradient,
                        mixed_recompute=config.outer.get('mixed_recompute', 'auto'),
                        mixed_segment=config.outer.get('mixed_segment', 0),
                        mixed_boundaries=config.outer.get('mixed_boundaries', 'replay'),
                        inner_inverse=make_step_inverse(config.inner.optimizer,
                                                        config.inner.learning_rate))
  return problem, task, rater

