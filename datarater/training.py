"""Training task models from scratch under a weighting/selection policy, with per-epoch evaluation.

A `Policy` is what decides how much each example counts:
- per batch, `weight_fn(policy_state, params, batch) -> [B]` loss weights (a pure JAX function of
  explicit state: rater parameters, a reference model, a table of per-example weights), and
- per epoch, optionally `select_epoch(epoch, ids) -> ids`, which examples the epoch visits.
Policies are made by name from the `POLICIES` registry (`register_policy` adds one), so a
selection policy (e.g. SAE-based, issue 5) is one more registry entry.

`Trainer` trains M models at once (vmapped: one initialisation and data order per seed), one
`lax.scan` per epoch, and reports after every epoch the held-out loss and accuracy and the compute
spent: examples trained on (example-gradients), optimizer steps, and policy overheads (forward
passes for scoring, and the one-off cost of making the policy, e.g. training the rater).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import filtering, models
from datarater.checkpointing import RunCheckpointer, abstract_of
from datarater.data.pipeline import Split
from datarater.errors import UserError
from inner_loop.unroll import InnerState, init_inner_state, inner_step
from inner_loop.weighting import softmax_weights

WeightFn = Callable[[Any, Any, dict], jax.Array]  # (policy_state, task params, batch) -> [B]


def uniform_weight_fn(policy_state, params, batch):
  del policy_state, params
  return jnp.ones(batch['label'].shape, jnp.float32)


@dataclasses.dataclass
class Policy:
  """How training weighs (per batch) and selects (per epoch) examples; see the module docstring.

  `setup_example_gradients`: compute spent once to make the policy (rater training, valuation).
  `forwards_per_example`: extra forward passes per example drawn (e.g. 1 for rater scoring).
  `gradient_fraction`: the fraction of drawn examples that get a gradient (1 - rho for a
  batch-level filter, which draws M examples and trains on N of them).
  """
  name: str
  weight_fn: WeightFn = uniform_weight_fn
  state: Any = None
  select_epoch: Optional[Callable[[int, np.ndarray], np.ndarray]] = None
  setup_example_gradients: int = 0
  forwards_per_example: float = 0.0
  gradient_fraction: float = 1.0


# ------------------------------------------------------------------------------------- registry

POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str):
  """Decorator: `@register_policy('x') def make(ctx: PolicyContext) -> Policy`."""
  def deco(fn):
    POLICIES[name] = fn
    return fn
  return deco


@dataclasses.dataclass
class PolicyContext:
  """What a policy factory may read: the data, the task model, and the policy's own options."""
  train: Split
  heldout: Split
  task: Any
  loss_fn: Callable
  rater_dir: str = ''
  scores_path: str = ''
  temperature: float = 1.0
  valuation_config: Any = None
  seed: int = 0
  filter_rho: float = 0.2


def make_policy(name: str, ctx: PolicyContext) -> Policy:
  if name not in POLICIES:
    raise UserError(f'unknown weighting {name!r} (choose from {", ".join(sorted(POLICIES))})')
  return POLICIES[name](ctx)


def table_policy(name: str, weights: np.ndarray, setup: int = 0) -> Policy:
  """Fixed per-example weights [N] looked up by the batch's `index` (TFDS id)."""
  return Policy(name, lambda table, params, batch: table[batch['index']],
                jnp.asarray(weights, jnp.float32), setup_example_gradients=int(setup))


@register_policy('uniform')
def _uniform(ctx: PolicyContext) -> Policy:
  del ctx
  return Policy('uniform')


def rater_policy(rater, temperature: Optional[float] = None) -> Policy:
  """Online DataRater weights B * softmax(g_phi(x, y) / tau) from an exported (loaded) rater."""
  tau = rater.temperature if temperature is None else temperature
  module = rater.module

  def weight_fn(rater_params, params, batch):
    del params
    scores = module.apply(rater_params, {'image': batch['image'], 'label': batch['label']})
    return jax.lax.stop_gradient(softmax_weights(scores, tau))
  return Policy('datarater', weight_fn, rater.params,
                setup_example_gradients=rater.training_example_gradients, forwards_per_example=1.0)


def _rater_for(ctx: PolicyContext, weighting: str):
  """The exported rater of `--rater`, checked against the training data."""
  if not ctx.rater_dir:
    raise UserError(f'--weighting={weighting} needs --rater=RATER_DIR (launch.export_rater)')
  from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
  rater = load_rater(ctx.rater_dir)
  rater.check_matches(ctx.train.image.shape[1:], ctx.train.num_classes, 'the training data')
  return rater


@register_policy('datarater')
def _datarater(ctx: PolicyContext) -> Policy:
  return rater_policy(_rater_for(ctx, 'datarater'))


def batch_filter_policy(rater, rho: float) -> Policy:
  """Batch-level filtering inside the step: of each drawn batch of M, only the best-scored
  N = floor((1 - rho) * M) get a gradient (weight M / N, so the mean loss is over the N)."""
  if not 0 <= rho < 1:
    raise UserError(f'filter rate rho must be in [0, 1), got {rho}')
  module = rater.module

  def weight_fn(rater_params, params, batch):
    del params
    m = batch['label'].shape[0]
    n = max(1, int((1 - rho) * m))
    scores = module.apply(rater_params, {'image': batch['image'], 'label': batch['label']})
    keep = jnp.zeros(m).at[filtering.top_k_in_batch(scores, n)].set(m / n)
    return jax.lax.stop_gradient(keep)
  return Policy('datarater_batch_filter', weight_fn, rater.params,
                setup_example_gradients=rater.training_example_gradients,
                forwards_per_example=1.0, gradient_fraction=1.0 - rho)


@register_policy('datarater_batch_filter')
def _datarater_batch_filter(ctx: PolicyContext) -> Policy:
  return batch_filter_policy(_rater_for(ctx, 'datarater_batch_filter'), ctx.filter_rho)


@register_policy('scores')
def _scores(ctx: PolicyContext) -> Policy:
  """Static weights N * softmax(z / tau) of standardised values from a scores parquet."""
  if not ctx.scores_path:
    raise UserError('--weighting=scores needs --scores=FILE')
  from launch.filter import read_scores_file  # pylint: disable=g-import-not-at-top
  from datarater.valuation.tracin import curriculum_weights  # pylint: disable=g-import-not-at-top
  values = read_scores_file(ctx.scores_path, 'train', len(ctx.train))
  return table_policy('scores', curriculum_weights(values, 'weight', temperature=ctx.temperature))


def valuation_compute(method: str, vconfig, num_examples: int) -> int:
  """Example-gradients a gradient valuation spends (its recorded run + per-example gradients)."""
  v = vconfig.valuation
  if method == 'tracin':
    return v.train_steps * v.batch_size + num_examples * (v.train_steps // v.checkpoint_every)
  if method == 'mimic':
    return v.train_steps * v.batch_size + v.reference_steps * v.batch_size
  raise UserError(f'no compute model for {method!r}')


@register_policy('tracin_curriculum')
def _tracin_curriculum(ctx: PolicyContext) -> Policy:
  """Loss weights from negative TracIn self-influence (configs/valuate.py), computed here."""
  from datarater.valuation import base, factory  # pylint: disable=g-import-not-at-top
  from datarater.valuation.tracin import curriculum_weights  # pylint: disable=g-import-not-at-top
  vc = ctx.valuation_config
  valuation = factory.build('tracin', vc, ctx.train, ctx.heldout)
  values = base.score_split(valuation.value, ctx.train, progress=False)
  return table_policy('tracin_curriculum',
                      curriculum_weights(values, 'weight', temperature=ctx.temperature),
                      valuation_compute('tracin', vc, len(ctx.train)))


@register_policy('mimic')
def _mimic(ctx: PolicyContext) -> Policy:
  """Grad-Mimic online: weights B * softmax(<-g_i, u>/tau) toward a reference trained on held-out."""
  from datarater.valuation import factory  # pylint: disable=g-import-not-at-top
  from datarater.valuation.mimic import mimic_scores, resolve_layers  # pylint: disable=g-import-not-at-top
  vc = ctx.valuation_config
  _, loss_fn, params = factory.task_problem(vc, ctx.train)
  reference = factory.record(vc, loss_fn, params, ctx.heldout, vc.valuation.reference_steps,
                             vc.valuation.reference_steps).final_params
  layers = resolve_layers(ctx.loss_fn, reference, ctx.train.take(np.arange(2)),
                          factory.parse_layers(vc.valuation.mimic_layers))
  tau = ctx.temperature

  def weight_fn(ref, params, batch):
    scores = mimic_scores(ctx.loss_fn, params, ref, batch, layers, False, None)
    return jax.lax.stop_gradient(softmax_weights(scores, tau))
  v = vc.valuation
  return Policy('mimic', weight_fn, reference,
                setup_example_gradients=v.reference_steps * v.batch_size, forwards_per_example=2.0)


# ------------------------------------------------------------------------------------- training


class Trainer:
  """Trains task models under a policy's weight function; one compile per (data shape, policy fn).

  Pass the policy *state* to `fit`, so one Trainer serves e.g. every rater of an experiment.
  """

  def __init__(self, task, optimizer: optax.GradientTransformation, weight_fn: WeightFn):
    self.task, self.optimizer = task, optimizer

    def loss_fn(params, batch):
      return models.per_example_loss(task.apply, params, batch)

    def epoch(policy_state, states: InnerState, batches: dict, masks: jax.Array):
      def one_model(state, model_batches, model_masks):
        def step(state, xs):
          batch, mask = xs
          w = weight_fn(policy_state, state.params, batch) * mask
          return inner_step(loss_fn, optimizer, state, batch, w)
        return jax.lax.scan(step, state, (model_batches, model_masks))[0]
      return jax.vmap(one_model)(states, batches, masks)

    def evaluate(params, batch):
      def one(p):
        return jnp.mean(loss_fn(p, batch)), models.accuracy(task.apply, p, batch)
      return jax.vmap(one)(params)

    self._epoch = jax.jit(epoch)
    self._evaluate = jax.jit(evaluate)

  def fit(self, train: Split, evals: dict[str, Split], *, epochs: int, batch_size: int,
          seeds: list[int], policy: Policy, log: Optional[Callable[[dict], None]] = None,
          checkpoints: Optional[RunCheckpointer] = None, checkpoint_every: int = 1,
          stop_after: Optional[int] = None) -> dict:
    """Trains len(seeds) fresh models for `epochs` epochs; returns per-epoch history and totals.

    With `checkpoints`, the models and the history so far are saved every `checkpoint_every`
    epochs and at the end, and a run finds its latest checkpoint and goes on from there (the
    data order of an epoch depends only on (seed, epoch), so a resumed run equals an
    uninterrupted one). `stop_after`: checkpoint and return after this epoch, with
    `stopped_after` set in the result (a preemption drill).
    """
    if epochs < 1 or batch_size < 1 or not seeds:
      raise UserError(f'need epochs >= 1, batch_size >= 1 and a seed, got {epochs}, '
                      f'{batch_size}, {seeds}')
    if len(train) == 0:
      raise UserError('the training split is empty')
    image = jnp.asarray(train.image[:1])
    states = jax.vmap(lambda k: init_inner_state(self.task.init(k, image), self.optimizer))(
        jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    eval_batches = {k: {'image': s.image, 'label': s.label} for k, s in evals.items()}
    all_ids = np.arange(len(train))
    history, examples, steps, start = [], 0, 0, 0
    resume_epoch = checkpoints.latest_step() if checkpoints is not None else None
    if resume_epoch is not None:
      states, meta = checkpoints.restore(resume_epoch, abstract_of(states))
      history, start = meta['extra']['history'], int(meta['step'])
      examples, steps = (history[-1]['examples'], history[-1]['steps']) if history else (0, 0)
    last = epochs if stop_after is None else max(start, min(stop_after, epochs))
    for epoch in range(start, last):
      ids = all_ids if policy.select_epoch is None else np.asarray(policy.select_epoch(epoch, all_ids))
      n_steps = -(-len(ids) // batch_size)
      order = np.stack([np.random.default_rng([s, epoch]).permutation(ids) for s in seeds])
      pad = n_steps * batch_size - len(ids)
      mask = np.concatenate([np.ones(len(ids), np.float32), np.zeros(pad, np.float32)])
      order = np.concatenate([order, order[:, :pad]], axis=1).reshape(len(seeds), n_steps, batch_size)
      batch = train.take(order)  # index = TFDS ids; positions == ids for a loaded split
      batch['index'] = order
      masks = np.broadcast_to(mask.reshape(n_steps, batch_size), (len(seeds), n_steps, batch_size))
      states = self._epoch(policy.state, states, batch, jnp.asarray(masks))
      examples += len(ids)
      steps += n_steps
      record = {'epoch': epoch + 1, 'examples': examples, 'steps': steps}
      for name, b in eval_batches.items():
        loss, acc = (np.asarray(x) for x in self._evaluate(states.params, b))
        record.update({f'{name}_loss': float(loss.mean()), f'{name}_loss_std': float(loss.std()),
                       f'{name}_accuracy': float(acc.mean()),
                       f'{name}_accuracy_std': float(acc.std()),
                       f'{name}_accuracy_per_seed': acc.tolist()})
      history.append(record)
      if log:
        log(record)
      if checkpoints is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == last):
        checkpoints.save(epoch + 1, states, {'epoch': epoch + 1}, extra={'history': history})
    if checkpoints is not None:
      checkpoints.close()
    if last < epochs:
      return {'stopped_after': last, 'history': history}
    grads = int(round(policy.gradient_fraction * examples))
    return {'policy': policy.name, 'seeds': list(seeds), 'history': history,
            'final': history[-1], 'examples_drawn': examples, 'example_gradients': grads,
            'steps': steps, 'scoring_forwards': int(policy.forwards_per_example * examples),
            'setup_example_gradients': int(policy.setup_example_gradients),
            'total_example_gradients': int(grads + policy.setup_example_gradients)}
