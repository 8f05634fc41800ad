"""Per-example loss weights from scores: w = B * softmax(score / tau) over the batch (mean 1)."""
import jax
import jax.numpy as jnp


def softmax_weights(scores: jax.Array, temperature: float) -> jax.Array:
  """Weights over the last axis that average 1; a lower temperature makes them sharper."""
  batch_size = scores.shape[-1]
  return batch_size * jax.nn.softmax(scores / temperature, axis=-1)


def uniform_weights(batch: dict) -> jax.Array:
  """The `weight_fn` of plain training: every example weighs 1."""
  return jnp.ones(batch['label'].shape, jnp.float32)
