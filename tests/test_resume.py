"""Training N steps straight equals a run stopped after N/2 steps (its own process, through the
command line's --stop_after) and resumed from its checkpoint."""
import json
import os

import jax
import numpy as np

from datarater.export import load_rater
from datarater.meta_train import meta_train
from tests import forked
from tests.run_config import as_flags, small_config
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path, capsys):
  config = small_config(tfds_dir, steps=6)
  config.data.input_corruption.occlusion = 0.1  # two kinds: an AUROC per kind is recorded too
  straight = tmp_path / 'straight'
  meta_train(config, str(straight), devices=jax.devices()[:1])

  resumed = tmp_path / 'resumed'
  env = subprocess_env(1)
  first = forked.run('launch.train_rater', [f'--workdir={resumed}', *as_flags(config),
                                            '--config.data.input_corruption.occlusion=0.1',
                                            '--stop_after=3'], env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert 'stopped after outer step 3' in first.stdout
  assert not (resumed / 'report.json').exists()  # really stopped half-way
  capsys.readouterr()
  meta_train(config, str(resumed), devices=jax.devices()[:1])
  assert 'resumed from the checkpoint at outer step 3' in capsys.readouterr().out

  for a, b in zip(jax.tree.leaves(load_rater(str(straight)).params),
                  jax.tree.leaves(load_rater(str(resumed)).params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The metrics records are the uninterrupted run's (its speed aside), though the stop at step 3
  # fell between two records (log_every=2): none is repeated, added or cut short by the resume.
  read = lambda run: [json.loads(l) for l in open(run / 'metrics.jsonl')]
  want, got = read(straight), read(resumed)
  assert [r['step'] for r in got] == [r['step'] for r in want] == [2, 4, 6]
  for a, b in zip(want, got):
    assert a.keys() == b.keys() and a['auroc_by_kind'].keys() == b['auroc_by_kind'].keys()
    for k in a.keys() - {'steps_per_sec', 'auroc_by_kind'}:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for kind, auroc in a['auroc_by_kind'].items():
      np.testing.assert_allclose(b['auroc_by_kind'][kind], auroc, atol=1e-6, err_msg=kind)
