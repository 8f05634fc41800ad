"""A decoder-only transformer language model over byte tokens, and a sequence rater on its trunk.

Registered as the task `transformer_lm` and the rater `sequence_rater`. Every parameter sits in
an `nn.Dense` layer, each called once per forward pass, so the per-example gradient layer's ghost
dot products and factored projections cover the whole model: the token embedding is
one-hot(tokens, vocab) @ Dense(d_model, no bias); positions are a fixed sinusoidal encoding;
layer norms have no learned scale or offset; attention is written out with Dense query, key,
value and output projections (not flax's attention modules, whose DenseGeneral layers pergrad
does not see). Blocks are pre-norm: x + attention(norm(x)), then x + MLP(norm(x)); a final norm.

The task predicts tokens[1:] from tokens[:-1] (causal attention): `per_token_loss` is the
negative log-likelihood of each next token [B, L-1] (nats); `per_example_loss` its mean over the
sequence, or with `token_weights` (a feature [L] named in the config; weight t weighs the
prediction of token t, weight 0 is unused) the weighted mean sum_t w_t nll_t / sum_t w_t.
The rater runs the trunk over the whole sequence (bidirectional attention unless `causal`), mean
pools the final states and maps them to one score per sequence.

Config fields: vocab (tokens are ints below it), d_model, num_heads (dividing d_model),
num_layers, d_mlp (the MLP's hidden width), max_len (the longest sequence accepted, checked
against the data), activation, optional input (the token feature, default 'tokens'), dtype and
param_dtype (classifier.DTYPE_FIELDS: what the Dense layers compute in and store parameters in).
Below float32, what rounding would spoil stays float32 (as in flax's WMT example): the positional
encoding, so the residual stream (x + ...) is float32; layer norms' statistics (flax's); the
attention logits, their mask (jnp.finfo(logits.dtype).min) and softmax; the log-softmax over the
vocabulary and the loss's mean. The rater's score is its head's output, in `dtype`.
"""
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import config_checks as checks
from datarater.errors import UserError
from datarater.tasks.base import (FeatureSpec, Rater, Task, at_least_float32, example_batch,
                                  init_module)
from datarater.tasks.classifier import ACTIVATIONS, DTYPE_FIELDS, activation, dtypes
from datarater.tasks.registry import building_section, register_rater, register_task


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """[length, dim]: sin(p / 10000^(2i/dim)) in even columns 2i, cos of the same in odd ones."""
  pos = np.arange(length)[:, None]
  rate = 1.0 / 10000.0 ** (2 * (np.arange(dim) // 2) / dim)
  angles = pos * rate[None, :]
  return np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))


def layer_norm(dtype=None) -> nn.LayerNorm:
  """No learned scale or offset; statistics in float32 or wider (flax's), the output in `dtype`
  (None: the input's)."""
  return nn.LayerNorm(use_scale=False, use_bias=False, dtype=dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention from Dense projections `query`, `key`, `value` and `out`; the
  products computed in `dtype`, the logits scaled, masked and softmaxed in float32 or wider."""
  num_heads: int
  causal: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, d = x.shape
    head = d // self.num_heads
    split = lambda y: y.reshape(b, length, self.num_heads, head)
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = split(dense('query')(x))
    k = split(dense('key')(x))
    v = split(dense('value')(x))
    logits = at_least_float32(jnp.einsum('bqhd,bkhd->bhqk', q, k)) / math.sqrt(head)
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attended = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    return dense('out')(attended.reshape(b, length, d))


class Block(nn.Module):
  """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""
  num_heads: int
  d_mlp: int
  activation: str = 'gelu'
  causal: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    precision = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    x = x + SelfAttention(self.num_heads, self.causal, **precision, name='attention')(
        layer_norm(self.dtype)(x))
    h = nn.Dense(self.d_mlp, **precision, name='mlp_in')(layer_norm(self.dtype)(x))
    return x + nn.Dense(x.shape[-1], **precision, name='mlp_out')(activation(self.activation)(h))


class Transformer(nn.Module):
  """Tokens int [B, L] -> final states [B, L, d_model] (`states`), or `outputs` per position
  (per sequence from the states' mean over positions with `pool`). `dtype`: what the layers
  compute in (None: their inputs' and parameters'), `param_dtype`: what the parameters are stored
  in (flax's mixed precision; the module docstring says what stays float32)."""
  vocab: int
  d_model: int
  num_heads: int
  num_layers: int
  d_mlp: int
  outputs: int
  activation: str = 'gelu'
  causal: bool = True
  pool: bool = False
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, states: bool = False) -> jax.Array:
    precision = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    onehot = jax.nn.one_hot(tokens, self.vocab, dtype=jnp.float32)
    x = nn.Dense(self.d_model, use_bias=False, **precision, name='embed')(onehot)
    # The encoding in float32 or wider, not rounded to a lower `dtype`: x (the residual stream)
    # is float32 from here, what each block adds computed in `dtype`.
    x = x + jnp.asarray(sinusoidal_positions(tokens.shape[1], self.d_model),
                        jnp.promote_types(x.dtype, jnp.float32))
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.d_mlp, self.activation, self.causal, **precision,
                name=f'block_{i}')(x)
    x = layer_norm(self.dtype)(x)
    if states:
      return x
    return nn.Dense(self.outputs, **precision, name='head')(jnp.mean(x, axis=1) if self.pool
                                                              else x)


def _tokens_key(config, info) -> tuple[str, int]:
  """(token feature name, sequence length), checked against the dataset and `max_len` (of the
  config section being built, named in the errors: 'task', 'rater' or 'features.task')."""
  where = building_section()
  key = config.get('input', '') or 'tokens'
  spec = info.spec.get(key)
  if spec is None or len(spec.shape) != 1 or not np.issubdtype(spec.dtype, np.integer):
    decoded = {k: (tuple(s.shape), np.dtype(s.dtype).name) for k, s in sorted(info.spec.items())}
    raise UserError(f'a sequence model reads an integer token feature of shape [L]: got input '
                    f'{key!r}; dataset {info.name!r} has features (decoded) {decoded} (uint8 '
                    'decodes to float pixels: store tokens as int32)')
  length = spec.shape[0]
  if length > config.max_len:
    raise UserError(f'the sequences of {key!r} have {length} tokens, more than {where}.max_len '
                    f'{config.max_len}')
  if config.d_model % config.num_heads:
    raise UserError(f'{where}.d_model {config.d_model} must be a multiple of {where}.num_heads '
                    f'{config.num_heads}')
  return key, length


def _transformer(config, outputs: int, causal: bool, pool: bool) -> Transformer:
  return Transformer(int(config.vocab), int(config.d_model), int(config.num_heads),
                     int(config.num_layers), int(config.d_mlp), outputs, config.activation, causal,
                     pool, **dtypes(config))


def _check_tokens(tokens, vocab: int, key: str, section: str) -> None:
  """Tokens outside [0, vocab) would index past the embedding (a NaN loss): one line instead."""
  tokens = np.asarray(tokens)
  if tokens.size and tokens.min() < 0:
    raise UserError(f'the {key!r} feature holds tokens in [{tokens.min()}, {tokens.max()}]: '
                    'tokens must be >= 0 (padding too)')
  if tokens.size and tokens.max() >= vocab:
    raise UserError(f'the {key!r} feature holds tokens in [{tokens.min()}, {tokens.max()}], '
                    f'outside the vocabulary of {section}.vocab={vocab} (set it to at least '
                    f'{tokens.max() + 1})')


@dataclasses.dataclass(frozen=True)
class LanguageModel(Task):
  """Next-token prediction over the batch's `input_key` tokens; `weight_key`: optional per-token
  weights [L] (see the module docstring)."""
  module: Transformer
  spec: FeatureSpec
  input_key: str
  weight_key: str = ''
  section: str = 'task'  # the config section it was built from, named in check_data's errors

  def init(self, key):
    return init_module(self.module, key, example_batch(self.spec)[self.input_key])

  def check_data(self, features):
    _check_tokens(features[self.input_key], self.module.vocab, self.input_key, self.section)
    if self.weight_key:  # a weighted mean needs weights >= 0 (a negative one flips the loss)
      w = np.asarray(features[self.weight_key])
      bad = w[~(w >= 0) | ~np.isfinite(w)]  # NaN fails both
      if bad.size:
        raise UserError(f'the {self.weight_key!r} feature (task.token_weights) holds {bad.size} '
                        f'weights that are negative or not finite (e.g. {bad[0]}): token weights '
                        'must be finite and >= 0')

  def per_token_loss(self, params, batch):
    """-log p(tokens[:, t+1] | tokens[:, :t+1]) for t < L-1, [B, L-1] (nats), its log-softmax
    over the vocabulary in float32 or wider."""
    tokens = batch[self.input_key]
    logits = at_least_float32(self.module.apply(params, tokens[:, :-1]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

  def token_weights(self, batch):
    """Weights of the L-1 predictions [B, L-1], or None (all equal)."""
    if not self.weight_key:
      return None
    return batch[self.weight_key][:, 1:]

  def per_example_loss(self, params, batch):
    nll = self.per_token_loss(params, batch)
    w = self.token_weights(batch)
    if w is None:
      return jnp.mean(nll, axis=-1)
    w = w.astype(nll.dtype)
    return jnp.sum(w * nll, -1) / jnp.maximum(jnp.sum(w, -1), jnp.finfo(nll.dtype).tiny)

  def metrics(self, params, batch):
    """The loss (nats per token) and the same in bits: `bits_per_byte` over byte tokens (vocab
    256, as the text builder writes), `bits_per_token` over any other vocabulary."""
    loss = self.per_example_loss(params, batch)
    bits = 'bits_per_byte' if self.module.vocab == 256 else 'bits_per_token'
    return {'loss': loss, bits: loss / math.log(2.0)}

  def embed(self, params, batch):
    """The final states mean-pooled over the sequence, [B, d_model]."""
    return jnp.mean(self.module.apply(params, batch[self.input_key], states=True), axis=1)


@dataclasses.dataclass(frozen=True)
class SequenceRater(Rater):
  """One score per sequence: the trunk's final states, mean-pooled, through a Dense layer."""
  module: Transformer
  spec: FeatureSpec
  input_key: str

  def init(self, key):
    return init_module(self.module, key, example_batch(self.spec)[self.input_key])

  def check_data(self, features):
    _check_tokens(features[self.input_key], self.module.vocab, self.input_key, 'rater')

  def score(self, params, batch):
    return self.module.apply(params, batch[self.input_key])[:, 0]


SEQUENCE_SCHEMA = {'vocab': checks.integer(2), 'd_model': checks.integer(1),
                   'num_heads': checks.integer(1), 'num_layers': checks.integer(0),
                   'd_mlp': checks.integer(1), 'max_len': checks.integer(2),
                   'activation': checks.one_of(*ACTIVATIONS),
                   'input': checks.optional(checks.string()),  # '' = 'tokens'
                   **DTYPE_FIELDS}


@register_task('transformer_lm', {**SEQUENCE_SCHEMA,
                                  'token_weights': checks.optional(checks.string())})
def transformer_lm(config, info) -> LanguageModel:
  """config: vocab, d_model, num_heads, num_layers, d_mlp, max_len, activation, optional input
  (token feature, default 'tokens'), token_weights (a float feature [L]; '' = none), dtype and
  param_dtype."""
  key, length = _tokens_key(config, info)
  if length < 2:
    raise UserError(f'a language model predicts each token from those before it: the sequences '
                    f'of {key!r} need at least 2 tokens, got {length}')
  weights = config.get('token_weights', '')
  if weights and (weights not in info.spec or info.spec[weights].shape != (length,)
                  or not np.issubdtype(info.spec[weights].dtype, np.floating)):
    decoded = {k: (tuple(s.shape), np.dtype(s.dtype).name) for k, s in sorted(info.spec.items())}
    raise UserError(f'token_weights {weights!r} must be a float feature of shape ({length},) of '
                    f'dataset {info.name!r} (features, decoded: {decoded})')
  module = _transformer(config, int(config.vocab), causal=True, pool=False)
  return LanguageModel(module, info.spec, key, weights, building_section())


@register_rater('sequence_rater', {**SEQUENCE_SCHEMA, 'causal': checks.optional(checks.boolean())})
def sequence_rater(config, info) -> SequenceRater:
  """config: as transformer_lm's, and optional causal (default False: bidirectional)."""
  key, _ = _tokens_key(config, info)
  module = _transformer(config, 1, causal=bool(config.get('causal', False)), pool=True)
  return SequenceRater(module, info.spec, key)
