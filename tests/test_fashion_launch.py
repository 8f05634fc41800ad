"""`launch.train_rater --config=configs/fashion_mnist.py` (small overrides) on the Debian files end
to end on 4 devices: its report's AUROCs are the brute-force ones of the exported rater's scores,
on the corruptions the config plants. Slow: stopped half-way and resumed on 4 devices, it equals
the uninterrupted 1-device run."""
import contextlib
import functools
import io
import json
import os

import jax
import numpy as np
import pytest

from configs import fashion_mnist
from datarater.data import pipeline
from datarater.export import load_rater
from datarater.meta_train import meta_train
from tests.run_config import launch_train_rater, overridden, stopped_and_resumed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = '/usr/share/datasets/fashion-mnist'
OVERRIDES = {
    'data.train_split': 'train[:256]', 'data.heldout_split': 'train[50000:50128]',
    'data.eval_split': 'test[:128]', 'data.input_corruption.ood': 0.05,
    'inner.population': 2, 'inner.batch_size': 16, 'outer.batch_size': 16, 'outer.steps': 4,
    'outer.warmup_steps': 1, 'log_every': 2, 'checkpoint_every': 2, 'final_eval.num_models': 0}


def _config(tfds_dir):
  return overridden(fashion_mnist.get_config(), {**OVERRIDES, 'data.data_dir': tfds_dir})


def _launch(tfds_dir, workdir, *extra, steps=OVERRIDES['outer.steps']) -> str:
  return launch_train_rater(os.path.join(ROOT, 'configs', 'fashion_mnist.py'),
                            {**OVERRIDES, 'data.data_dir': tfds_dir, 'outer.steps': steps},
                            f'--workdir={workdir}', *extra)


def _brute_force_auroc(clean_scores, bad_scores) -> float:
  """P(clean > bad) + P(tie) / 2 over every (clean, bad) pair, in float64."""
  c = np.asarray(clean_scores, np.float64)[:, None]
  b = np.asarray(bad_scores, np.float64)[None, :]
  return float(np.mean((c > b) + 0.5 * (c == b)))


def _needs_fashion():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip('needs Debian package dataset-fashion-mnist '
                '(apt-get install dataset-fashion-mnist)')
  assert jax.device_count() >= 4, 'tests/conftest.py sets 4 fake CPU devices'


@pytest.mark.xdist_group('fashion_prepared')  # the worker of test_idx_corruption's: one prepare
def test_fashion_rater_run_reports_the_aurocs_of_its_exported_raters_scores(tfds_dir, tmp_path):
  _needs_fashion()
  workdir = tmp_path / 'run'
  # 2 outer steps, one record: the AUROCs need no more (the slow test below runs 4).
  assert 'on 4 device(s)' in _launch(tfds_dir, workdir, steps=2)  # mesh population 2 x batch 2
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2]
  assert all(r['meta_grad_norm'] > 0 for r in records)  # the rater really moved

  train = pipeline.load_split(_config(tfds_dir).data, OVERRIDES['data.train_split'], corrupt=True)
  kinds = dict(enumerate(train.corruption_kinds))
  assert {kinds[k] for k in np.unique(train.corruption)} == {'clean', 'label_confusion', 'ood'}
  # A flipped label moves to a partner in the confusion pairs (classes without one: anywhere).
  pairs = {frozenset(p) for p in fashion_mnist.CONFUSIONS}
  paired = set().union(*pairs)
  flipped = train.corruption == train.corruption_kinds.index('label_confusion')
  was, now = train.clean['label'][flipped], train.features['label'][flipped]
  assert (was != now).all() and (was[:, None] == sorted(paired)).any(1).sum() > 10
  assert all(frozenset((int(y), int(z))) in pairs for y, z in zip(was, now) if int(y) in paired)

  # The report's AUROCs against the definition, on the exported rater's scores.
  scores = np.asarray(load_rater(str(workdir))(train.features))
  report = json.load(open(workdir / 'report.json'))
  clean = scores[train.corruption == 0]
  assert report['noise_auroc'] == pytest.approx(
      _brute_force_auroc(clean, scores[train.corruption != 0]), abs=1e-9)
  for k, kind in kinds.items():
    if k:  # the report's and the last record's (step 2: the same rater)
      want = _brute_force_auroc(clean, scores[train.corruption == k])
      assert report['auroc_by_kind'][kind] == pytest.approx(want, abs=1e-9), kind
      assert records[-1]['auroc_by_kind'][kind] == pytest.approx(want, abs=1e-9), kind


@pytest.mark.slow
def test_fashion_rater_run_resumed_on_four_devices_equals_one_device_straight(tfds_dir, tmp_path):
  _needs_fashion()
  straight = tmp_path / 'straight'
  with contextlib.redirect_stdout(io.StringIO()):
    meta_train(_config(tfds_dir), str(straight), devices=jax.devices()[:1])

  resumed = tmp_path / 'resumed'
  stopped_and_resumed(functools.partial(_launch, tfds_dir), resumed)  # on all 4 devices

  a, b = load_rater(str(straight)), load_rater(str(resumed))
  leaves = lambda p: {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_leaves_with_path(p)}
  for name, x in leaves(a.params).items():
    # 1 and 4 devices sum in different orders. Adam divides by sqrt(v), so float32 rounding in a
    # coordinate whose gradient is near 0 can move it by a good part of one step (lr 1e-3). So
    # every coordinate agrees to a tenth of the 4 steps' largest move, and all but 1% to 5e-5.
    y = np.asarray(leaves(b.params)[name])
    np.testing.assert_allclose(x, y, rtol=0, atol=0.1 * 4 * 1e-3, err_msg=name)
    assert np.mean(np.abs(x - y) > 5e-5) <= 0.01, name
  records = [json.loads(l) for l in open(resumed / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]  # none repeated by the resume
  # Those few coordinates move the scores by up to about 2e-3; one outer step more or less moves
  # some by about 0.3.
  train = pipeline.load_split(_config(tfds_dir).data, OVERRIDES['data.train_split'], corrupt=True)
  centred = lambda s: s - s.mean()
  np.testing.assert_allclose(centred(np.asarray(a(train.features))),
                             centred(np.asarray(b(train.features))), atol=5e-3)
