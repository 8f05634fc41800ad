"""Sparse autoencoder (Flax) over feature vectors: top-k or L1 sparsity, trained offline.

x -> z = sparsify(W_enc (x - b_pre) + b_enc) -> x_hat = W_dec z + b_pre, with unit-norm decoder
rows (so the L1 penalty cannot be dodged by shrinking z and growing W_dec). `top_k` keeps the k
largest pre-activations of each example (exactly k, ties to the lower index; then ReLU: at most k
factors active); `l1` applies ReLU and adds `l1_coef * |z|_1` to the loss. Features are
standardised first (`Normaliser`), so one learning rate and L1 coefficient suit any extractor.
"""
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater.errors import UserError
from datarater.tasks.base import init_module

SPARSITIES = ('top_k', 'l1')


MAX_STEPS = 2 ** 31 - 1  # as every step count of a config


def offline_steps(steps: int, epochs: float, num_examples: int, batch_size: int,
                  field: str = 'epochs') -> int:
  """Steps of an offline stage: when `epochs` > 0, the fewest batches of `batch_size` examples
  that add up to `epochs` passes over `num_examples` (a trainer's short last batch of an epoch
  is not counted apart); else `steps`. More than MAX_STEPS is refused, naming `field`.

  Sizing by passes keeps the stage in step with the split (the same config serves 5,000 or
  50,000 examples).
  """
  if epochs > 0:
    batches = epochs * num_examples / min(batch_size, num_examples)
    if batches > MAX_STEPS:
      raise UserError(f'{field}={epochs:g} is {batches:.3g} steps of {batch_size} examples, more '
                      f'than {MAX_STEPS}')
    return max(1, math.ceil(batches - 1e-9))
  return int(steps)


def top_k_mask(pre: jax.Array, k: int) -> jax.Array:
  """bool [B, M]: each row's k largest entries, exactly k; of entries tied at the k-th largest
  value the lowest-indexed, as `lax.top_k` takes them (a `>= k-th value` mask keeps every tied
  entry: more than k). The k-th value comes from `jnp.partition`, faster than top_k on CPU."""
  kth = jax.lax.stop_gradient(-jnp.partition(-pre, k - 1, axis=-1)[:, k - 1:k])
  above, tied = pre > kth, pre == kth
  room = k - jnp.sum(above, -1, keepdims=True)  # places left for the tied entries
  return above | (tied & (jnp.cumsum(tied, -1) <= room))


class SAE(nn.Module):
  """Returns (reconstruction [B, D], codes [B, num_factors] >= 0)."""
  num_factors: int
  sparsity: str = 'top_k'
  k: int = 8

  @nn.compact
  def __call__(self, x: jax.Array):
    dim = x.shape[-1]
    b_pre = self.param('b_pre', nn.initializers.zeros, (dim,))
    w_dec = self.param('w_dec', nn.initializers.lecun_normal(), (self.num_factors, dim))
    w_dec = w_dec / (jnp.linalg.norm(w_dec, axis=-1, keepdims=True) + 1e-8)
    pre = nn.Dense(self.num_factors, name='encoder')(x - b_pre)
    if self.sparsity == 'top_k':
      codes = jnp.where(top_k_mask(pre, self.k), nn.relu(pre), 0.0)  # a mask: cheap backward
    else:
      codes = nn.relu(pre)
    return codes @ w_dec + b_pre, codes


@flax.struct.dataclass
class Normaliser:
  """Per-dimension centring and one global scale so that the mean squared norm is 1."""
  mean: jax.Array
  scale: jax.Array

  @classmethod
  def fit(cls, x: jax.Array) -> 'Normaliser':
    """Squares (x - mean) / 2^e, 2^e >= max |x - mean| (an exact division), so that features of
    any float32 size neither overflow (above ~1e18) nor underflow (below ~1e-19), and adds no
    epsilon to the scale (which skewed features below ~1e-6). Equal rows get scale 1."""
    mean = jnp.mean(x, 0)
    centred = x - mean
    power = jnp.ldexp(jnp.ones((), x.dtype), jnp.frexp(jnp.max(jnp.abs(centred)))[1])
    scale = power * jnp.sqrt(jnp.mean(jnp.sum((centred / power) ** 2, -1)))
    return cls(mean=mean, scale=jnp.where(scale > 0, scale, 1.0))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (x - self.mean) / self.scale


@flax.struct.dataclass
class TrainedSAE:
  params: dict
  normaliser: Normaliser
  module: SAE = flax.struct.field(pytree_node=False)

  def encode(self, x: jax.Array) -> jax.Array:
    return _apply(self.module, self.params, self.normaliser(x))[1]

  def reconstruct(self, x: jax.Array) -> jax.Array:
    """Reconstruction in the normalised space (compare with `self.normaliser(x)`)."""
    return _apply(self.module, self.params, self.normaliser(x))[0]


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: SAE, params, x: jax.Array):
  return module.apply(params, x)


def make_sae(config) -> SAE:
  """The SAE of a `sae` ConfigDict: num_factors, sparsity, k."""
  if config.sparsity not in SPARSITIES:
    raise UserError(f'unknown sae.sparsity {config.sparsity!r} '
                    f'(choose from {", ".join(SPARSITIES)})')
  if config.num_factors <= 0:
    raise UserError(f'sae.num_factors must be positive, got {config.num_factors}')
  if config.sparsity == 'top_k' and not 0 < config.k <= config.num_factors:
    raise UserError(f'sae.k must be in [1, num_factors={config.num_factors}], got {config.k}')
  return SAE(num_factors=config.num_factors, sparsity=config.sparsity, k=config.k)


def sae_loss(module: SAE, params, x: jax.Array, l1_coef: float):
  """Mean squared reconstruction error per example (+ L1 of the codes when sparsity='l1')."""
  x_hat, codes = module.apply(params, x)
  mse = jnp.mean(jnp.sum((x_hat - x) ** 2, -1))
  penalty = l1_coef * jnp.mean(jnp.sum(codes, -1)) if module.sparsity == 'l1' else 0.0
  return mse + penalty, mse


@functools.partial(jax.jit, static_argnames=('module', 'steps', 'batch_size', 'learning_rate',
                                             'l1_coef'))
def _fit(params, x, data_key, *, module, steps, batch_size, learning_rate, l1_coef):
  """`steps` Adam steps on random minibatches of x; (params, per-step MSE). One compilation per
  SAE shape and setting (x is an argument, not a constant folded into the program)."""
  optimizer = optax.adam(learning_rate)

  def step(carry, k):
    params, opt_state = carry
    batch = x[jax.random.randint(k, (batch_size,), 0, x.shape[0])]
    (_, mse), grads = jax.value_and_grad(sae_loss, argnums=1, has_aux=True)(
        module, params, batch, l1_coef)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), mse
  (params, _), mses = jax.lax.scan(step, (params, optimizer.init(params)),
                                   jax.random.split(data_key, steps))
  return params, mses


@jax.jit
def _feature_stats(features: jax.Array):
  """(non-finite values, the normaliser, the largest per-dimension spread, the largest
  magnitude) of `features`: one program (op by op, each op compiled alone)."""
  spread = jnp.max(jnp.max(features, 0) - jnp.min(features, 0))
  return (jnp.sum(~jnp.isfinite(features)), Normaliser.fit(features), spread,
          jnp.max(jnp.abs(features)))


@jax.jit
def _normalise(normaliser: Normaliser, features: jax.Array):
  """(the features normalised, their first two rows). A program of its own: fused with the
  normaliser's fit, XLA rounds the division differently, and the SAE trains on other values."""
  x = normaliser(features)
  return x, x[:2]


@jax.jit
def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  return tuple(jax.random.split(key))


@functools.partial(jax.jit, static_argnums=0)
def _fit_stats(module: SAE, params, x: jax.Array, mses: jax.Array) -> dict:
  """The trained SAE's codes of `x` summarised, in one program: examples coded as all zeros,
  and the metrics `train_sae` returns."""
  x_hat, codes = module.apply(params, x)
  return {'silent': jnp.sum(~jnp.any(codes > 0, -1)),
          'mse': jnp.mean(jnp.sum((x_hat - x) ** 2, -1)),
          'mse_mean_baseline': jnp.mean(jnp.sum(x ** 2, -1)),
          'active_mean': jnp.mean(jnp.sum(codes > 0, -1)),
          'dead_factors': jnp.sum(jnp.all(codes <= 0, 0)),
          'train_mse_first': mses[0], 'train_mse_last': mses[-1]}


def _check_codes(stats: dict, num_examples: int, config) -> None:
  """Refuses a trained SAE that codes most examples as all zeros (a diverged or over-penalised
  fit: every factor dead): the SAE policy would select by its noise alone. A fit that learned
  anything codes every example with some factor."""
  silent = int(stats['silent'])
  if 2 * silent > num_examples:
    l1 = f' or sae.l1_coef ({config.l1_coef:g})' if config.sparsity == 'l1' else ''
    raise UserError(f'the trained SAE codes {silent} of {num_examples} examples as all zeros '
                    f'(reconstruction MSE {float(stats["mse"]):.3g}; 1 is the mean\'s): it '
                    f'learned nothing to select by; lower sae.learning_rate '
                    f'({config.learning_rate:g}){l1}')


def train_sae(features, config, key: jax.Array) -> tuple[TrainedSAE, dict]:
  """Fits an SAE to `features` [N, D] with Adam over `config.steps` minibatches (one `lax.scan`),
  or over `config.epochs` passes when that is set (> 0).

  Returns the trained SAE and metrics: final normalised MSE, the MSE of the trivial mean
  reconstruction (1.0 by construction of the normaliser), the mean number of active factors,
  the factors never active, and the first and last training steps' minibatch MSE. A fit that
  codes most examples as all zeros (diverged, or its L1 penalty too strong) is refused.
  """
  features = jnp.asarray(features, jnp.float32)
  if features.ndim != 2 or features.shape[0] < 2:
    raise UserError(f'SAE features must be [N >= 2, D], got shape {tuple(features.shape)}')
  bad, normaliser, spread, size = _feature_stats(features)
  if int(bad):
    raise UserError(f'SAE features hold {int(bad)} non-finite values (NaN or inf) of '
                    f'{features.size}: did the feature extractor diverge?')
  module = make_sae(config)
  # Relative to their size, by the spread of each dimension: the normaliser's scale of equal
  # vectors is float32 rounding of the mean, which grows with D (1e-6 of the size at D = 784).
  if float(spread) <= 1e-6 * float(size):
    raise UserError(f'SAE features of all {features.shape[0]} examples are the same vector: '
                    'nothing to encode (a feature extractor whose units all died gives this; '
                    'try a lower features.learning_rate)')
  x, first = _normalise(normaliser, features)
  init_key, data_key = _split(key)
  params = init_module(module, init_key, first)
  batch_size = min(int(config.batch_size), x.shape[0])
  steps = offline_steps(config.steps, config.get('epochs', 0), x.shape[0], batch_size,
                        'sae.epochs')
  # Waited for: a caller timing the offline stage without compilation (bench.selection) would
  # otherwise take _fit_stats's compilation, overlapping this training, off its wall.
  params, mses = jax.block_until_ready(_fit(
      params, x, data_key, module=module, steps=steps, batch_size=batch_size,
      learning_rate=float(config.learning_rate), l1_coef=float(config.l1_coef)))
  stats = jax.device_get(_fit_stats(module, params, x, mses))
  _check_codes(stats, x.shape[0], config)
  metrics = {k: (int if k == 'dead_factors' else float)(stats[k])
             for k in ('mse', 'mse_mean_baseline', 'active_mean', 'dead_factors',
                       'train_mse_first', 'train_mse_last')}
  return TrainedSAE(params=params, normaliser=normaliser, module=module), metrics


def encode_all(trained: TrainedSAE, features: np.ndarray) -> np.ndarray:
  """Codes of every feature vector, float32 [N, num_factors]."""
  return np.asarray(jax.jit(trained.encode)(jnp.asarray(features, jnp.float32)))
