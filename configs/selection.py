"""Dynamic data selection on scikit-learn's digits: a task model trained on a fraction per epoch.

`launch.train --policy={full,random,infobatch,sae} --config=configs/selection.py`;
`--config.policy.ratio=0.7` sets the fraction of the training split trained on each epoch. Clean
labels by default (`--config.data.label_noise=0.2` for the noisy setting).
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.data.label_noise = 0.0
  c.policy.name = 'sae'
  c.train.epochs = 30
  c.train.batch_size = 64
  c.train.seeds = (0,)
  return c
