"""From a config to the bi-level problem and its meta-gradient estimator."""
import jax
import ml_collections
import optax

from datarater import tasks
from datarater.data import corruption
from outer_loop.estimators import make_estimator
from outer_loop.meta_step import MetaProblem
from inner_loop.optimizers import check_meta_differentiable, in_float32, make_inner_optimizer

SCHEDULES = ('constant', 'cosine')  # the outer learning rate after its warm-up


def make_outer_optimizer(outer: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with global-norm clipping; its learning rate warms up linearly over `warmup_steps` (0:
  none, the first step at the full rate), then stays constant (`schedule='constant'`) or follows
  a cosine down to 0 at `outer.steps` (`schedule='cosine'`). Its state and clipping are float32
  at least (`in_float32`), whatever the rater's parameters."""
  warmup, lr = outer.warmup_steps, outer.learning_rate
  if outer.schedule == 'cosine':
    schedule = (optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(outer.steps, warmup + 1))
                if warmup else optax.cosine_decay_schedule(lr, max(outer.steps, 1)))
  else:
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  return in_float32(optax.chain(optax.clip_by_global_norm(outer.clip_norm), optax.adam(schedule)))


def build_problem(config: ml_collections.ConfigDict, info):
  """(MetaProblem, estimator) of the config, for data described by `info` (pipeline.DataInfo)."""
  task, rater = tasks.make_task(config.task, info), tasks.make_rater(config.rater, info)
  corruption.from_config(config.data).check_targets(info, task, rater)
  inner_optimizer = make_inner_optimizer(config.inner.optimizer, config.inner.learning_rate)
  check_meta_differentiable(config.inner.optimizer, inner_optimizer)
  problem = MetaProblem(
      task=task, rater=rater, inner_optimizer=inner_optimizer,
      outer_optimizer=make_outer_optimizer(config.outer),
      temperature=config.rater.temperature, reset_every=config.inner.reset_every,
      advance_steps=config.inner.advance_steps, ema=config.outer.ema)
  return problem, make_estimator(config.outer, config.inner,
                                 jax.eval_shape(task.init, jax.random.key(0)))
