"""From a config (configs/valuate.py) to a fitted valuation: the run, the reference, the method.

Shared by launch/valuate.py and bench/valuation_noise.py so both value the same thing.
"""
from typing import Optional

import jax
import ml_collections

from datarater import models, pergrad
from datarater.data.pipeline import Split
from datarater.errors import UserError
from datarater.valuation.base import TrainingRun, Valuation, fixed_order_batches, record_run
from datarater.valuation.dvemb import DataValueEmbedding
from datarater.valuation.mimic import Mimic
from datarater.valuation.rater import RaterValuation
from datarater.valuation.tracin import TracIn

METHODS = ('tracin', 'mimic', 'dvemb', 'datarater')
PROJECTIONS = ('none', 'kronecker', 'gaussian')


def parse_layers(spec: str):
  """'' -> None (all parameters); 'last' stays 'last'; 'a,b' -> ['a', 'b']."""
  spec = spec.strip()
  if not spec:
    return None
  if spec == 'last':
    return 'last'
  return [s.strip() for s in spec.split(',') if s.strip()]


def make_projection(v: ml_collections.ConfigDict) -> Optional[pergrad.GradTransform]:
  if v.projection == 'none':
    return None
  if v.projection == 'kronecker':
    return pergrad.kronecker_projection(v.projection_dim, v.projection_dim, v.projection_seed)
  if v.projection == 'gaussian':
    return pergrad.gaussian_projection(v.projection_dim, v.projection_seed)
  raise UserError(f'unknown valuation.projection {v.projection!r} '
                  f'(choose from {", ".join(PROJECTIONS)})')


def task_problem(config: ml_collections.ConfigDict, train: Split):
  """(task model, per-example loss, initial params) of the config's task model."""
  task = models.task_model(train.num_classes, tuple(config.task_model.hidden),
                           config.task_model.activation)
  loss_fn = lambda p, b: models.per_example_loss(task.apply, p, b)
  params = task.init(jax.random.key(config.valuation.init_seed), train.image[:1])
  return task, loss_fn, params


def record(config, loss_fn, params, split: Split, steps: int, every: int,
           learning_rate: Optional[float] = None) -> TrainingRun:
  """Trains on `split` in the config's fixed order with plain `record_run` (jitted)."""
  v = config.valuation
  if steps < 1 or v.batch_size < 1:
    raise UserError(f'valuation steps and batch_size must be >= 1, got {steps}, {v.batch_size}')
  batches = fixed_order_batches(split, steps, v.batch_size, v.order_seed)
  lr = v.learning_rate if learning_rate is None else learning_rate
  if lr <= 0:
    raise UserError(f'valuation.learning_rate must be > 0, got {lr}')
  return jax.jit(lambda b: record_run(loss_fn, params, b, lr, every, v.optimizer))(batches)


def heldout_batch(heldout: Split) -> dict:
  return {'image': heldout.image, 'label': heldout.label}


def build(method: str, config: ml_collections.ConfigDict, train: Split, heldout: Split,
          workdir: str = '') -> Valuation:
  """The fitted valuation `method` for the config's training run on `train`."""
  if method not in METHODS:
    raise UserError(f'unknown method {method!r} (choose from {", ".join(METHODS)})')
  v = config.valuation
  if method == 'datarater':
    return RaterValuation.from_workdir(v.rater_workdir or workdir)
  _, loss_fn, params = task_problem(config, train)
  layers, chunk = parse_layers(v.layers), v.chunk_size
  if method == 'dvemb':
    run = record(config, loss_fn, params, train, v.dvemb_steps, 1)
    return DataValueEmbedding(loss_fn, len(train), heldout_batch(heldout), make_projection(v),
                              v.dvemb_curvature, train.num_classes, chunk_size=chunk).fit(run)
  run = record(config, loss_fn, params, train, v.train_steps, v.checkpoint_every)
  if method == 'tracin':
    return TracIn(loss_fn, v.tracin_mode, heldout_batch(heldout), layers,
                  make_projection(v) if v.tracin_project else None, chunk,
                  ghost=v.tracin_ghost and v.tracin_mode == 'self' and not v.tracin_project).fit(run)
  reference = record(config, loss_fn, params, heldout, v.reference_steps, v.reference_steps)
  return Mimic(loss_fn, reference.final_params, parse_layers(v.mimic_layers), v.mimic_cosine,
               chunk).fit(run)
