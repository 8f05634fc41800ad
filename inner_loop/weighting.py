"""Per-example loss weights from scores: w = B * softmax(score / tau) over the batch (mean 1)."""
import jax


def softmax_weights(scores: jax.Array, temperature: float) -> jax.Array:
  """Weights over the last axis that average 1; a lower temperature makes them sharper."""
  batch_size = scores.shape[-1]
  return batch_size * jax.nn.softmax(scores / temperature, axis=-1)
