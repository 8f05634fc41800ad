"""Task models f_theta and the rater g_phi (Flax linen), and the per-example loss.

Batches are dicts of arrays with a leading batch axis: `image` (float32 in [0, 1], any shape per
example) and `label` (int32). Every valuation, inner loop and rater reads batches this way.
"""
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu, 'gelu': nn.gelu, 'tanh': jnp.tanh, 'silu': nn.silu,
}


class MLP(nn.Module):
  """Flattens each example and applies Dense layers; the last has `features[-1]` outputs."""
  features: Sequence[int]
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    act = ACTIVATIONS[self.activation]
    for i, width in enumerate(self.features):
      x = nn.Dense(width, name=f'dense_{i}')(x)
      if i < len(self.features) - 1:
        x = act(x)
    return x


def task_model(num_classes: int, hidden: Sequence[int], activation: str = 'relu') -> MLP:
  """The classifier f_theta: an MLP from the example to `num_classes` logits."""
  return MLP(features=(*hidden, num_classes), activation=activation)


class Rater(nn.Module):
  """g_phi(x, y): one score per example, read from the input and its label.

  An MLP trunk over x ends in one output per class; the score is the output of the example's
  own label. This lets the rater judge whether a label fits its input (label noise), which an
  input-only rater cannot see.
  """
  num_classes: int
  hidden: Sequence[int] = (128, 128)
  activation: str = 'relu'

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
    per_class = MLP(features=(*self.hidden, self.num_classes), activation=self.activation,
                    name='trunk')(batch['image'])
    return jnp.take_along_axis(per_class, batch['label'][:, None].astype(jnp.int32), axis=1)[:, 0]


def per_example_loss(apply_fn, params, batch: dict[str, jax.Array]) -> jax.Array:
  """Softmax cross-entropy of each example, shape [B]."""
  logits = apply_fn(params, batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])


def accuracy(apply_fn, params, batch: dict[str, jax.Array]) -> jax.Array:
  return jnp.mean(jnp.argmax(apply_fn(params, batch['image']), -1) == batch['label'])
