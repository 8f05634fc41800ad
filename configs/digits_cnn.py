"""configs/digits.py with a small CNN as the task model, the rater and the feature extractor.

3x3 convolutions (as patches times Dense kernels) with group norm (datarater/tasks/cnn.py);
everything else (data, inner and outer loops, policies, valuations) is the default experiment's.
"""
import ml_collections

from configs import digits


def cnn(**fields) -> ml_collections.ConfigDict:
  c = {'name': 'cnn_classifier', 'channels': (16, 32), 'strides': (1, 2), 'pool': 'flatten',
       'hidden': 0, 'groups': 4, 'activation': 'relu', 'input': '', 'label': '', 'dtype': '',
       'param_dtype': ''}
  c.update(fields)
  return ml_collections.ConfigDict(c)


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config()
  c.task = cnn()
  c.rater = cnn(name='cnn_rater', channels=(8, 16), temperature=1.0, readout='logit')
  c.features.task = cnn(channels=(8, 16))
  return c
