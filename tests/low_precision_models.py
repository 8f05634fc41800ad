"""The digits MLP and CNN task and rater in low precision, registered as `lp_mlp_classifier`,
`lp_mlp_rater`, `lp_cnn_classifier`, `lp_cnn_rater`: the shipped models with two more fields,
`dtype` (what the layers compute in) and `param_dtype` (what the parameters are stored in),
flax's mixed precision. An own model as the README's own-model section writes one: a config
that imports this module runs it through every launcher."""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from datarater import config_checks as checks
from datarater.tasks import cnn
from datarater.tasks.classifier import (MLP_SCHEMA, Classifier, LabelledRater, _io_keys,
                                        activation, readout, RATER_FIELDS)
from datarater.tasks.registry import register_rater, register_task

DTYPES = ('float32', 'bfloat16', 'float16')
FIELDS = {'dtype': checks.one_of(*DTYPES), 'param_dtype': checks.one_of(*DTYPES)}


class Mlp(nn.Module):
  """`classifier.MLP` computing in `dtype`, its parameters in `param_dtype`."""
  features: Sequence[int]
  activation: str = 'relu'
  dtype: Any = jnp.float16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embed=False):
    x = x.reshape(x.shape[0], -1)
    act = activation(self.activation)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    for i, width in enumerate(self.features[:-1]):
      x = act(dense(width, f'dense_{i}')(x))
    if embed:
      return x
    return dense(self.features[-1], f'dense_{len(self.features) - 1}')(x)


class Cnn(nn.Module):
  """`cnn.CNN` (3x3 convolutions as patches @ Dense, group norm, head) computing in `dtype`,
  its parameters in `param_dtype`."""
  channels: Sequence[int]
  strides: Sequence[int]
  outputs: int
  pool: str = 'flatten'
  hidden: int = 0
  groups: int = 4
  activation: str = 'relu'
  dtype: Any = jnp.float16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embed=False):
    if x.ndim == 3:
      x = x[..., None]
    act = activation(self.activation)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    for i, (width, stride) in enumerate(zip(self.channels, self.strides)):
      x = dense(width, f'conv_{i}')(cnn.patches_3x3(x, stride))
      x = nn.GroupNorm(num_groups=math.gcd(self.groups, width), use_scale=False, use_bias=False,
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)
      x = act(x)
    x = x.reshape(x.shape[0], -1) if self.pool == 'flatten' else jnp.mean(x, axis=(1, 2))
    if self.hidden:
      x = act(dense(self.hidden, 'dense')(x))
    if embed:
      return x
    return dense(self.outputs, 'head')(x)


def _dtypes(config):
  return {'dtype': jnp.dtype(config.dtype), 'param_dtype': jnp.dtype(config.param_dtype)}


def _mlp(config, info):
  x_key, y_key, num_classes = _io_keys(config, info)
  return Mlp((*config.hidden, num_classes), config.activation, **_dtypes(config)), x_key, y_key


def _cnn(config, info):
  x_key, y_key, num_classes = _io_keys(config, info)
  c = cnn._cnn(config, num_classes, info, x_key)  # its checks
  return Cnn(c.channels, c.strides, c.outputs, c.pool, c.hidden, c.groups, c.activation,
             **_dtypes(config)), x_key, y_key


@register_task('lp_mlp_classifier', {**MLP_SCHEMA, **FIELDS})
def lp_mlp_classifier(config, info):
  module, x_key, y_key = _mlp(config, info)
  return Classifier(module, info.spec, x_key, y_key, module.features[-1])


@register_rater('lp_mlp_rater', {**MLP_SCHEMA, **RATER_FIELDS, **FIELDS})
def lp_mlp_rater(config, info):
  module, x_key, y_key = _mlp(config, info)
  return LabelledRater(module, info.spec, x_key, y_key, readout(config), module.features[-1])


@register_task('lp_cnn_classifier', {**cnn.CNN_SCHEMA, **FIELDS})
def lp_cnn_classifier(config, info):
  module, x_key, y_key = _cnn(config, info)
  return Classifier(module, info.spec, x_key, y_key, module.outputs)


@register_rater('lp_cnn_rater', {**cnn.CNN_SCHEMA, **RATER_FIELDS, **FIELDS})
def lp_cnn_rater(config, info):
  module, x_key, y_key = _cnn(config, info)
  return LabelledRater(module, info.spec, x_key, y_key, readout(config), module.outputs)
