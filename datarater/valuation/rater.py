"""The trained DataRater behind the common valuation API: score = g_phi(batch)."""
import jax

from datarater.valuation.base import Valuation


class RaterValuation(Valuation):
  """A meta-learned rater's scores (higher = weighted up in training); nothing to fit."""
  name = 'datarater'
  higher_is_better = True

  def __init__(self, rater, rater_params):
    super().__init__()
    self.rater, self.params = rater, rater_params

  def fit(self, run=None) -> 'RaterValuation':
    return self

  def score(self, batch: dict) -> jax.Array:
    return self.rater.score(self.params, batch)
