"""Planted corruption of a training split, recorded per example with its kind.

A `Corruption` decides, from its seed and the split's size N alone, which examples get which
kind (`record`: exactly round(rate * N) examples per kind, disjoint), and rewrites the raw
(undecoded) features of any block of examples given their ids (`apply`). So a split read whole
and one streamed in blocks are corrupted identically, and detection can be measured per kind.
"""
import dataclasses

import numpy as np

from datarater.errors import UserError

CLEAN = 'clean'


@dataclasses.dataclass(frozen=True)
class Corruption:
  """Symmetric label noise at `label_noise` on the dataset's label feature, drawn from `seed`:
  a corrupted label moves to another class, uniformly."""
  label_noise: float = 0.0
  seed: int = 0

  def __post_init__(self):
    if not 0.0 <= self.label_noise < 1.0:
      raise UserError(f'data.label_noise must be in [0, 1), got {self.label_noise}')

  @property
  def kinds(self) -> tuple:
    """Kind names; the record stores their index (0 = clean)."""
    return (CLEAN, 'label_symmetric') if self.label_noise else (CLEAN,)

  def _draw(self, n: int):
    """(flipped [n] bool, class shift [n] in 1..C-1 before the modulo) from one seeded stream."""
    rng = np.random.default_rng(self.seed)
    flipped = np.zeros(n, bool)
    flipped[rng.permutation(n)[:int(round(self.label_noise * n))]] = True
    return flipped, rng

  def record(self, n: int) -> np.ndarray:
    """int8 [n]: the kind index of every example of a split of n."""
    return self._draw(n)[0].astype(np.int8)

  def apply(self, info, raw: dict, ids: np.ndarray, n: int) -> tuple[dict, dict]:
    """(raw features of examples `ids` of a split of n, corrupted; original values changed)."""
    if not self.label_noise:
      return raw, {}
    label = label_feature(info)
    flipped, rng = self._draw(n)
    shift = rng.integers(1, info.num_classes[label], size=n)  # never 0: a flipped label changes
    ids = np.asarray(ids)
    labels = np.asarray(raw[label])
    noisy = np.where(flipped[ids], (labels + shift[ids]) % info.num_classes[label], labels)
    return {**raw, label: noisy.astype(labels.dtype)}, {label: labels}


def label_feature(info) -> str:
  """The class-label target of a dataset (its supervised keys' second name)."""
  keys = info.supervised_keys
  if not keys or keys[1] not in info.num_classes:
    raise UserError(f'label noise needs a class-label target: dataset {info.name!r} has no '
                    'supervised (input, label) keys with a class label')
  return keys[1]


def from_config(data) -> Corruption:
  """The corruption of a `data` config section (label_noise, noise_seed)."""
  return Corruption(label_noise=float(data.label_noise), seed=int(data.noise_seed))
