"""Training a task model from scratch on a (possibly filtered) dataset under a weighting policy.

`python -m launch.train --config=configs/train.py --weighting=datarater --rater=RATER_DIR`.
The data and task-model fields are those of configs/digits.py (20% label noise on train);
`valuation` (configs/valuate.py) configures the mimic and tracin_curriculum policies.
"""
import ml_collections

from configs import valuate


def get_config() -> ml_collections.ConfigDict:
  c = valuate.get_config()
  t = c.train = ml_collections.ConfigDict()
  t.epochs = 30
  t.checkpoint_every = 10      # epochs between checkpoints (with --workdir; a rerun resumes)
  t.batch_size = 128
  t.optimizer = 'adam'
  t.learning_rate = 1e-3
  t.seeds = (0, 1, 2)          # one fresh model per seed (initialisation and data order), vmapped
  t.filter_rho = 0.2           # datarater_batch_filter: drop this fraction of every drawn batch
  t.temperature = 1.0          # tau of softmax weights from scores (mimic, scores, tracin_curriculum)
  return c
