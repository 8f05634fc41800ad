"""A small convolutional classifier and rater, registered as `cnn_classifier` and `cnn_rater`.

Each layer is a 3x3 convolution written as image patches times a Dense kernel (`patches_3x3`,
then `nn.Dense`): the same function as `nn.Conv`, but every
parameter sits in a Dense layer whose inputs are the patches, so the per-example gradient layer's
ghost dot products and factored projections (Dense inputs x output gradients, summed over
positions) cover the convolutions too, and CPUs run the matmuls faster than conv kernels, also
through the second-order terms of meta-gradients. After each convolution: group norm (gcd(groups,
channels) groups) without learned scale or offset (per example: batch norm would mix the examples of
a batch and break per-example losses and gradients) and the activation. Then a flatten or a global
average pool (`pool`), an optional Dense layer (`hidden`, 0 = none), and the head. `embed` is the
head's input.
"""
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from datarater import config_checks as checks
from datarater.errors import UserError
from datarater.tasks.classifier import (ACTIVATIONS, DTYPE_FIELDS, IO_FIELDS, RATER_FIELDS,
                                        Classifier, LabelledRater, _io_keys, activation, dtypes,
                                        readout)
from datarater.tasks.registry import register_rater, register_task

POOLS = ('flatten', 'mean')


def patches_3x3(x: jax.Array, stride: int) -> jax.Array:
  """The 3x3 'SAME' patches of images [B, H, W, C]: [B, ceil(H / s), ceil(W / s), C * 9], ordered
  (channel, row, column) as `lax.conv_general_dilated_patches` orders them.

  Nine strided slices of the padded images, stacked: on CPU this runs the CNN's gradient several
  times faster than `conv_general_dilated_patches` (an identity-kernel convolution).
  """
  _, h, w, c = x.shape
  out_h, out_w = -(-h // stride), -(-w // stride)
  pad_h, pad_w = max((out_h - 1) * stride + 3 - h, 0), max((out_w - 1) * stride + 3 - w, 0)
  x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  taps = [x[:, i:i + span_h:stride, j:j + span_w:stride, :] for i in range(3) for j in range(3)]
  return jnp.stack(taps, axis=-1).reshape(x.shape[0], out_h, out_w, c * 9)


class PatchConv(nn.Module):
  """A 3x3 'SAME' convolution: [B, H, W, C] -> [B, H / s, W / s, features], as patches @ kernel."""
  features: int
  stride: int = 1
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='kernel')(patches_3x3(x, self.stride))


class CNN(nn.Module):
  """Images [B, H, W, C] (or [B, H, W]) -> `outputs` per example, computing in `dtype` (None:
  its inputs' and parameters'), its parameters stored in `param_dtype`."""
  channels: Sequence[int]
  strides: Sequence[int]
  outputs: int
  pool: str = 'flatten'
  hidden: int = 0
  groups: int = 4
  activation: str = 'relu'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embed: bool = False) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    act = activation(self.activation)
    for i, (width, stride) in enumerate(zip(self.channels, self.strides)):
      x = PatchConv(width, stride, self.dtype, self.param_dtype, name=f'conv_{i}')(x)
      x = nn.GroupNorm(num_groups=math.gcd(self.groups, width), use_scale=False,
                       use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(x)
      x = act(x)
    x = x.reshape(x.shape[0], -1) if self.pool == 'flatten' else jnp.mean(x, axis=(1, 2))
    if self.hidden:
      x = act(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='dense')(x))
    if embed:
      return x
    return nn.Dense(self.outputs, dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)


def _cnn(config, outputs: int, info, x_key: str) -> CNN:
  shape = tuple(info.spec[x_key].shape)
  if len(shape) not in (2, 3):
    raise UserError(f'a CNN reads images [H, W] or [H, W, C]: feature {x_key!r} of '
                    f'{info.name!r} has shape {shape}')
  channels, strides = tuple(config.channels), tuple(config.strides)
  if not channels or len(channels) != len(strides) or min(channels) < 1 or min(strides) < 1:
    raise UserError(f'a CNN needs as many positive strides as channels, got channels {channels} '
                    f'and strides {strides}')
  if config.pool not in POOLS:
    raise UserError(f'unknown CNN pool {config.pool!r} (choose from {", ".join(POOLS)})')
  return CNN(channels, strides, outputs, config.pool, int(config.hidden), int(config.groups),
             config.activation, **dtypes(config))


CNN_SCHEMA = {'channels': checks.integers(1), 'strides': checks.integers(1),
              'pool': checks.one_of(*POOLS), 'hidden': checks.integer(0),
              'groups': checks.integer(1), 'activation': checks.one_of(*ACTIVATIONS), **IO_FIELDS,
              **DTYPE_FIELDS}


@register_task('cnn_classifier', CNN_SCHEMA)
def cnn_classifier(config, info) -> Classifier:
  """config: channels, strides, pool, hidden, groups, activation, optional input / label."""
  x_key, y_key, num_classes = _io_keys(config, info)
  return Classifier(_cnn(config, num_classes, info, x_key), info.spec, x_key, y_key,
                    num_classes)


@register_rater('cnn_rater', {**CNN_SCHEMA, **RATER_FIELDS})
def cnn_rater(config, info) -> LabelledRater:
  """g_phi(x, y) from a CNN with one output per class (the label's output, or its log-softmax
  with readout=log_softmax, is the score)."""
  x_key, y_key, num_classes = _io_keys(config, info)
  return LabelledRater(_cnn(config, num_classes, info, x_key), info.spec, x_key, y_key,
                       readout(config), num_classes)
