"""From a config to the bi-level problem and its meta-gradient estimator."""
import ml_collections
import optax

from datarater import tasks
from outer_loop.estimators import make_estimator
from outer_loop.meta_step import MetaProblem
from inner_loop.optimizers import make_inner_optimizer


def make_outer_optimizer(outer: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with global-norm clipping and a linear warm-up to a constant learning rate."""
  schedule = optax.linear_schedule(0.0, outer.learning_rate, max(outer.warmup_steps, 1))
  return optax.chain(optax.clip_by_global_norm(outer.clip_norm), optax.adam(schedule))


def build_problem(config: ml_collections.ConfigDict, info):
  """(MetaProblem, estimator) of the config, for data described by `info` (pipeline.DataInfo)."""
  problem = MetaProblem(
      task=tasks.make_task(config.task, info), rater=tasks.make_rater(config.rater, info),
      inner_optimizer=make_inner_optimizer(config.inner.optimizer, config.inner.learning_rate),
      outer_optimizer=make_outer_optimizer(config.outer),
      temperature=config.rater.temperature, reset_every=config.inner.reset_every,
      advance_steps=config.inner.advance_steps)
  return problem, make_estimator(config.outer, config.inner)
