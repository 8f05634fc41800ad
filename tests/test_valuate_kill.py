"""launch.valuate killed by SIGKILL in the middle of block scoring resumes to the same scores file.

The child process kills itself (SIGKILL, no clean-up) while scoring block KILL_AT: that block's
scores are already in the memory-mapped partial file but its progress is not saved, so the
resumed run must redo it and the blocks after it, and read the fitted run from the cache.
"""
import json
import os
import signal

import numpy as np
import pytest
import pyarrow.parquet as pq

from configs.digits import get_config
from datarater import files as files_lib
from datarater.valuation.run import valuate
from tests import forked
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK, KILL_AT = 64, 4  # the digits' 1,197 training examples: 19 blocks


def _valuate_killed_at(kill_at: int, args: list) -> None:
  """launch.valuate whose process kills itself once block `kill_at`'s scores are written and
  before its progress is."""
  write_json, saved = files_lib.write_json, []

  def killed_while_scoring(path, obj):
    if path.endswith('.npy.json'):
      saved.append(obj)
      if len(saved) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, obj)
  files_lib.write_json = killed_while_scoring
  forked.as_main('launch.valuate', args)


def test_valuate_killed_while_scoring_resumes_to_the_same_scores_file(tfds_dir, tmp_path,
                                                                      monkeypatch):
  overrides = {'data.data_dir': tfds_dir, 'valuation.train_steps': 20,
               'valuation.checkpoint_every': 10, 'valuation.batch_size': 32,
               'valuation.score_batch_size': BLOCK}
  killed, straight = str(tmp_path / 'killed'), str(tmp_path / 'straight')
  proc = forked.call(_valuate_killed_at, KILL_AT, [
      '--method=tracin', f'--config={os.path.join(ROOT, "configs", "digits.py")}',
      f'--workdir={killed}', *[f'--config.{k}={v}' for k, v in overrides.items()]],
      env=subprocess_env(4), timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  partial = [f for f in os.listdir(killed) if f.endswith('.npy.json')]
  assert len(partial) == 1 and not os.path.exists(os.path.join(killed, 'scores_tracin.parquet'))
  with open(os.path.join(killed, partial[0])) as f:
    assert json.load(f) == {'blocks_done': KILL_AT - 1}  # block KILL_AT was being scored

  config = get_config()
  for k, v in overrides.items():
    section, field = k.split('.')
    setattr(config[section], field, v)
  saved, write_json = [], files_lib.write_json
  monkeypatch.setattr(files_lib, 'write_json', lambda path, obj: (
      saved.append(obj) if path.endswith('.npy.json') else None, write_json(path, obj)))
  resumed = valuate('tracin', config, killed, progress=False)
  blocks = -(-resumed['num_examples'] // BLOCK)
  assert saved == [{'blocks_done': b} for b in range(KILL_AT, blocks + 1)]  # only the rest
  valuate('tracin', config, straight, progress=False)
  files = [os.path.join(d, 'scores_tracin.parquet') for d in (killed, straight)]
  a, b = (pq.read_table(f).to_pydict() for f in files)
  assert a == b
  with open(files[0], 'rb') as f, open(files[1], 'rb') as g:
    assert f.read() == g.read()
  assert resumed['num_examples'] == len(a['id']) > KILL_AT * BLOCK
  assert np.std(a['score']) > 0
  assert not [f for f in os.listdir(killed) if f.startswith('.scores_')]  # partials removed


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_a_partial_of_another_process_count_is_not_resumed(tfds_dir, tmp_path, monkeypatch):
  """Process 0 of 2 scores blocks 0, 2, 4, ...; stopped after two of them and resumed by one
  process (which scores 0, 1, 2, ...), its partial must not count as blocks 0 and 1 done."""
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from datarater.valuation import run  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.data.data_dir = tfds_dir
  v = config.valuation
  v.train_steps, v.checkpoint_every, v.batch_size, v.score_batch_size = 20, 10, 32, BLOCK
  straight = valuate('tracin', config, str(tmp_path / 'straight'), progress=False)
  want = pq.read_table(tmp_path / 'straight' / 'scores_tracin.parquet').to_pydict()

  class TwoProcesses(types.SimpleNamespace):  # process 0 of 2, to run.py only
    def __getattr__(self, name):
      return getattr(jax, name)
  saved, write_json = [], files_lib.write_json

  def stop_after_two_blocks(path, obj):
    write_json(path, obj)
    if path.endswith('.npy.json'):
      saved.append(obj)
      if len(saved) == 2:
        raise _Stop
  with monkeypatch.context() as m:
    m.setattr(run, 'jax', TwoProcesses(process_index=lambda: 0, process_count=lambda: 2))
    m.setattr(files_lib, 'write_json', stop_after_two_blocks)
    try:
      valuate('tracin', config, str(tmp_path / 'w'), progress=False)
    except _Stop:
      pass
  assert saved == [{'blocks_done': 1}, {'blocks_done': 2}]
  resumed = valuate('tracin', config, str(tmp_path / 'w'), progress=False)
  got = pq.read_table(tmp_path / 'w' / 'scores_tracin.parquet').to_pydict()
  np.testing.assert_array_equal(got['score'], want['score'])
  assert resumed['noise_auroc'] == straight['noise_auroc']
  assert not [f for f in os.listdir(tmp_path / 'w') if f.startswith('.scores_')]


def test_a_damaged_fit_cache_entry_is_fitted_again(tmp_path):
  """A cached run cut short (a full disk, a copy) is made again, not a pickle traceback."""
  from datarater.valuation.run import RunCache  # pylint: disable=g-import-not-at-top
  cache = RunCache(str(tmp_path / 'fit'), 'tag')
  assert cache.get('run', lambda: {'x': np.arange(1000)})['x'].sum() == 499500
  path = tmp_path / 'fit' / 'run-tag.pkl'
  path.write_bytes(path.read_bytes()[:100])
  made = []
  again = cache.get('run', lambda: made.append(1) or {'x': np.arange(10)})
  assert made == [1] and again['x'].sum() == 45
  assert RunCache(str(tmp_path / 'fit'), 'tag').get('run', lambda: 1 / 0)['x'].sum() == 45


def test_a_partial_scores_file_is_resumed_only_when_it_is_whole_and_its_count_fits(tmp_path):
  """What an earlier run left is kept only when it is what this run writes: a float64 [n] file,
  whole, and a block count of 0..blocks (a file cut short was read as zeros, a count past the
  blocks kept another run's values, a short file or an empty count raised a traceback)."""
  from datarater.valuation import run  # pylint: disable=g-import-not-at-top
  n, blocks = 100, 4
  partial, progress = str(tmp_path / 'p.npy'), str(tmp_path / 'p.npy.json')
  def left(array=None, count=2, cut=0, text=None):
    np.save(partial, np.arange(n, dtype=np.float64) if array is None else array)
    if cut:
      os.truncate(partial, os.path.getsize(partial) - cut)
    with open(progress, 'w') as f:
      f.write(json.dumps({'blocks_done': count}) if text is None else text)
    return run._blocks_kept(partial, progress, n, blocks)  # pylint: disable=protected-access
  assert left() == 2 and left(count=blocks) == blocks
  for kept in (left(cut=8), left(count=blocks + 1), left(count=-1), left(count=2.0),
               left(np.zeros(n - 1)), left(np.zeros((n, 1))), left(np.zeros(n, np.float32)),
               left(text=''), left(text='[2]')):
    assert kept == 0
  os.remove(progress)
  assert run._blocks_kept(partial, progress, n, blocks) == 0  # pylint: disable=protected-access


def test_a_partial_refused_then_killed_before_a_block_is_not_resumed_as_zeros(tmp_path):
  """A refused partial is made anew (zeros); its old count, left beside it until the first block
  was kept, resumed those zeros as scores after a kill in that block."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from datarater.valuation import run  # pylint: disable=g-import-not-at-top

  class Split:  # a split of n examples whose true score is its position + 1
    def __init__(self, n):
      self.n = n
    def __len__(self):
      return self.n
    def block_starts(self, size, shard=0, num=1):
      return list(range(shard * size, self.n, num * size))
    def blocks(self, size, shard=0, num=1, skip=0):
      for start in self.block_starts(size, shard, num)[skip:]:
        positions = np.arange(start, min(start + size, self.n))
        yield positions, self.take(positions)
    def take(self, positions):
      return {'x': jnp.asarray(np.asarray(positions, np.float32)), 'index': np.asarray(positions)}
    def corruption_of(self, positions):
      return np.zeros(np.shape(positions), np.int8)

  class Killed(Exception):
    pass
  def dies(batch):
    raise Killed
  partial, n = str(tmp_path / 'p.npy'), 40
  score = lambda batch: batch['x'] + 1.0
  run.score_blocks(score, Split(n), 10, partial, False, 'x')
  with open(partial + '.json', 'w') as f:
    json.dump({'blocks_done': 3}, f)
  os.truncate(partial, os.path.getsize(partial) - 8)  # damaged: refused
  with pytest.raises(Killed):
    run.score_blocks(dies, Split(n), 10, partial, False, 'x')
  run.score_blocks(score, Split(n), 10, partial, False, 'x')
  np.testing.assert_array_equal(np.load(partial), np.arange(n) + 1.0)
