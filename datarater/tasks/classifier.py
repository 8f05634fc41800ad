"""Classification tasks and label-aware raters over any Flax trunk.

`Classifier` wraps a module `f(x, embed=False)` (logits [B, C]; with `embed=True`, the
representation the logits are read from) as a `Task`: softmax cross-entropy per example, accuracy.
`LabelledRater` wraps a module from x to one score per class and reads the score of the example's
own label, g_phi(x, y), so it can judge whether a label fits its input; `TargetRater` does so for a
float label (a regression target): its module reads x with y's values appended.
Which features are the input and the label comes from the config (`input`, `label`), by default
the dataset's supervised keys. This file ships the MLP; other trunks register the same way.
"""
import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import config_checks as checks
from datarater.errors import UserError
from datarater.tasks.base import FeatureSpec, Rater, Task, example_batch, init_module
from datarater.tasks.registry import building_section, register_rater, register_task

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu, 'gelu': nn.gelu, 'tanh': jnp.tanh, 'silu': nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise UserError(f'unknown activation {name!r} (choose from {", ".join(ACTIVATIONS)})')
  return ACTIVATIONS[name]


class MLP(nn.Module):
  """Flattens each example, then Dense layers `dense_0..dense_L`; the last has `features[-1]`
  outputs. `embed=True` returns the last hidden activation instead (the input if no hidden).
  `dtype`: what the layers compute in (None: their inputs' and parameters'), `param_dtype`: what
  the parameters are stored in (flax's mixed precision)."""
  features: Sequence[int]
  activation: str = 'relu'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embed: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    act = activation(self.activation)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=name)
    for i, width in enumerate(self.features[:-1]):
      x = act(dense(width, f'dense_{i}')(x))
    if embed:
      return x
    return dense(self.features[-1], f'dense_{len(self.features) - 1}')(x)


def _io_keys(config, info, targets: bool = False) -> tuple[str, str, int]:
  """(input feature, label feature, number of classes) from the config or supervised keys.
  `targets`: the label may also be a float feature (a regression target), with 0 classes."""
  supervised = info.supervised_keys or (None, None)
  x_key = config.get('input', '') or supervised[0]
  y_key = config.get('label', '') or supervised[1]
  if x_key in info.spec and y_key in info.num_classes:
    return x_key, y_key, info.num_classes[y_key]
  if x_key in info.spec and targets and _is_target(info, y_key):
    return x_key, y_key, 0
  section = building_section()
  name = config.get('name', '')
  what = f'{section}.name={name!r}' if name else section
  needs = ('a class-label or float label feature' if targets else
           'a class-label feature (a label that is no class, such as a regression target, is '
           "read by rater.name='mlp_rater' and by a task of your own)")
  raise UserError(f'{what} needs an input feature and {needs}: got input {x_key!r}, label '
                  f'{y_key!r}; dataset {info.name!r} has features {sorted(info.spec)} (class '
                  f'labels: {sorted(info.num_classes)}){info.why_not(x_key)}')


def _is_target(info, key) -> bool:
  """Whether feature `key` of `info` is a label of floats (a regression target). Integers that
  are no class label are not read as one: they are more likely classes left undeclared."""
  return key in info.spec and jnp.issubdtype(info.spec[key].dtype, jnp.floating)


def _check_labels(features, key: str, num_classes: int) -> None:
  """Classes outside [0, num_classes) would read past the outputs (a NaN loss, or a score of
  another class): one line instead."""
  labels = np.asarray(features[key])
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(f'the {key!r} feature holds classes in [{labels.min()}, {labels.max()}], '
                    f'outside the {num_classes} classes [0, {num_classes})')


@dataclasses.dataclass(frozen=True)
class Classifier(Task):
  """Softmax classifier over `module`; the batch's `input_key` is x, `label_key` the class."""
  module: nn.Module
  spec: FeatureSpec
  input_key: str
  label_key: str
  num_classes: int

  def init(self, key):
    return init_module(self.module, key, example_batch(self.spec)[self.input_key])

  def logits(self, params, batch):
    return self.module.apply(params, batch[self.input_key])

  def per_example_loss(self, params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(self.logits(params, batch),
                                                           batch[self.label_key])

  def metrics(self, params, batch):
    logits = self.logits(params, batch)
    labels = batch[self.label_key]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),  # NaN logits
            'accuracy': jnp.where(jnp.isfinite(logits).all(-1), correct, jnp.nan)}  # pick class 0

  def embed(self, params, batch):
    return self.module.apply(params, batch[self.input_key], embed=True)

  def check_data(self, features):
    _check_labels(features, self.label_key, self.num_classes)

  def labels(self, batch):
    return batch[self.label_key]

  def with_labels(self, batch, labels):
    return {**batch, self.label_key: labels.astype(batch[self.label_key].dtype)}


@dataclasses.dataclass(frozen=True)
class LabelledRater(Rater):
  """g_phi(x, y): `module` maps x to one output per class; the score is the label's output.

  `readout` 'logit' reads the raw output; 'log_softmax' reads log softmax(outputs)[y], the
  label's log-likelihood under the rater read as a classifier, so raising one class's score lowers
  the others' and a score judges the label only relative to the other classes.
  """
  module: nn.Module
  spec: FeatureSpec
  input_key: str
  label_key: str
  readout: str = 'logit'
  num_classes: int = 0  # > 0: `check_data` refuses classes outside [0, num_classes)

  def init(self, key):
    return init_module(self.module, key, example_batch(self.spec)[self.input_key])

  def check_data(self, features):
    if self.num_classes:
      _check_labels(features, self.label_key, self.num_classes)

  def score(self, params, batch):
    per_class = self.module.apply(params, batch[self.input_key])
    if self.readout == 'log_softmax':
      per_class = jax.nn.log_softmax(per_class, axis=-1)
    label = batch[self.label_key][:, None].astype(jnp.int32)
    return jnp.take_along_axis(per_class, label, axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class TargetRater(Rater):
  """g_phi(x, y) for a float label y (a regression target): `module` (one output)
  reads each example's input flattened with its label's values appended, as they are (so a
  target is best standardised, as the inputs are)."""
  module: nn.Module
  spec: FeatureSpec
  input_key: str
  label_key: str

  def joined(self, batch):
    """[B, D + L]: the input, flattened, then the label's L values, in a float dtype."""
    x, y = batch[self.input_key], batch[self.label_key]
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return jnp.concatenate([x.reshape(len(x), -1).astype(dtype),
                            y.reshape(len(y), -1).astype(dtype)], axis=1)

  def init(self, key):
    return init_module(self.module, key, self.joined(example_batch(self.spec)))

  def score(self, params, batch):
    return self.module.apply(params, self.joined(batch))[:, 0]


IO_FIELDS = {'input': checks.optional(checks.string()),  # feature names ('' = supervised keys)
             'label': checks.optional(checks.string())}
READOUTS = ('logit', 'log_softmax')
RATER_FIELDS = {'readout': checks.optional(checks.one_of(*READOUTS))}


def readout(config) -> str:
  """A labelled rater's `readout` field ('logit' when left out)."""
  name = config.get('readout', 'logit')
  if name not in READOUTS:
    raise UserError(f'unknown rater.readout {name!r} (choose from {", ".join(READOUTS)})')
  return name


DTYPES = ('float32', 'bfloat16', 'float16')
# A model's precision (optional fields): `dtype` what its layers compute in, `param_dtype` what its
# parameters are stored in. Left out or '' (as the shipped configs hold them, so the command line
# can set them), flax's default: computing in the inputs' and parameters' dtype, float32 params.
DTYPE_FIELDS = {'dtype': checks.optional(checks.one_of('', *DTYPES)),
                'param_dtype': checks.optional(checks.one_of('', *DTYPES))}


def dtypes(config) -> dict:
  """The module arguments `dtype` and `param_dtype` of a section's optional DTYPE_FIELDS."""
  dtype = config.get('dtype', '')
  return {'dtype': jnp.dtype(dtype) if dtype else None,
          'param_dtype': jnp.dtype(config.get('param_dtype', '') or 'float32')}


MLP_SCHEMA = {'hidden': checks.integers(1, nonempty=False),
              'activation': checks.one_of(*ACTIVATIONS), **IO_FIELDS, **DTYPE_FIELDS}


@register_task('mlp_classifier', MLP_SCHEMA)
def mlp_classifier(config, info) -> Classifier:
  """config: hidden (widths), activation, optional input / label feature names."""
  x_key, y_key, num_classes = _io_keys(config, info)
  module = MLP(features=(*config.hidden, num_classes), activation=config.activation,
               **dtypes(config))
  return Classifier(module, info.spec, x_key, y_key, num_classes)


@register_rater('mlp_rater', {**MLP_SCHEMA, **RATER_FIELDS})
def mlp_rater(config, info) -> Rater:
  """config: hidden, activation, optional input / label feature names and readout. A class
  label makes a `LabelledRater`; a float label (a regression target), a `TargetRater` (its one
  output read as it is: readout 'logit')."""
  x_key, y_key, num_classes = _io_keys(config, info, targets=True)
  if not num_classes:
    if readout(config) != 'logit':
      raise UserError(f'rater.readout={readout(config)!r} reads a softmax over classes: label '
                      f'{y_key!r} of dataset {info.name!r} is no class label (set '
                      "rater.readout='logit')")
    module = MLP(features=(*config.hidden, 1), activation=config.activation, **dtypes(config))
    return TargetRater(module, info.spec, x_key, y_key)
  module = MLP(features=(*config.hidden, num_classes), activation=config.activation,
               **dtypes(config))
  return LabelledRater(module, info.spec, x_key, y_key, readout(config), num_classes)
