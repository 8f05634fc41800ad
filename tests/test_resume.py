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


def _initial_state_programs(monkeypatch, population_shapes) -> list:
  """From here on, the lowered text of each program `jax.jit` makes without inputs whose outputs
  hold arrays of every shape in `population_shapes` (those drawing the K initial inner models'
  parameters)."""
  real_jit, seen = jax.jit, []

  class Recorded:  # the jitted function, its calls without inputs recorded
    def __init__(self, fn, jitted):
      self._fn, self._jitted = fn, jitted

    def __getattr__(self, name):
      return getattr(self._jitted, name)

    def __call__(self, *inputs, **kw):
      if not inputs and not kw and population_shapes <= {
          x.shape for x in jax.tree.leaves(jax.eval_shape(self._fn))}:
        seen.append(self._jitted.lower().as_text())
      return self._jitted(*inputs, **kw)

  def jit(fn=None, *args, **kwargs):
    if fn is None:  # (used as a decorator with options)
      return lambda f: jit(f, *args, **kwargs)
    return Recorded(fn, real_jit(fn, *args, **kwargs))
  monkeypatch.setattr(jax, 'jit', jit)
  return seen


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path, capsys, monkeypatch):
  """(The uninterrupted run also shows that its start-up check and its first state draw the
  initial models in one program, called twice: the second loads it from the process's
  compilation cache instead of compiling the drawing of K models again, for seconds.)"""
  from datarater import meta_train as meta_train_lib  # pylint: disable=g-import-not-at-top
  from outer_loop import setup  # pylint: disable=g-import-not-at-top
  from outer_loop.batches import MetaBatches  # pylint: disable=g-import-not-at-top
  config = small_config(tfds_dir, steps=6)
  config.data.input_corruption.occlusion = 0.1  # two kinds: an AUROC per kind is recorded too
  straight = tmp_path / 'straight'
  problem, _ = setup.build_problem(config, MetaBatches(config).info)
  models = jax.eval_shape(lambda: meta_train_lib.fresh_state(config, problem)).population.params
  programs = _initial_state_programs(monkeypatch, {x.shape for x in jax.tree.leaves(models)})
  meta_train(config, str(straight), devices=jax.devices()[:1])
  monkeypatch.undo()
  assert len(programs) == 2, len(programs)  # the start-up check's and the run's first state
  assert len(set(programs)) == 1, 'the check and the run draw them in different programs'

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
