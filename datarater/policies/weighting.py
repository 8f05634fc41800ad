"""Weighting policies: every example every epoch, each batch's losses weighted.

- `uniform`: weight 1 (plain training).
- `datarater`: B * softmax(g_phi(batch) / tau) from a trained rater (the paper's online use).
- `scores`: fixed per-example weights N * softmax(z / tau) of the standardised values of a
  scores file (e.g. from `launch.valuate`), looked up by the batch's positions.
- `tracin_curriculum`: the same from TracIn's values in `valuation.tracin_mode` (self-influence
  by default) of the training split, computed when the policy is made (`FromScores`).
- `mimic`: Grad-Mimic online, B * softmax(<-g_i, u> / tau) toward a reference model trained on
  the held-out split, from the current parameters at every step.
"""
import jax
import jax.numpy as jnp
import numpy as np

from datarater.config_checks import MIN_TEMPERATURE, default, number
from datarater.curation import select
from datarater.data import corruption
from datarater.errors import UserError
from datarater.policies.base import (VALUATION, FromScores, Policy, PolicyContext,
                                     register_policy, weighting_policy)
from inner_loop.weighting import check_batch_size, softmax_weights


def rater_weights(rater, rater_params, temperature: float, num_examples: int,
                  setup_example_gradients: int = 0) -> Policy:
  """Online DataRater weights B * softmax(g_phi(x) / tau) over the batch's real examples (B of
  them); phi is the policy's `aux`."""
  def weigh(aux, state, params, batch, weights):
    del state, params
    scores = rater.score(aux, batch)
    return jax.lax.stop_gradient(weights * softmax_weights(scores, temperature, weights))
  return weighting_policy('datarater', num_examples, weigh, rater_params,
                          setup_example_gradients=setup_example_gradients,
                          forwards_per_example=1.0, check_data=rater.check_data)


def table(name: str, weights: np.ndarray, setup_example_gradients: int = 0) -> Policy:
  """Fixed per-example weights [N], looked up by the batch's positions in the split."""
  def weigh(aux, state, params, batch, weights):
    del state, params
    return weights * aux[batch['index']]
  return weighting_policy(name, len(weights), weigh, jnp.asarray(weights, jnp.float32),
                          setup_example_gradients=int(setup_example_gradients))


def curriculum_weights(values: np.ndarray, mode: str = 'weight', fraction: float = 0.2,
                       temperature: float = 1.0) -> np.ndarray:
  """Per-example weights (mean 1) from values (higher = better), to weight losses or sampling.

  'weight': N * softmax(z / temperature) of the standardised values z, every example kept;
  'select': the top round(fraction * N) (`select.keep_count`, as `launch.filter --keep` keeps)
  weigh N / their number, the rest 0 (hard subset selection).
  """
  values = np.asarray(values, np.float64)
  if mode == 'weight':
    if temperature <= 0:
      raise UserError(f'policy.temperature must be > 0, got {temperature}')
    if not np.isfinite(values).all():
      raise UserError('curriculum values must be finite')
    values = select.to_unit(values)  # standardised alike at any scale (squares of 1e160 overflow)
    spread = values.std()
    z = (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
    return np.asarray(softmax_weights(jnp.asarray(z), temperature), np.float64)
  if mode == 'select':
    if not 0 < fraction <= 1:
      raise UserError(f'curriculum fraction must be in (0, 1], got {fraction}')
    keep = select.keep_count(len(values), fraction)
    w = np.zeros(len(values))
    w[np.argsort(-values, kind='stable')[:keep]] = len(values) / keep
    return w
  raise UserError(f'unknown curriculum mode {mode!r} (choose from weight, select)')


# The `valuation` fields the policies that value the split themselves read: the run every
# gradient method records (`factory.record`) and launch.valuate's outputs, which
# `refuse_valuate_outputs` refuses; then TracIn's own, and online Mimic's (which records no run
# but its reference's, and keeps every example).
_VALUED = ('batch_size', 'optimizer', 'learning_rate', 'seed', 'store', 'topk')
_TRACIN_FIELDS = tuple(f'valuation.{f}' for f in (
    *_VALUED, 'train_steps', 'checkpoint_every', 'chunk_size', 'layers', 'projection',
    'projection_dim', 'projection_seed', 'tracin_mode', 'tracin_project', 'tracin_ghost'))
_MIMIC_FIELDS = tuple(f'valuation.{f}' for f in (
    *_VALUED, 'mimic_layers', 'mimic_cosine', 'reference_steps'))
# tau of the softmax weights from values (scores, tracin_curriculum, mimic)
TEMPERATURE = {'temperature': default(number(MIN_TEMPERATURE), 1.0)}


def refuse_valuate_outputs(ctx: PolicyContext, name: str, method: str) -> None:
  """UserError if `valuation.store` or `valuation.topk` is set: they are launch.valuate's (a
  gradient store, a top-k table); a policy that values the split itself would ignore them."""
  v = ctx.config.valuation
  for field, value in (('store', v.get('store', False)), ('topk', v.get('topk', 0))):
    if value:
      raise UserError(f'policy {name} computes its values without valuation.{field} (got '
                      f'{value}): for stored scores run launch.valuate --method={method} with '
                      'it, then --policy=scores --scores=FILE')


def loaded_rater(ctx: PolicyContext, name: str):
  """The rater of the launcher's --rater (an exported rater or a rater run), checked against
  the training data."""
  if not ctx.rater:
    raise UserError(f'policy {name} needs --rater=RATER (launch.export_rater, or a '
                    'launch.train_rater workdir)')
  from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
  rater = load_rater(ctx.rater)
  rater.check_matches(ctx.train.info, 'the training data', corruption.from_config(ctx.config.data))
  return rater


@register_policy('uniform')
def _uniform(ctx: PolicyContext) -> Policy:
  return weighting_policy('uniform', len(ctx.train))


@register_policy('datarater', reads=('rater',))
def _datarater(ctx: PolicyContext) -> Policy:
  check_batch_size(ctx.config.train.batch_size, 'train.batch_size')  # before loading the rater
  rater = loaded_rater(ctx, 'datarater')
  return rater_weights(rater.rater, rater.params, rater.temperature, len(ctx.train),
                       rater.training_example_gradients)


@register_policy('scores', reads=('scores',), schema=TEMPERATURE)
def _scores(ctx: PolicyContext) -> Policy:
  if not ctx.scores:
    raise UserError('policy scores needs --scores=FILE (e.g. one written by launch.valuate)')
  from datarater.curation import scores_file  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  values = scores_file.read_values(ctx.scores, len(ctx.train), ctx.config.data.train_split,
                                   pipeline.dataset_name(ctx.config.data),
                                   planted=corruption.from_config(ctx.config.data).describe())
  return table('scores', curriculum_weights(values, temperature=ctx.config.policy.temperature),
               scores_file.cost(ctx.scores))  # what made the scores, if their file says


@register_policy('tracin_curriculum', sections=('valuation',), schema=TEMPERATURE,
                 fields=_TRACIN_FIELDS, valuation='tracin')
def _tracin_curriculum(ctx: PolicyContext) -> FromScores:
  method = VALUATION['tracin_curriculum']
  refuse_valuate_outputs(ctx, 'tracin_curriculum', method)
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  fitted = factory.build(method, ctx.config, ctx.task, ctx.train, ctx.heldout)
  return FromScores(fitted.value, lambda values: table(
      'tracin_curriculum', curriculum_weights(values, temperature=ctx.config.policy.temperature),
      fitted.example_gradients), f'{fitted.name} values')


@register_policy('mimic', sections=('valuation',), schema=TEMPERATURE, fields=_MIMIC_FIELDS)
def _mimic(ctx: PolicyContext) -> Policy:
  refuse_valuate_outputs(ctx, 'mimic', 'mimic')
  check_batch_size(ctx.config.train.batch_size, 'train.batch_size')  # before the reference
  from datarater.valuation import factory, mimic  # pylint: disable=g-import-not-at-top
  factory.check_per_example(ctx.config, ctx.task, ctx.heldout)  # as every valuation does
  factory.check_mimic_layers(ctx.config, ctx.task, ctx.train)  # before the reference is trained
  reference, cost = factory.mimic_reference(ctx.config, ctx.task, ctx.heldout)
  layers = factory.mimic_layers(ctx.config, ctx.task, reference, ctx.train)
  tau = ctx.config.policy.temperature
  loss_fn = ctx.task.per_example_loss
  cosine = bool(ctx.config.valuation.mimic_cosine)

  def weigh(aux, state, params, batch, weights):
    del state
    scores = mimic.mimic_scores(loss_fn, params, aux, batch, layers, cosine, None)
    return jax.lax.stop_gradient(weights * softmax_weights(scores, tau, weights))
  return weighting_policy('mimic', len(ctx.train), weigh, reference,
                          setup_example_gradients=cost, forwards_per_example=2.0)
