"""A benchmark's own numpy draws are not the planted corruption's: over a range of seeds, every
generator that bench.noise_ceiling's folds make against every one the corruption of a split makes
(its record, its split-wide draws and each example's own stream, every kind planted), compared by
the generator's initial state (numpy seeds [s, 0] and s alike: equal states are one stream)."""
import types

import numpy as np
import pytest

from datarater.data import corruption

SEEDS = range(12)
N, FOLDS = 40, 5


@pytest.fixture
def streams(monkeypatch):
  """record(purpose, fn, *args): fn(*args), the initial states of the generators it made added to
  the set of `purpose` in the returned dict."""
  made, purpose = {}, [None]
  default_rng = np.random.default_rng

  def spy(*args, **kwargs):
    g = default_rng(*args, **kwargs)
    state = g.bit_generator.state['state']
    made.setdefault(purpose[0], set()).add((state['state'], state['inc']))
    if args and isinstance(args[0], (list, tuple)) and len(args[0]) == 3:  # [seed, kind, example]
      made.setdefault(f'{purpose[0]} per example', set()).add((state['state'], state['inc']))
    return g
  monkeypatch.setattr(np.random, 'default_rng', spy)

  def record(name, fn, *args):
    purpose[0] = name
    try:
      return fn(*args)
    finally:
      purpose[0] = None
  return record, made


def _corrupt_everything(seed: int) -> None:
  """Every draw of a split of N 8x8 images corrupted with noise seed `seed`, each kind planted."""
  c = corruption.Corruption(label_noise=0.1, seed=seed, label_noise_kind='confusion',
                            confusions=((0, 1),), blur=0.1, pixel_noise=0.1, occlusion=0.1,
                            duplicate=0.1, ood=0.1)
  info = types.SimpleNamespace(supervised_keys=('image', 'label'), num_classes={'label': 10})
  rng = np.random.Generator(np.random.PCG64(12345))  # the data, not a draw under test
  raw = {'image': rng.integers(0, 256, (N, 8, 8), dtype=np.uint8),
         'label': rng.integers(0, 10, N)}
  c.apply(info, raw, np.arange(N), N)


def test_noise_ceiling_folds_are_not_the_corruption_draw(streams):
  from bench import noise_ceiling  # pylint: disable=g-import-not-at-top
  record, made = streams
  for s in SEEDS:
    record('corruption', _corrupt_everything, s)
    folds = record('folds', noise_ceiling.fold_of, N, FOLDS, s)
    np.testing.assert_array_equal(np.bincount(folds, minlength=FOLDS), N // FOLDS)
  # five input kinds each plant a tenth of N, each such example drawing from a stream of its own
  assert len(made['corruption per example']) > len(SEEDS) * N // 4
  shared = made['folds'] & made['corruption']
  assert not shared, f'{len(shared)} of the folds\' generators are the corruption\'s'
