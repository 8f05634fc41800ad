"""The trained DataRater behind the common valuation API: score = rater.apply(params, batch)."""
import jax

from datarater.valuation.base import Valuation


class RaterValuation(Valuation):
  """A meta-learned rater's scores (higher = weighted up in training); nothing to fit."""
  name = 'datarater'
  higher_is_better = True

  def __init__(self, rater, rater_params):
    super().__init__()
    self.rater, self.params = rater, rater_params

  @classmethod
  def from_workdir(cls, workdir: str) -> 'RaterValuation':
    from datarater import checkpointing  # pylint: disable=g-import-not-at-top
    rater, params, _, _ = checkpointing.load_trained_rater(workdir)
    return cls(rater, params)

  def fit(self, run=None) -> 'RaterValuation':
    return self

  def score(self, batch: dict) -> jax.Array:
    return self.rater.apply(self.params, {'image': batch['image'], 'label': batch['label']})
