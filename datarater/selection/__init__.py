"""Dynamic data selection: per-epoch policies (full, random, InfoBatch-style, SAE feature space).

`make_policy(name, train, config)` builds any of them from a `configs/selection.py` config; the
SAE policy trains its feature extractor and sparse autoencoder offline here first.
"""
import jax

from datarater import features as features_lib
from datarater import sae as sae_lib
from datarater.data.pipeline import Split
from datarater.errors import UserError
from datarater.selection import policies, scores
from datarater.selection.base import SelectionPolicy, SelectionState, gini, init_state, record_epoch
from datarater.selection.harness import train_with_selection
from datarater.selection.policies import POLICIES


def sae_codes(train: Split, config, seed: int = 0):
  """Offline stage of the SAE policy: features of `train`, an SAE on them, and its codes.

  Returns (codes [N, M], info) where info has the SAE metrics and the extractor's example-gradients.
  """
  feats, cost = features_lib.default_features(train, config.features)
  trained, metrics = sae_lib.train_sae(feats, config.sae, jax.random.PRNGKey(seed))
  return sae_lib.encode_all(trained, feats), {'sae': metrics, 'extractor_example_grads': cost,
                                              'feature_dim': int(feats.shape[1])}


def make_policy(name: str, train: Split, config, seed: int = 0, codes=None):
  """The policy `name` at `config.selection_ratio`; returns (policy, offline info dict)."""
  if name not in POLICIES:
    raise UserError(f'unknown selection {name!r} (choose from {", ".join(POLICIES)})')
  ratio = config.selection_ratio
  if name == 'full':
    return policies.full(len(train)), {}
  if name == 'random':
    return policies.random(len(train), ratio), {}
  if name == 'infobatch':
    return policies.infobatch(len(train), ratio, config.infobatch.max_prune_prob), {}
  info = {}
  if codes is None:
    codes, info = sae_codes(train, config, seed)
  cond = config.sae_scores.get('class_conditional', False)
  return policies.sae(codes, ratio, config.train.epochs, config.sae_scores,
                      labels=train.label if cond else None,
                      num_classes=train.num_classes if cond else 0), info
