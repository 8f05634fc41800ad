"""evaluation.py against brute force: AUROC by counting (clean, corrupted) pairs in float64 (ties
half), per kind against the clean examples only; score_split against a loop over the split."""
import numpy as np
import pytest

from datarater import evaluation


class _Split:
  """A split of n examples whose only feature is its position."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def take(self, positions):
    positions = np.asarray(positions)
    return {'value': (positions * 10 + 3).astype(np.float32), 'index': positions.astype(np.int32)}


def _pairs(clean, bad) -> float:
  """P(clean > bad) + P(clean == bad) / 2 over every (clean, bad) pair, float64."""
  clean, bad = np.asarray(clean, np.float64), np.asarray(bad, np.float64)
  wins = ties = 0
  for c in clean:
    for b in bad:
      wins += c > b
      ties += c == b
  return (wins + 0.5 * ties) / (len(clean) * len(bad))


def test_a_kind_with_a_single_example_is_measured_against_the_clean_ones():
  """A kind present once (or twice) is a kind: its AUROC is its pairs with every clean example;
  kinds absent from the record, and the clean class, are left out."""
  rng = np.random.default_rng(0)
  record = np.array([0] * 30 + [1] + [2, 2] + [3] * 10)
  rng.shuffle(record)
  scores = rng.integers(0, 5, len(record)).astype(np.float64)
  kinds = ('clean', 'one', 'two', 'many', 'absent')
  got = evaluation.auroc_by_kind(scores, record, kinds)
  assert sorted(got) == ['many', 'one', 'two']
  clean = scores[record == 0]
  for k, kind in enumerate(kinds[1:4], 1):
    assert got[kind] == pytest.approx(_pairs(clean, scores[record == k]), abs=1e-12), kind
  assert evaluation.noise_auroc(scores, record != 0) == pytest.approx(
      _pairs(clean, scores[record != 0]), abs=1e-12)


@pytest.mark.parametrize('n,batch', [(10, 4), (7, 7), (5, 8), (9, 3)])
def test_score_split_is_the_score_of_each_example_in_order(n, batch):
  """A last batch that wraps past the end is cut to the examples it owns, in order."""
  got = evaluation.score_split(lambda b: b['value'] + 0 * b['index'], _Split(n), batch_size=batch,
                               jit=False)
  want = np.array([i * 10 + 3 for i in range(n)], np.float32)
  np.testing.assert_array_equal(got, want)


def test_scoring_in_a_log_writes_a_line_at_most_every_interval(monkeypatch, capsys):
  """stderr not a terminal: score_split's progress is whole lines on stdout, no more often than
  LOG_INTERVAL_S (here far longer than the run: the opening and the closing line only), the last
  one the finished count."""
  from datarater import progress  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(progress, 'LOG_INTERVAL_S', 1e6)
  got = evaluation.score_split(lambda b: b['value'], _Split(50), batch_size=2, progress=True,
                               desc='scoring', jit=False)
  assert len(got) == 50
  captured = capsys.readouterr()
  lines = captured.out.splitlines()
  assert not captured.err and '\r' not in captured.out
  assert 1 <= len(lines) <= 2, lines
  assert lines[-1].startswith('scoring: 100%') and '50/50' in lines[-1], lines


def test_blocks_shared_by_processes_are_the_split_and_score_as_score_split_does(tfds_dir):
  """A split held in memory: the blocks of shards 0..2 of 3 are the split's examples, each once,
  block b shard b % 3's; in one process `score_split_shared` gives `score_split`'s scores bit for
  bit (the same padded batches; the last block of the 1197 digits wraps)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import digits_data  # pylint: disable=g-import-not-at-top
  split = pipeline.load_split(digits_data(tfds_dir, 0.2), 'train', corrupt=True)
  seen = []
  for shard in range(3):
    for positions, batch in split.blocks(100, shard, 3):
      assert positions[0] // 100 % 3 == shard and len(positions) == min(100, len(split) -
                                                                        positions[0])
      for k, v in split.take(positions).items():
        np.testing.assert_array_equal(batch[k], v)
      seen.extend(positions)
  assert sorted(seen) == list(range(len(split)))
  score = lambda b: jnp.tanh(b['image'].reshape(len(b['index']), -1) @ jnp.linspace(
      -1, 1, 64)) * b['label'] + b['index']
  shared = evaluation.score_split_shared(score, split)
  assert shared.dtype == np.float64 and len(split) % evaluation.SCORE_BLOCK
  np.testing.assert_array_equal(shared, evaluation.score_split(score, split))
