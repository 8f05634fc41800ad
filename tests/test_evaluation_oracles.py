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
