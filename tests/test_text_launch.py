"""`launch.train_rater --config=configs/text.py` (small overrides) end to end: stopped half-way and
resumed on 4 devices, it equals the uninterrupted 1-device run."""
import contextlib
import functools
import io
import json
import os

import jax
import numpy as np
import pytest

from configs import text
from datarater.data import pipeline, python_text
from datarater.errors import UserError
from datarater.export import load_rater
from datarater.meta_train import meta_train
from tests.run_config import launch_train_rater, overridden, stopped_and_resumed

pytestmark = pytest.mark.xdist_group('python_text')  # the worker of test_text_lm: one build
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'name': 'transformer_lm', 'd_model': 8, 'num_heads': 2, 'num_layers': 1, 'd_mlp': 16}
OVERRIDES = {
    'data.train_split': 'train[:64]', 'data.heldout_split': 'heldout[:32]',
    'data.eval_split': 'test[:32]', **{f'task.{k}': v for k, v in TINY.items()},
    **{f'rater.{k}': v for k, v in TINY.items() if k != 'name'},
    'inner.population': 2, 'inner.batch_size': 4, 'outer.batch_size': 4, 'outer.steps': 4,
    'outer.warmup_steps': 1, 'inner.reset_every': 3, 'log_every': 2, 'checkpoint_every': 2,
    'final_eval.num_models': 0}


def _config(tfds_dir):
  return overridden(text.get_config(), {**OVERRIDES, 'data.data_dir': tfds_dir})


def _launch(tfds_dir, workdir, *extra) -> str:
  return launch_train_rater(os.path.join(ROOT, 'configs', 'text.py'),
                            {**OVERRIDES, 'data.data_dir': tfds_dir}, f'--workdir={workdir}',
                            *extra)


@pytest.mark.slow  # 32 s; the fast suite resumes on 4 devices the digits and Fashion-MNIST runs
def test_text_rater_run_resumed_on_four_devices_equals_one_device_straight(tfds_dir, tmp_path):
  if not os.path.isdir(python_text.DOC_DIR):
    pytest.skip('needs Debian package python3.11-doc (apt-get install python3.11-doc)')
  assert jax.device_count() >= 4, 'tests/conftest.py sets 4 fake CPU devices'
  straight = tmp_path / 'straight'
  with contextlib.redirect_stdout(io.StringIO()):
    report = meta_train(_config(tfds_dir), str(straight), devices=jax.devices()[:1])
  assert set(report['auroc_by_kind']) <= set(python_text.CORRUPTIONS[1:])

  resumed = tmp_path / 'resumed'
  # all 4 devices: mesh population 2 x batch 2
  stopped_and_resumed(functools.partial(_launch, tfds_dir), resumed)

  a, b = load_rater(str(straight)), load_rater(str(resumed))
  leaves = lambda p: {jax.tree_util.keystr(k): x for k, x in jax.tree_util.tree_leaves_with_path(p)}
  for name, x in leaves(a.params).items():
    if name.endswith("['head']['bias']"):  # weights are softmax(scores): shifting every score
      continue  # changes nothing, so its meta-gradient is rounding noise, which Adam scales up
    # 1 and 4 devices sum in different orders; Adam divides by sqrt(v), so float32 rounding in a
    # coordinate with a tiny gradient (a rare byte's embedding) moves it by up to a few 1e-5.
    np.testing.assert_allclose(x, leaves(b.params)[name], rtol=1e-4, atol=5e-5, err_msg=name)
  train = pipeline.load_split(_config(tfds_dir).data, OVERRIDES['data.train_split'])
  centred = lambda s: s - s.mean()
  np.testing.assert_allclose(centred(a(train.features)), centred(b(train.features)), atol=1e-4)
  records = [json.loads(l) for l in open(resumed / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 4]  # none repeated by the resume
  assert all(r['meta_grad_norm'] > 0 for r in records)  # the rater really moved


def test_a_vocabulary_smaller_than_the_corpus_bytes_stops_before_any_work(tfds_dir, tmp_path):
  if not os.path.isdir(python_text.DOC_DIR):
    pytest.skip('needs Debian package python3.11-doc (apt-get install python3.11-doc)')
  config = overridden(_config(tfds_dir), {'task.vocab': 100})
  with pytest.raises(UserError, match='outside the vocabulary of task.vocab=100'):
    meta_train(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert not (tmp_path / 'run').exists()
