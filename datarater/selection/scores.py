"""Scores in SAE factor space: representativeness, process-level diversity, usage penalty, schedule.

From the codes Z [N, M] (>= 0) of every training example:
- factor frequency f_j = share of examples in which factor j is active; the `high_freq_fraction`
  most frequent factors are the high-frequency set H, the rest are rare, each with a rarity
  rho_j in [0, 1] (0 = least rare);
- representativeness R_i = sum_{j in H} a_ij f_j / max f, with a_i = z_i / |z_i|_1: how much of the
  example is made of common factors (coverage of the high-frequency factors);
- diversity D_i(t) = sum_{j rare} a_ij gate_j(t) novelty_j: rare factors are let in gradually, the
  less rare first (gate_j(t) ramps linearly from 0 to 1 over t in [rho_j (1 - w), rho_j (1 - w) + w],
  w = gate_width, t = training progress in [0, 1], so every factor is fully in by the end),
  and factors already trained on a lot count less (novelty_j = 1 / (1 + usage_j / mean usage));
- usage penalty U_i = (epochs in which i was selected) / (epochs so far), updated after each epoch;
- curriculum: score_i = alpha(t) rank(R)_i + beta(t) rank(D)_i - lambda U_i, with alpha, beta moving
  linearly from their start to end values over training (representativeness first, diversity later).
"""
import flax
import jax
import jax.numpy as jnp

from datarater.errors import UserError
from datarater.selection.base import percentile_rank


@flax.struct.dataclass
class FactorStats:
  mass: jax.Array        # [N, M] a_ij: each example's share of its code on each factor
  frequency: jax.Array   # [M] f_j
  high: jax.Array        # [M] bool: in the high-frequency set
  rarity: jax.Array      # [M] rho_j in [0, 1] for rare factors, 0 for high-frequency ones


def factor_stats(codes: jax.Array, high_freq_fraction: float) -> FactorStats:
  """Frequencies, high-frequency set and rarity of each factor, from the codes of the dataset."""
  if not 0.0 < high_freq_fraction < 1.0:
    raise UserError(f'sae_scores.high_freq_fraction must be in (0, 1), got {high_freq_fraction}')
  codes = jnp.asarray(codes, jnp.float32)
  mass = codes / jnp.maximum(jnp.sum(codes, -1, keepdims=True), 1e-12)
  freq = jnp.mean(codes > 0, 0)
  m = freq.shape[0]
  order = jnp.argsort(-freq)                      # most frequent first
  rank = jnp.zeros(m, jnp.int32).at[order].set(jnp.arange(m))
  num_high = max(1, int(round(high_freq_fraction * m)))
  high = rank < num_high
  rarity = jnp.where(high, 0.0, (rank - num_high) / max(m - num_high - 1, 1))
  return FactorStats(mass=mass, frequency=freq, high=high, rarity=rarity.astype(jnp.float32))


def representativeness(stats: FactorStats) -> jax.Array:
  """R_i: the example's code mass on high-frequency factors, weighted by their frequency."""
  weight = jnp.where(stats.high, stats.frequency / jnp.maximum(jnp.max(stats.frequency), 1e-12), 0.)
  return stats.mass @ weight


def diversity(stats: FactorStats, factor_usage: jax.Array, progress: jax.Array,
              gate_width: float) -> jax.Array:
  """D_i(t): mass on rare factors unlocked by progress t, discounted by how much each was used."""
  opens = stats.rarity * (1.0 - gate_width)  # factor j's gate ramps 0 -> 1 over [opens_j, +width]
  gate = jnp.clip((progress - opens) / gate_width, 0.0, 1.0)
  novelty = 1.0 / (1.0 + factor_usage / jnp.maximum(jnp.mean(factor_usage), 1e-12))
  return stats.mass @ jnp.where(stats.high, 0.0, gate * novelty)


def usage_penalty(counts: jax.Array, epoch: jax.Array) -> jax.Array:
  """U_i in [0, 1]: the share of past epochs in which example i was selected (0 before any)."""
  return counts.astype(jnp.float32) / jnp.maximum(epoch, 1).astype(jnp.float32)


def curriculum(progress: jax.Array, start: float, end: float) -> jax.Array:
  """A weight moving linearly from `start` (t = 0) to `end` (t = 1)."""
  t = jnp.clip(progress, 0.0, 1.0)
  return (1.0 - t) * start + t * end


def combined_score(stats: FactorStats, counts, factor_usage, epoch, num_epochs: int, cfg):
  """The selection score of every example at `epoch` (higher = more wanted)."""
  progress = epoch.astype(jnp.float32) / max(num_epochs - 1, 1)
  alpha = curriculum(progress, cfg.rep_weight_start, cfg.rep_weight_end)
  beta = curriculum(progress, cfg.div_weight_start, cfg.div_weight_end)
  rep = percentile_rank(representativeness(stats))
  div = percentile_rank(diversity(stats, factor_usage, progress, cfg.gate_width))
  return alpha * rep + beta * div - cfg.usage_penalty * usage_penalty(counts, epoch)
