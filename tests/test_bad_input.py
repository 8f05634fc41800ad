"""Bad input, launcher by launcher: exit code 2, exactly one `error:` line naming the bad value
(a RuntimeWarning, which the program would print, counts as a line), and nothing written or
damaged (every file under the test's folder hashed before and after).

Each case runs the launcher in this process exactly as its command line would
(`launch.cli.invoke`: its flags, parsing and `main`).
"""
import ast
import contextlib
import functools
import glob
import io
import json
import os
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags

from datarater import export, files
from datarater.errors import UserError
from datarater.meta_train import meta_train
from inner_loop.optimizers import INNER_OPTIMIZERS
from launch import cli, export_rater, filter as filter_launcher, train, train_rater, valuate
from tests.run_config import as_flags, small_config

pytestmark = pytest.mark.xdist_group('bad_input')  # one worker builds the module's `world`

LAUNCHERS = {'train_rater': train_rater, 'train': train, 'valuate': valuate,
             'export_rater': export_rater, 'filter': filter_launcher}


@pytest.fixture(scope='module')
def world(tfds_dir, tmp_path_factory):
  """A finished 2-step rater run, its export, odd files and folders the cases point at."""
  root = tmp_path_factory.mktemp('world')
  meta_train(small_config(tfds_dir, steps=2), str(root / 'run'))
  export.export_rater(str(root / 'run'), str(root / 'rater'))
  (root / 'a_file').write_text('not a folder')
  (root / 'seeds_flags').write_text('--config.train.seeds=(0,1)\n')  # a --flagfile
  (root / 'binary_flags').write_bytes(bytes(range(128, 256)))  # a --flagfile not text
  (root / 'exit_config.py').write_text('import sys\n\n\ndef get_config():\n  sys.exit(3)\n')
  for field in ('log_every', 'checkpoint_every'):  # config files without a field rater runs read
    (root / f'no_{field}.py').write_text('from configs import digits\n\n\ndef get_config():\n'
                                         f'  c = digits.get_config()\n  del c[{field!r}]\n'
                                         '  return c\n')
  bad_json = root / 'bad_json_rater'
  shutil.copytree(root / 'rater', bad_json)
  (bad_json / 'rater.json').write_text('{"format_version": 2, "rater": ')
  no_params = root / 'no_params_rater'
  shutil.copytree(root / 'rater', no_params)
  shutil.rmtree(no_params / 'params')
  other = root / 'other_architecture_rater'
  shutil.copytree(root / 'rater', other)
  meta = json.loads((other / 'rater.json').read_text())
  meta['rater']['hidden'] = [32]
  (other / 'rater.json').write_text(json.dumps(meta))
  meta = json.loads((root / 'rater' / 'rater.json').read_text())
  without = lambda key: {k: v for k, v in meta.items() if k != key}
  for name, bad in [('no_temperature', without('temperature')),
                    ('no_data_info', without('data_info')), ('no_rater', without('rater')),
                    ('list', [2]), ('cold', {**meta, 'temperature': 0}),
                    ('string_hidden', {**meta, 'rater': {**meta['rater'], 'hidden': '16'}})]:
    shutil.copytree(root / 'rater', root / f'{name}_rater')
    (root / f'{name}_rater' / 'rater.json').write_text(json.dumps(bad))
  shutil.copytree(root / 'rater', root / 'truncated_rater')
  for path in (root / 'truncated_rater' / 'params').rglob('*'):
    if path.is_file() and path.parent.name == 'd':  # the arrays' data files, cut short
      path.write_bytes(path.read_bytes()[:10])
  shutil.copytree(root / 'run', root / 'cold_run', ignore=shutil.ignore_patterns('.lock'))
  saved = json.loads((root / 'cold_run' / 'config.json').read_text())
  saved['config']['rater']['temperature'] = -1.0
  (root / 'cold_run' / 'config.json').write_text(json.dumps(saved))
  (root / 'no_outer_run').mkdir()
  saved = json.loads((root / 'run' / 'config.json').read_text())
  del saved['config']['outer']
  (root / 'no_outer_run' / 'config.json').write_text(json.dumps(saved))
  n = 1197
  pq.write_table(pa.table({'id': np.arange(n) + 0.5, 'value': np.zeros(n)}), root / 'float_ids.parquet')
  pq.write_table(pa.table({'id': np.arange(n), 'value': np.full(n, '1.5')}), root / 'str_values.parquet')
  pq.write_table(pa.table({'id': np.arange(n), 'value': np.zeros(n)}), root / 'zeros.parquet')
  pq.write_table(pa.table({'id': np.arange(n), 'value': np.zeros(n), 'split': np.zeros(n, int)}),
                 root / 'int_split.parquet')
  prepared = os.path.dirname(glob.glob(f'{tfds_dir}/sklearn_digits/*/dataset_info.json')[0])
  for name in ('cut_dataset', 'bad_info_dataset', 'good_dataset'):
    shutil.copytree(prepared, root / name)
  train_records = next(iter((root / 'cut_dataset').glob('*-train.array_record*')))
  train_records.write_bytes(train_records.read_bytes()[:train_records.stat().st_size // 2])
  (root / 'bad_info_dataset' / 'dataset_info.json').write_text('{"name": ')
  for name, edit in [('negative_shape', lambda m: m['data_info']['spec']['image'].update(
                         shape=[-1, 8, 1])),
                     ('no_classes', lambda m: m['data_info']['num_classes'].update(label=0))]:
    shutil.copytree(root / 'rater', root / f'{name}_rater')
    meta = json.loads((root / 'rater' / 'rater.json').read_text())
    edit(meta)
    (root / f'{name}_rater' / 'rater.json').write_text(json.dumps(meta))
  # Finite parameters whose scores overflow float32.
  shutil.copytree(root / 'rater', root / 'huge_rater', ignore=shutil.ignore_patterns('params'))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / 'huge_rater' / 'params', jax.tree.map(
        lambda x: np.asarray(x) * 1e30, export.load_rater(str(root / 'rater')).params))
  shutil.copytree(tfds_dir, root / 'bad_info_data_dir')
  for info in (root / 'bad_info_data_dir').glob('sklearn_digits/*/dataset_info.json'):
    info.write_text('{"name')
  (root / 'train_run').mkdir()
  (root / 'train_run' / 'history.jsonl').write_text('{"epoch": 1.0}\n')
  (root / 'busy').mkdir()
  (root / 'val_out').mkdir()  # a launch.valuate output (its scores files' marker)
  (root / 'val_out' / 'scores_tracin.json').write_text('{}')
  (root / 'foreign').mkdir()
  (root / 'foreign' / 'config.json').write_text('{"model": "not a rater run"}')
  return root


@functools.cache  # built once: each case reads its own entry
def _cases(tfds_dir: str, w) -> list:
  """(launcher, argv after the program name, what the error line must name)."""
  data = f'--config.data.data_dir={tfds_dir}'
  rater_run = as_flags(small_config(tfds_dir)) + [f'--workdir={w}/new_run']
  tr = lambda *extra, out=f'--workdir={w}/new_run': ('train_rater', as_flags(small_config(
      tfds_dir)) + [out, *extra])
  cases = [
      (*tr('--config.log_every=0'), 'log_every must be >= 1, got 0'),
      (*tr('--config.checkpoint_every=0'), 'checkpoint_every must be >= 1, got 0'),
      (*tr('--config.rater.activation=swishy'), "rater.activation must be one of 'relu', 'gelu', "
                                               "'tanh', 'silu', got 'swishy'"),
      (*tr('--config.task.dtype=float8'), "task.dtype must be one of '', 'float32', 'bfloat16', "
                                          "'float16', got 'float8'"),
      ('train_rater', ['--config=configs/text.py', data, '--config.rater.dtype=float8',
                       f'--workdir={w}/new_run'],
       "rater.dtype must be one of '', 'float32', 'bfloat16', 'float16', got 'float8'"),
      (*tr('--config.data.noise_seed=-1'), 'data.noise_seed must be >= 0, got -1'),
      (*tr('--config.inner.stepz=4'), "unknown config field 'stepz' (did you mean 'steps'?)"),
      (*tr('--config.inner.zzz=4'), "unknown config field 'zzz'"),
      (*tr('--config.zzz.steps=4'), "unknown config field 'zzz': --config.zzz.steps"),
      (*tr('--config.outer.stepz=3'),  # (and --config.outer.steps=6 among the flags)
       "unknown config field 'stepz' (did you mean 'steps'?): --config.outer.stepz"),
      ('train_rater', [f'--config={w}/no_log_every.py', data, f'--workdir={w}/new_run'],
       'the config has no field log_every'),
      ('train_rater', [f'--config={w}/no_checkpoint_every.py', data, f'--workdir={w}/new_run'],
       'the config has no field checkpoint_every'),
      (*tr('--config.task.label=nope'), "got input 'image', label 'nope'; dataset 'sklearn_digits'"),
      (*tr('--config.inner.steps=abc'), "--config.inner.steps=abc: invalid literal for int()"),
      (*tr(out=f'--workdir={w}/a_file'), f"--workdir '{w}/a_file' exists and is not a folder"),
      (*tr(out=f'--workdir={w}/a_file/under'),
       f"cannot write --workdir '{w}/a_file/under': '{w}/a_file' is a file, not a folder"),
      (*tr('--stop_after=-1'), '--stop_after must be >= 1, got -1'),
      (*tr('--config.inner.batch_size=2000', '--config.inner.population=1'),
       'inner.batch_size=2000 is more than the 1197 examples'),
      (*tr('--config.outer.batch_size=400', '--config.inner.population=1'),
       'outer.batch_size=400 is more than the 300 examples'),
      # A softmax over one example is 1 whatever the score: the rater learnt nothing (ran on 1
      # device; on several, it was refused as not dividing over them).
      (*tr('--config.inner.batch_size=1', '--config.inner.population=1'),
       'inner.batch_size=1: the loss weights are a softmax over each batch'),
      (*tr('--config.inner.learning_rate=inf'), 'inner.learning_rate must be finite, got inf'),
      (*tr('--config.outer.clip_norm=-1'), 'outer.clip_norm must be > 0, got -1'),
      (*tr('--config.rater.temperature=1e-38'),
       'rater.temperature must be >= 1e-06, got 1e-38'),
      (*tr('--config.inner.steps=0'), 'inner.steps must be >= 1, got 0'),
      (*tr('--config.inner.population=0'), 'inner.population must be >= 1, got 0'),
      (*tr('--config.inner.optimizer=adamw2'), "inner.optimizer must be one of "
       f"{', '.join(map(repr, INNER_OPTIMIZERS))}, got 'adamw2'"),  # a new optimizer is listed
      (*tr('--config.outer.meta_gradient=forward'), "got 'forward'"),
      (*tr('--config.outer.meta_gradient=mixed', '--config.outer.mixed_recompute=backwards'),
       "got 'backwards'"),
      (*tr('--config.outer.meta_gradient=mixed', '--config.outer.mixed_segment=-2'),
       'outer.mixed_segment must be >= 0, got -2'),
      (*tr('--config.data.name=no_such_dataset'), "unknown dataset 'no_such_dataset'"),
      (*tr('--config.data.name=sklearn_digits:2.0.0'),
       "dataset 'sklearn_digits:2.0.0' cannot be loaded at version 2.0.0, only: 1.0.0"),
      (*tr(out=f'--workdir={w}/run[1]'), f"--workdir '{w}/run[1]' holds '[' in its path: orbax"),
      (*tr('--config.data.label_noise=1.5'), 'data.label_noise must be < 1, got 1.5'),
      (*tr('--config.data.train_split=dev'), "has no split 'dev'"),
      (*tr('--config.data.train_split=train[:0]'),
       "split 'train[:0]' of 'sklearn_digits' selects no examples"),
      (*tr('--config.inner.batch_size=6', '--config.inner.population=1'),
       'inner.batch_size=6 does not divide over 4 devices'),
      ('train_rater', ['--config=configs/nope.py', f'--workdir={w}/new_run'],
       "No such file or directory: 'configs/nope.py'"),
      ('train_rater', ['--config=README.md', f'--workdir={w}/new_run'],
       "cannot load --config 'README.md': SyntaxError: invalid decimal literal (line "),
      # (exit code 3, no line)
      ('train_rater', [f'--config={w}/exit_config.py', f'--workdir={w}/new_run'],
       f"cannot load --config '{w}/exit_config.py': SystemExit: 3"),
      # tensorstore took no such path: a traceback at the first checkpoint, the run half written
      (*tr(out=f'--workdir={w}/bad\udcff'), "--workdir '" + f'{w}/bad' + "\\udcff' is not UTF-8"),
      ('train_rater', ['--config=launch/cli.py', f'--workdir={w}/new_run'],
       "cannot load --config 'launch/cli.py': it defines no get_config()"),
      ('train_rater', ['--config=configs/text_bench.py:nope', f'--workdir={w}/new_run'],
       "cannot load --config 'configs/text_bench.py:nope': ValueError: configs/text_bench.py: "
       "unknown part 'nope'"),
      (*tr('--config=configs/digits.py'), 'before a value for --config was specified'),
      (*tr('--config.task.name=resnet'), "task.name must be a registered task"),
      ('train_rater', [f for f in rater_run if not f.startswith('--config.task.hidden')] +
       ['--config.task.hidden=(0,)'], 'task.hidden must hold integers >= 1, got (0,)'),
      (*tr('--config.inner.optimizer=sgd', '--config.outer.mixed_recompute=invert',
           '--config.outer.meta_gradient=mixed'),
       "mixed_recompute='invert' needs an inner optimizer that can be run backwards"),
      # Past int32 it overflowed inside jit (a traceback after the workdir was written).
      (*tr('--config.inner.reset_every=10000000000'),
       'inner.reset_every must be <= 2147483647, got 10000000000'),
      (*tr('--config.outer.ema=0.99999999'),
       'outer.ema must be <= 0.9999999403953552, got 0.99999999'),
      (*tr('--config.outer.meta_gradient=mixed', '--config.outer.mixed_segment=32'),
       'outer.mixed_segment=32 undoes more than 16 inner steps of adam from one exact state'),
      (*tr('--config.final_eval.num_models=-1'), 'final_eval.num_models must be >= 0, got -1'),
      (*tr('--config.outer.max_skipped_steps=0'), 'outer.max_skipped_steps must be >= 1, got 0'),
      ('train_rater', rater_run[:-1], '--workdir is required'),
      (*tr('--config.inner.steps=3', out=f'--workdir={w}/run'),
       'holds a checkpoint of a different config (inner.steps=2 there, 3 here)'),
      (*tr(out=f'--workdir={w}/busy'), f"--workdir '{w}/busy' is in use by another run"),
      (*tr('--config.outer.steps=1', out=f'--workdir={w}/run'),
       f"--workdir '{w}/run' holds a checkpoint at outer step 2, past outer.steps=1"),
      (*tr('--stop_after=1', out=f'--workdir={w}/run'),
       f"--workdir '{w}/run' holds a checkpoint at outer step 2, past --stop_after=1"),
      ('train', [data, '--config.train.batch_size=0'], 'train.batch_size must be >= 1, got 0'),
      ('train', [data, '--config.train.seeds=()'], 'train.seeds must be a non-empty tuple'),
      ('train', [data, '--config.train.epochs=0'], 'train.epochs must be >= 1, got 0'),
      ('train', [data, '--policy=nope'], "unknown policy 'nope'"),
      ('train', [data, '--policy=sae', '--config.features.train_epochs=1e30',
                 f'--workdir={w}/new_train'], 'features.train_epochs=1e+30 is 1.87e+31 steps'),
      ('train', [data, '--policy=sae', '--config.features.extractor=pixels',
                 '--config.sae.epochs=1e30', f'--workdir={w}/new_train'],
       'sae.epochs=1e+30 is 4.68e+30 steps'),
      ('train', [data, '--policy=sae', '--config.sae.epochs=2', '--config.sae.steps=100',
                 f'--workdir={w}/new_train'],
       '--config.sae.steps is not read while sae.epochs=2 > 0'),
      (*tr('--config.train.learning_rate=0.1'), '--config.train.learning_rate is not read by '
       'launch.train_rater: it reads the config sections data, task, rater, inner, outer'),
      ('train', [data, '--policy=uniform', '--config.seed=3'], '--config.seed is not read by '
       'launch.train: it reads the config sections data, task, train, policy and no top-level'),
      ('valuate', [data, '--method=tracin', '--config.inner.batch_size=3', f'--workdir={w}/new_val'],
       '--config.inner.batch_size is not read by launch.valuate --method=tracin: it reads the '
       'config sections '
       'data, task, valuation'),
      ('train', [data, '--policy=sae', '--config.valuation.batch_size=3'],
       '--config.valuation.batch_size is not read by launch.train: it reads the config sections '
       'data, task, train, policy, features, features.task, sae, sae_scores'),
      ('valuate', [data, '--method=tracin', '--config.features.train_epochs=0.5',
                   '--config.features.train_steps=9', f'--workdir={w}/new_val'],
       '--config.features.train_steps is not read while features.train_epochs=0.5 > 0'),
      ('train', [data, '--policy=mimic', '--config.valuation.mimic_layers=nope',
                 '--config.valuation.reference_steps=5', f'--workdir={w}/new_train'],
       "layer 'nope' not found"),
      ('train', [data, '--policy=datarater'], 'policy datarater needs --rater'),
      # (4 seeds, one per device: a batch of 1 splits over the mesh's batch axis of 1 device)
      ('train', [data, '--policy=datarater', f'--rater={w}/rater', '--config.train.batch_size=1',
                 '--config.train.seeds=(0,1,2,3)'],
       'train.batch_size=1: the loss weights are a softmax over each batch'),  # uniform weights
      ('train', [data, '--policy=mimic', '--config.train.batch_size=1',
                 '--config.train.seeds=(0,1,2,3)'],
       'train.batch_size=1: the loss weights are a softmax over each batch'),
      ('train', [data, '--config.train.batch_size=130', f'--workdir={w}/new_train'],
       'train.batch_size=130 does not divide over 4 devices on the batch axis (4 devices, '
       'population axis 1); use a multiple of 4'),  # 3 seeds on 4 devices: the batch over 4
      ('train', [data, '--policy=datarater', f'--rater={w}/nowhere'], f"no rater in '{w}/nowhere'"),
      ('train', [data, '--policy=scores'], 'policy scores needs --scores'),
      ('train', [data, f'--rater={w}/rater'], "--rater is read only by policies datarater, "
                                               "datarater_batch_filter, datarater_accept (policy "
                                               "is 'uniform')"),
      ('train', [data, '--policy=datarater', f'--rater={w}/rater', f'--scores={w}/zeros.parquet'],
       "--scores is read only by policy scores (policy is 'datarater')"),
      ('train', [data, '--policy=scores', f'--scores={w}/none.parquet'],
       f"scores file '{w}/none.parquet' does not exist"),
      ('train', [data, '--policy=scores', f'--scores={w}/int_split.parquet'],
       'column `split` must hold split names (strings), it holds int64'),
      ('train', [data, '--policy=random', '--config.policy.ratio=0'],
       'policy.ratio must be > 0, got 0'),
      ('train', [data, '--policy=infobatch', '--config.policy.rho=0.3'],
       '--config.policy.rho is not read by policy infobatch (it reads policy.ratio, '
       'policy.max_prune_prob; rho is read by datarater_batch_filter, datarater_accept)'),
      ('train', [data, '--stop_after=2'], '--stop_after needs --workdir'),
      ('train', [data, f'--config.data.dataset_dir={w}/nowhere'],
       f"data.dataset_dir '{w}/nowhere' is not a TFDS dataset folder"),
      ('train', [data, f'--workdir={w}/a_file'], f"--workdir '{w}/a_file' exists and is not"),
      ('train', [data, '--config.train.optimizer=lion'], "got 'lion'"),
      ('train', [data, '--config.data.eval_split=test[:0]'],
       "split 'test[:0]' of 'sklearn_digits' selects no examples"),
      ('train', [data, '--policy=sae', '--config.sae.k=0'], 'sae.k must be >= 1, got 0'),
      ('train', [data, '--config.train.learning_rate=1e30', '--config.train.epochs=1'],
       'the models diverged; lower train.learning_rate (1e+30)'),
      # A diverged SAE coded every example as zeros: the policy selected by its noise alone.
      ('train', [data, '--policy=sae', '--config.features.extractor=pixels',
                 '--config.sae.steps=50', '--config.sae.learning_rate=10',
                 f'--workdir={w}/new_train'],
       'it learned nothing to select by; lower sae.learning_rate (10)'),
      ('train', [data, '--policy=datarater_batch_filter', f'--rater={w}/rater',
                 '--config.train.batch_size=4', '--config.policy.rho=0.99'],
       'policy.rho=0.99 keeps floor((1 - rho) * 4) = 0 of each batch of train.batch_size=4'),
      ('valuate', [data, '--method=shapley', f'--workdir={w}/val'], "unknown --method 'shapley'"),
      ('valuate', [data, '--method=tracin'], '--workdir is required'),
      ('valuate', [data, '--method=dvemb', '--config.valuation.layers=dense_2',
                   f'--workdir={w}/val'], "valuation.layers='dense_2' chooses TracIn layers"),
      # The held-out modes ignored it (their scores were the unprojected ones).
      ('valuate', [data, '--method=tracin', '--config.valuation.tracin_mode=heldout',
                   '--config.valuation.tracin_project=true', f'--workdir={w}/val'],
       "valuation.tracin_project projects tracin_mode='self' alone"),
      ('train', [data, f'--workdir={w}/run'],
       f"--workdir '{w}/run' holds a launch.train_rater run (metrics.jsonl)"),
      (*tr(out=f'--workdir={w}/train_run'),
       f"--workdir '{w}/train_run' holds a launch.train run (history.jsonl)"),
      # (it said 'bad config override', naming no file; the job stop it tries after a flag
      # error then read the file again: a traceback)
      ('train', [data, f'--flagfile={w}/binary_flags'],
       f"--flagfile '{w}/binary_flags' is not text (invalid start byte at byte 0)"),
      ('filter', [f'--flagfile={w}/binary_flags', '--keep=0.5'],
       f"--flagfile '{w}/binary_flags' is not text"),
      # launch.valuate wrote its fit/ and scores files into another launcher's output.
      *(('valuate', [data, '--method=tracin', f'--workdir={w}/{folder}'],
         f"--workdir '{w}/{folder}' holds {what} ({marker}); give the valuation a folder")
        for folder, what, marker in (('run', 'a launch.train_rater run', 'metrics.jsonl'),
                                     ('train_run', 'a launch.train run', 'history.jsonl'),
                                     ('rater', 'an exported rater', 'rater.json'))),
      ('train', [f'--config.data.dataset_dir={w}/cut_dataset'],
       f"the record files of '{w}/cut_dataset' are damaged or missing"),
      # A run folder inside the dataset folder it reads changed that folder's digest: trained
      # once, it could never resume or be rerun ('data.dataset_dir ... changed').
      ('train', [f'--config.data.dataset_dir={w}/good_dataset', f'--workdir={w}/good_dataset/run'],
       f"--workdir '{w}/good_dataset/run' is inside data.dataset_dir '{w}/good_dataset'"),
      (*tr(f'--config.data.dataset_dir={w}/good_dataset', out=f'--workdir={w}/good_dataset'),
       f"--workdir '{w}/good_dataset' is inside data.dataset_dir '{w}/good_dataset'"),
      ('valuate', [data, '--method=tracin', f'--config.data.dataset_dir={w}/good_dataset',
                   f'--workdir={w}/good_dataset/val'],
       f"--workdir '{w}/good_dataset/val' is inside data.dataset_dir '{w}/good_dataset'"),
      ('valuate', [data, '--method=tracin', '--config.data.train_split=train[:1]',
                   f'--workdir={w}/val'], "data.train_split 'train[:1]' holds 1 example(s)"),
      ('valuate', [data, '--method=dvemb', '--config.valuation.projection=sparse',
                   f'--workdir={w}/val'], "got 'sparse'"),
      ('valuate', [data, '--method=tracin', '--config.valuation.layers=dense_9',
                   f'--workdir={w}/val'], "'dense_9'"),
      ('valuate', [data, '--method=tracin', '--config.valuation.checkpoint_every=7',
                   f'--workdir={w}/val'],
       'valuation.checkpoint_every=7 must be >= 1 and divide valuation.train_steps='),
      ('valuate', [data, '--method=datarater', f'--workdir={w}/val'], 'needs valuation.rater'),
      ('valuate', [data, '--method=tracin', '--config.valuation.batch_size=0',
                   f'--workdir={w}/val'], 'valuation.batch_size must be >= 1, got 0'),
      ('valuate', [data, '--method=tracin', '--config.valuation.tracin_mode=both',
                   f'--workdir={w}/val'], "got 'both'"),
      ('valuate', [data, '--method=tracin', '--config.data.train_split=train[10:10]',
                   f'--workdir={w}/val'], "split 'train[10:10]' of 'sklearn_digits' selects no"),
      ('export_rater', [f'--out={w}/exported'], '--workdir is required'),
      ('export_rater', [f'--workdir={w}/run', f'--out={w}/exported*'],
       f"--out '{w}/exported*' holds '*' in its path"),
      ('train', [data, f'--workdir={w}/train?'], f"--workdir '{w}/train?' holds '?' in its path"),
      ('export_rater', [f'--workdir={w}/nowhere', f'--out={w}/exported'],
       f"no rater run in '{w}/nowhere'"),
      ('export_rater', [f'--workdir={w}/run', f'--out={w}/rater'],
       f"output '{w}/rater' already exists"),
      ('export_rater', [f'--workdir={w}/run', f'--out={w}/a_file/x'],
       f"cannot write '{w}/a_file/x': '{w}/a_file' is a file, not a folder"),
      ('export_rater', [f'--workdir={w}/foreign', f'--out={w}/exported'],
       f"'{w}/foreign/config.json' is not the config of a launch.train_rater run"),
      ('export_rater', [f'--workdir={w}/no_outer_run', f'--out={w}/exported'],
       f"'{w}/no_outer_run/config.json' is not the config of a launch.train_rater run (its "
       "config has no outer)"),
  ]
  fl = lambda *extra: ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}',
                       f'--out={w}/filtered', *extra]
  rater = f'--rater={w}/rater'
  cases += [
      ('filter', fl(rater, '--keep=1.5'), 'keep fraction must be in (0, 1], got 1.5'),
      ('filter', fl(rater, '--keep=0.5', '--split=train,validation,train'),
       "--split names 'train' twice"),
      # absl kept the last list: it filtered train alone.
      ('filter', fl(rater, '--keep=0.5', '--split=test', '--split=train'),
       '--split is given twice (the last, train, would replace the others); give it once'),
      ('filter', [*fl(rater, '--keep=0.5'), '--dataset=sklearn_digits:2.0.0'],
       "dataset 'sklearn_digits:2.0.0' cannot be loaded at version 2.0.0"),
      ('filter', [f'--dataset={w}/cut_dataset', rater, '--keep=0.5', f'--out={w}/cut_dataset',
                  '--overwrite'], f"--out '{w}/cut_dataset' would replace --dataset"),
      ('filter', [f'--dataset={w}/bad_info_dataset', rater, '--keep=0.5', f'--out={w}/filtered'],
       f"TFDS dataset folder '{w}/bad_info_dataset': its dataset_info.json is unreadable"),
      ('filter', fl(rater, '--keep=0.5', '--min_score=0'),
       'exactly one of --keep, --min_score and --suggest_keep'),
      ('filter', fl(rater, '--suggest_keep', '--min_score=0', '--balance'),
       'exactly one of --keep, --min_score and --suggest_keep'),
      ('filter', fl('--keep=0.5'), 'exactly one of --rater and --scores'),
      ('filter', fl(f'--rater={w}/bad_json_rater', '--keep=0.5'), 'is not readable JSON'),
      ('filter', fl(f'--rater={w}/no_params_rater', '--keep=0.5'), 'has no params/ folder'),
      ('filter', fl(f'--rater={w}/no_temperature_rater', '--keep=0.5'),
       f"'{w}/no_temperature_rater/rater.json' has no temperature"),
      ('filter', fl(f'--rater={w}/no_data_info_rater', '--keep=0.5'),
       f"'{w}/no_data_info_rater/rater.json' has no data_info"),
      ('filter', fl(f'--rater={w}/no_rater_rater', '--keep=0.5'),
       f"'{w}/no_rater_rater/rater.json' has no rater"),
      ('filter', fl(f'--rater={w}/list_rater', '--keep=0.5'),
       f"'{w}/list_rater/rater.json' holds a JSON list, not the object launch.export_rater"),
      ('filter', fl(f'--rater={w}/cold_rater', '--keep=0.5'),
       f"'{w}/cold_rater/rater.json' has temperature 0; it must be >= 1e-06"),
      ('filter', fl(f'--rater={w}/string_hidden_rater', '--keep=0.5'),
       f"'{w}/string_hidden_rater/rater.json': rater.hidden must be"),
      ('filter', fl(f'--rater={w}/truncated_rater', '--keep=0.5'),
       f"rater '{w}/truncated_rater': its params/ folder is unreadable"),
      ('train', [data, '--policy=datarater', f'--rater={w}/cold_run'],
       f"'{w}/cold_run/config.json': rater.temperature must be >= 1e-06, got -1.0"),
      ('export_rater', [f'--workdir={w}/cold_run', f'--out={w}/exported'],
       f"'{w}/cold_run/config.json': rater.temperature must be >= 1e-06, got -1.0"),
      ('train', [data, '--config.train.seeds=(0,1)', '--config.train.seeds=(2,)'],
       '--config.train.seeds is given twice'),
      ('train', [data, '--config.train.seeds=(0,1)', '-config.train.seeds=(2,)'],
       '--config.train.seeds is given twice'),  # absl's one-dash spelling
      ('train', [data, f'--flagfile={w}/seeds_flags', '--config.train.seeds=(2,)'],
       '--config.train.seeds is given twice'),
      ('train', [data, '--policy=datarater', f'--rater={w}/no_outer_run'],
       f"'{w}/no_outer_run/config.json' is not the config of a launch.train_rater run"),
      ('filter', fl(f'--rater={w}/other_architecture_rater', '--keep=0.5'),
       'its parameters do not fit the architecture it names'),
      ('filter', fl(f'--scores={w}/float_ids.parquet', '--keep=0.5'),
       'column `id` must hold integers, it holds double'),
      ('filter', fl(f'--scores={w}/str_values.parquet', '--keep=0.5'),
       'column `value` must hold numbers, it holds string'),
      ('filter', fl(f'--scores={w}/zeros.parquet', '--min_score=1'),
       "nothing of split 'train' is kept"),
      ('filter', fl(f'--scores={w}/int_split.parquet', '--keep=0.5'),
       'column `split` must hold split names (strings), it holds int64'),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={w}/a_file/out'], f"'{w}/a_file' is a file, not a folder"),
      ('filter', fl(rater, '--keep=0.5', '--split=dev'), "has no split 'dev'"),
      ('filter', fl(rater, '--keep=0.5', '--split=train[:50%]'),
       "is filtered by whole splits, not expressions like 'train[:50%]'"),
      ('filter', ['--dataset=no_such', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={w}/filtered'], "unknown dataset 'no_such'"),
      ('filter', [f'--dataset={w}/no_such_folder', rater, '--keep=0.5', f'--out={w}/filtered'],
       f"--dataset '{w}/no_such_folder' is not a TFDS dataset folder (no dataset_info.json)"),
      ('filter', fl(rater, '--keep=0.5', '--batch_size=0'), '--batch_size must be >= 1, got 0'),
      ('filter', fl(rater, '--min_score=0', '--balance'), '--balance needs --keep'),
      ('filter', fl(rater, '--min_score=0', '--threshold=streaming'),
       '--threshold=streaming needs --keep or --suggest_keep'),
      ('filter', fl(rater, '--keep=0.5', '--threshold=approx'),
       "value should be one of <exact|streaming>"),
      ('filter', fl(rater, '--keep=0.5', '--label_noise=2'),
       '--label_noise must be in [0, 1), got 2'),
      ('filter', fl(rater, '--keep=0.5', '--coordinator_address=127.0.0.1:1',
                    '--num_processes=2', '--process_id=5'), '--process_id must be in 0..1, got 5'),
      ('filter', fl(rater, '--keep=0.5', '--coordinator_address=nowhere', '--num_processes=2',
                    '--process_id=0'), "--coordinator_address must be HOST:PORT, got 'nowhere'"),
      ('filter', fl(rater, '--keep=0.5', '--coordinator_address=127.0.0.1:99999',
                    '--num_processes=2', '--process_id=0'),
       "--coordinator_address '127.0.0.1:99999': PORT must be in 1..65535, got 99999"),
      ('filter', fl(rater, '--keep=0.5', '--num_processes=2'),
       '--num_processes and --process_id need --coordinator_address'),
      ('filter', fl(rater, '--keep=0.5', '--noise_seed=-1'),
       f'--noise_seed must be in [0, {2**31 - 1}], got -1'),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={w}/rater'], "already exists (pass --overwrite to replace it)"),
  ]
  outside = f'--workdir={w}_val'  # runs refused only after fitting: their workdir is elsewhere
  val = lambda method, *extra: ('valuate', [data, f'--method={method}', *extra,
                                            f'--workdir={w}/val'])
  big = 2 ** 64
  in_ds = f"the TFDS dataset folder '{os.path.realpath(w)}/good_dataset'"
  cases += [
      (*val('tracin', '--config.valuation.layers=,'), "valuation.layers=',' names no layer"),
      (*val('mimic', '--config.valuation.mimic_layers=,'),
       "valuation.mimic_layers=',' names no layer"),
      ('export_rater', [f'--workdir={w}/run', f'--out={w}/run/checkpoints', '--overwrite'],
       f"--out '{w}/run/checkpoints' is inside --workdir '{w}/run'"),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={w}/rater/params', '--overwrite'],
       f"--out '{w}/rater/params' is inside --rater '{w}/rater'"),
      # A version folder of its own beside the source: plain tfds.builder loaded it instead.
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={tfds_dir}/sklearn_digits/9.0.0'],
       f"--out '{tfds_dir}/sklearn_digits/9.0.0' is inside --data_dir"),
      ('train', [data, '--config.train.seeds=(0,0)'], 'train.seeds repeats seed 0'),
      (*tr('--config.data.train_split=train[90%:10%]'),
       "split 'train[90%:10%]' of 'sklearn_digits' selects no examples (its end is before"),
      ('train', [data, '--config.data.eval_split=test[5:3]'],
       "split 'test[5:3]' of 'sklearn_digits' selects no examples (its end is before"),
      (*val('tracin', '--config.data.train_split=train[50:10]'),
       "split 'train[50:10]' of 'sklearn_digits' selects no examples (its end is before"),
      (*val('tracin', '--config.valuation.topk=2', '--config.valuation.topk_split=test[5:3]'),
       "split 'test[5:3]' of 'sklearn_digits' selects no examples (its end is before"),
      (*tr(f'--config.seed={big}'), f'seed must be <= {2**31 - 1}, got {big}'),
      ('train', [data, f'--config.train.seeds=({big},)'],
       f'train.seeds must hold integers <= {2**31 - 1}'),
      (*val('tracin', f'--config.valuation.seed={big}'), 'valuation.seed must be <= '),
      ('train', [data, f'--config.train.seeds=({2**31},)'],  # models train on int32 seeds
       f'train.seeds must hold integers <= {2**31 - 1}'),
      (*tr(f'--config.seed={2**29}', '--config.final_eval.num_models=4'),
       f'seed={2**29} is too large for final_eval.num_models=4'),
      (*val('tracin', '--config.valuation.tracin_project=True',
            f'--config.valuation.projection_seed={2**63}'),
       'valuation.projection_seed must be <= '),
      (*tr(f'--config.data.noise_seed={big}'), 'data.noise_seed must be <= '),
      ('filter', fl(rater, '--keep=0.5', f'--noise_seed={big}'),
       f'--noise_seed must be in [0, {2**31 - 1}], got {big}'),
      ('train', [f'--config.data.data_dir={w}/bad_info_data_dir'],
       f"TFDS dataset 'sklearn_digits' in data.data_dir '{w}/bad_info_data_dir': its "
       'dataset_info.json is unreadable'),
      (*tr(f'--config.data.data_dir={w}/bad_info_data_dir'),
       f"in data.data_dir '{w}/bad_info_data_dir': its dataset_info.json is unreadable"),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={w}/bad_info_data_dir', rater,
                  '--keep=0.5', f'--out={w}/filtered'],
       f"in --data_dir '{w}/bad_info_data_dir': its dataset_info.json is unreadable"),
      ('filter', fl(f'--rater={w}/negative_shape_rater', '--keep=0.5'),
       'has data_info.spec.image.shape [-1, 8, 1]'),
      ('filter', fl(f'--rater={w}/no_classes_rater', '--keep=0.5'),
       'has data_info.num_classes.label 0'),
      (*val('datarater', f'--config.valuation.rater={w}/no_classes_rater'),
       'has data_info.num_classes.label 0'),
      ('train', [f'--config.data.data_dir={w}/a_file'],
       f"data.data_dir '{w}/a_file' is a file, not a folder"),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={w}/a_file', rater, '--keep=0.5',
                  f'--out={w}/filtered'], f"--data_dir '{w}/a_file' is a file, not a folder"),
      ('train', ['--config.data.data_dir=/proc/tfds'],
       "data.data_dir '/proc/tfds': cannot prepare 'sklearn_digits' there"),
      (*val('tracin', '--config.valuation.store=True', '--config.valuation.store_k=100000'),
       'valuation.store_k=100000 makes a gradient store of at least'),
      ('valuate', [data, '--method=tracin', '--config.valuation.learning_rate=1e30',
                   '--config.valuation.train_steps=20', '--config.valuation.checkpoint_every=10',
                   outside], 'the models diverged; lower valuation.learning_rate (1e+30)'),
      ('valuate', [data, '--method=datarater', f'--config.valuation.rater={w}/huge_rater',
                   outside], f"(the rater valuation.rater='{w}/huge_rater' gives them)"),
      (*tr(out=f'--workdir={w}/rater'),
       f"--workdir '{w}/rater' holds an exported rater (rater.json)"),
      ('train', [data, f'--workdir={w}/rater'],  # it wrote its checkpoints into the rater
       f"--workdir '{w}/rater' holds an exported rater (rater.json)"),
      (*tr('--config.outer.learning_rate=1e39'),  # finite in float64 only: every loss NaN
       'outer.learning_rate must be finite in float32 (at most 3.403e+38 in size), got 1e+39'),
      ('train', [data, '--policy='], "unknown policy '' (choose from"),  # it took the config's
      (*tr('run'), "unexpected argument 'run' (flags are --name=value"),  # '--workdir=a run'
      ('train', [data, '--config.train.learning_rate=1e-46'],  # 0 in float32: nothing learnt
       'train.learning_rate must be > 0 in float32'),
      ('train', [data, '--config.train.batch_size=5000'],  # an epoch of one padded batch
       "train.batch_size=5000 is more than the 1197 examples of data.train_split='train'"),
      # Written into a dataset folder it does not read, a run changed that dataset's digest: a
      # run reading it by data.dataset_dir could no longer resume ('... changed since the
      # checkpoint'), and launch.filter --overwrite of it deleted the run.
      (*tr(out=f'--workdir={w}/good_dataset/run'),
       f"--workdir '{w}/good_dataset/run' is inside {in_ds}"),
      ('train', [data, f'--workdir={w}/good_dataset'],
       f"--workdir '{w}/good_dataset' is {in_ds}"),
      ('valuate', [data, '--method=tracin', f'--workdir={w}/good_dataset/val'],
       f"--workdir '{w}/good_dataset/val' is inside {in_ds}"),
      ('export_rater', [f'--workdir={w}/run', f'--out={w}/good_dataset/rater'],
       f"--out '{w}/good_dataset/rater' is inside {in_ds}"),
      ('filter', ['--dataset=sklearn_digits', f'--data_dir={tfds_dir}', rater, '--keep=0.5',
                  f'--out={w}/good_dataset/kept'],
       f"--out '{w}/good_dataset/kept' is inside {in_ds}"),
      # A subnormal float32 is 0 in XLA's arithmetic: the rater learnt nothing.
      (*tr('--config.outer.learning_rate=1e-45'),
       'outer.learning_rate must be > 0 in float32 (the computations\' type, in which a number '
       'below 1.175e-38 is 0), got 1e-45'),
      (*tr('--config.outer.clip_norm=1e-40'), 'outer.clip_norm must be > 0 in float32'),
      # Fields the run would not read, given the config's other fields (the run ignored them).
      ('train', [data, '--config.data.confusions=((3,5),)'], "--config.data.confusions is not "
       "read while data.label_noise_kind='symmetric'"),
      (*tr('--config.outer.mixed_segment=4'),
       "--config.outer.mixed_segment is not read while outer.meta_gradient='reverse'"),
      (*tr('--config.outer.mixed_recompute=replay'),
       "--config.outer.mixed_recompute is not read while outer.meta_gradient='reverse'"),
      ('train', [data, '--policy=sae', '--config.sae.l1_coef=0.5'],
       "--config.sae.l1_coef is not read while sae.sparsity='top_k'"),
      ('train', [data, '--policy=sae', '--config.sae.sparsity=l1', '--config.sae.k=4'],
       "--config.sae.k is not read while sae.sparsity='l1'"),
      ('train', [data, '--policy=sae', '--config.sae_scores.mislabel_guard=off',
                 '--config.sae_scores.mislabel_penalty=2'],
       "--config.sae_scores.mislabel_penalty is not read while sae_scores.mislabel_guard='off'"),
      ('train', [data, '--policy=sae', '--config.sae_scores.mislabel_knn=5'],
       "--config.sae_scores.mislabel_knn is not read while sae_scores.mislabel_rule='margin'"),
      (*val('tracin', '--config.valuation.topk_split=validation'),
       '--config.valuation.topk_split is not read while valuation.topk=0'),
      # Read only under two other fields, or a flag and a field: the seed of a corruption that
      # plants nothing, a projection that projects nothing, ghost norms no mode takes.
      (*tr('--config.data.label_noise=0', '--config.data.noise_seed=3'),
       '--config.data.noise_seed is not read while data.label_noise=0, data.input_corruption='),
      (*val('tracin', '--config.valuation.store_k=4'),
       '--config.valuation.store_k is not read while valuation.store=False, valuation.topk=0'),
      (*val('tracin', '--config.valuation.projection_seed=3'),
       '--config.valuation.projection_seed is not read while valuation.store=False, '
       'valuation.topk=0, valuation.tracin_project=False, --method=tracin'),
      (*val('mimic', '--config.valuation.projection_seed=3'),
       '--config.valuation.projection_seed is not read while valuation.store=False, '
       'valuation.topk=0, --method=mimic'),
      (*val('dvemb', '--config.valuation.projection=none', '--config.valuation.projection_seed=3'),
       "--config.valuation.projection_seed is not read while valuation.store=False, "
       "valuation.topk=0, valuation.projection='none'"),
      (*val('tracin', '--config.valuation.projection=gaussian'),
       '--config.valuation.projection is not read while valuation.tracin_project=False, '
       '--method=tracin'),
      (*val('tracin', '--config.valuation.store=True', '--config.valuation.tracin_ghost=False'),
       '--config.valuation.tracin_ghost is not read while valuation.store=True, valuation.topk=0, '
       '--method=tracin'),
      (*val('tracin', '--config.valuation.tracin_mode=heldout',
            '--config.valuation.tracin_ghost=False'),
       "--config.valuation.tracin_ghost is not read while valuation.tracin_mode='heldout'"),
      (*val('tracin', '--config.valuation.tracin_project=True',
            '--config.valuation.tracin_ghost=False'),
       '--config.valuation.tracin_ghost is not read while valuation.tracin_project=True'),
      # A field of another method: the scores were those of the config's value.
      (*val('tracin', '--config.valuation.mimic_layers=nope'),
       '--config.valuation.mimic_layers is not read by method tracin (it is read by mimic alone)'),
      (*val('dvemb', '--config.valuation.tracin_mode=heldout'),
       '--config.valuation.tracin_mode is not read by method dvemb'),
      # ml_collections made a tuple of the dict's keys: it trained seed 1 alone.
      ('train', [data, '--config.train.seeds={1: 2}'],
       '--config.train.seeds={1: 2} is a dict: give a tuple'),
      (*val('datarater', '--config.valuation.train_steps=50'),
       '--config.valuation.train_steps is not read by method datarater (it is read by tracin, '
       'mimic alone)'),
      (*val('datarater', '--config.valuation.store=True', '--config.valuation.store_k=4'),
       '--config.valuation.store_k is not read by method datarater'),
      # The rater's scores read no task (it was built to check the data), no run's evaluation
      # split; pixels trained no extractor; --policy named the policy.
      (*val('datarater', '--config.task.dtype=bfloat16'),
       '--config.task.dtype is not read by launch.valuate --method=datarater'),
      (*val('tracin', '--config.data.eval_split=test[:5]'),
       '--config.data.eval_split is not read by launch.valuate --method=tracin'),
      ('train', [data, '--policy=sae', '--config.features.extractor=pixels',
                 '--config.features.task.dtype=bfloat16'],
       "--config.features.task.dtype is not read while features.extractor='pixels'"),
      ('train', [data, '--policy=uniform', '--config.policy.name=sae'],
       '--config.policy.name is not read by launch.train with --policy=uniform'),
      # A path of whitespace named a folder ' ' in the current one (the rater exported there).
      ('export_rater', [f'--workdir={w}/run', '--out= '],
       "--out=' ' starts or ends with whitespace"),
      (*tr('--config.data.data_dir= '),
       "--config.data.data_dir=' ' starts or ends with whitespace"),
      ('train', [data, '--config.train.epochs=1', f'--workdir={w}/new_train '],
       f"--workdir='{w}/new_train ' starts or ends with whitespace"),
      # A stop past the run's end never fired: the run trained to its end.
      (*tr('--stop_after=7'), "--stop_after=7 is past the run's last outer step (outer.steps=6)"),
      ('train', [data, '--config.train.epochs=1', '--stop_after=2', f'--workdir={w}/new_train'],
       "--stop_after=2 is past the run's last epoch (train.epochs=1)"),
      # A policy that values the split itself ignored a valuation field it does not read.
      ('train', [data, '--policy=mimic', '--config.train.epochs=1',
                 '--config.valuation.mimic_keep_fraction=0.5'],
       '--config.valuation.mimic_keep_fraction is not read by policy mimic'),
      ('train', [data, '--policy=tracin_curriculum', '--config.train.epochs=1',
                 '--config.valuation.mimic_cosine=True'],
       '--config.valuation.mimic_cosine is not read by policy tracin_curriculum'),
      ('export_rater', [f'--workdir={w}/rater', f'--out={w}/new_rater'],
       f"--workdir '{w}/rater' is already an exported rater (rater.json)"),
      # A training run wrote its checkpoints and report into a valuation's folder.
      ('train', [data, f'--workdir={w}/val_out'],
       f"--workdir '{w}/val_out' holds a launch.valuate output (scores_tracin.json); give the "
       'training run a folder of its own'),
      (*tr(out=f'--workdir={w}/val_out'),
       f"--workdir '{w}/val_out' holds a launch.valuate output (scores_tracin.json)"),
  ]
  return cases


def _snapshot(root) -> dict:
  """Every file's size and time of last change (any write changes it) and every folder (an empty
  folder made by a refused run counts too)."""
  out = {}
  for folder, dirs, names in os.walk(root):
    out.update({os.path.relpath(os.path.join(folder, d), root): 'folder' for d in dirs})
    for name in names:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return out


NUM_CASES = 246  # the parametrisation below runs cases 0..NUM_CASES-1: it must be every case
# The world's snapshot after the last case (nothing else writes there between cases): the next
# case's snapshot before it, one walk of the world a case instead of two.
_AFTER = {}


def test_at_least_fifty_bad_inputs_across_every_launcher(tfds_dir, world):
  cases = _cases(tfds_dir, world)
  assert len(cases) >= 50 and {c[0] for c in cases} == set(LAUNCHERS)
  assert len(cases) == NUM_CASES, f'set NUM_CASES to {len(cases)}'


@pytest.mark.parametrize('index', range(NUM_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tfds_dir, world, index):
  cases = _cases(tfds_dir, world)
  if index >= len(cases):
    pytest.skip('no such case')
  launcher, argv, named = cases[index]
  before = _AFTER.pop(str(world), None) or _snapshot(world)
  err = io.StringIO()
  lock = None
  if any(a.endswith('/busy') for a in argv):  # another run holds this workdir
    lock = files.workdir_lock(str(world / 'busy'))
    lock.__enter__()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
        warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always', RuntimeWarning)  # e.g. numpy's overflow: a printed line
      code = cli.invoke(LAUNCHERS[launcher], [launcher, *argv])
  finally:
    if lock is not None:
      lock.__exit__(None, None, None)
  lines = [l for l in err.getvalue().splitlines() if l.strip()]
  lines += [f'{w.category.__name__}: {w.message}' for w in caught
            if issubclass(w.category, RuntimeWarning)]
  assert code == 2, (launcher, argv, err.getvalue()[-1500:])
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert named in lines[0], (named, lines[0])
  if lock is not None:  # the line names the process holding the workdir
    assert f'(process {os.getpid()})' in lines[0], lines[0]
  after = _snapshot(world)
  _AFTER[str(world)] = dict(after)
  if lock is not None:  # the holder wrote its pid into the lock file
    before.pop('busy/.lock', None), after.pop('busy/.lock', None)
  assert after == before, (launcher, argv)
  assert not any('.tmp-' in p for p in os.listdir(world))


def test_an_unknown_field_names_its_override_on_the_command_line_only_where_one_alone_holds_it(
    tfds_dir, tmp_path):
  """`python -m launch.train_rater` (the launcher's own flag parsing, not `cli.invoke`): an
  unknown config field is named with the one override that holds it; where two overrides hold
  it, with neither (the line would name one of them at random)."""
  from tests import forked  # pylint: disable=g-import-not-at-top
  from tests.conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  base = [f'--config.data.data_dir={tfds_dir}', f'--workdir={tmp_path / "run"}']
  one = forked.run('launch.train_rater', [*base, '--config.zzz.steps=4'], subprocess_env(1))
  assert one.returncode == 2, one.stderr[-2000:]
  assert one.stderr.strip() == "error: unknown config field 'zzz': --config.zzz.steps", one.stderr
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.invoke(LAUNCHERS['train_rater'], ['train_rater', *base, '--config.inner.zzz=1',
                                                 '--config.outer.zzz=2'])
  assert code == 2 and err.getvalue().strip() == "error: unknown config field 'zzz'", err.getvalue()
  assert not os.path.exists(tmp_path / 'run')


# (launcher, an override the config's other fields leave unread, the config and flags that leave
# it so, those that make the run read it): `config_checks.UNREAD_WHILE`'s rules, and
# launch.train's flags (under policy sae unless the row names a policy).
_SAE = ('--policy=sae', '--config.sae_scores.mislabel_guard=exclude')
UNREAD = [
    ('train', '--config.data.label_noise_kind=confusion', '--config.data.label_noise=0',
     '--config.data.label_noise=0.1'),
    ('train', '--config.sae_scores.mislabel_margin=0.5', '--config.sae_scores.mislabel_rule=knn',
     '--config.sae_scores.mislabel_rule=margin'),
    ('train', '--config.sae_scores.mislabel_rule=knn', '--config.sae_scores.mislabel_guard=off',
     '--config.sae_scores.mislabel_guard=exclude'),
    ('train', '--config.features.train_steps=9', '--config.features.extractor=pixels',
     '--config.features.extractor=penultimate'),
    ('train', '--config.features.task.hidden=(8,)', '--config.features.extractor=pixels',
     '--config.features.extractor=penultimate'),
    ('train', '--config.train.checkpoint_every=2', '--policy=sae', '--workdir=unused'),
    ('train', '--config.data.noise_seed=3', '--config.data.label_noise=0',
     '--config.data.label_noise=0 --config.data.input_corruption.blur=0.1'),
    ('train_rater', '--config.data.noise_seed=3', '--config.data.label_noise=0',
     '--config.data.label_noise=0.1'),
    ('valuate', '--config.valuation.store_k=4', '--method=mimic',
     '--method=mimic --config.valuation.store=True'),
    ('valuate', '--config.valuation.store_k=4', '--method=tracin',
     '--method=tracin --config.valuation.topk=3'),
    ('valuate', '--config.valuation.projection_seed=3', '--method=tracin',
     '--method=tracin --config.valuation.tracin_project=True'),
    ('valuate', '--config.valuation.projection_seed=3', '--method=mimic',
     '--method=mimic --config.valuation.store=True'),
    ('valuate', '--config.valuation.projection_seed=3',
     '--method=dvemb --config.valuation.projection=none', '--method=dvemb'),
    ('valuate', '--config.valuation.projection=gaussian', '--method=tracin',
     '--method=tracin --config.valuation.tracin_project=True'),
    ('valuate', '--config.valuation.projection_dim=4',
     '--method=tracin --config.valuation.tracin_project=True --config.valuation.store=True',
     '--method=tracin --config.valuation.tracin_project=True'),
    ('valuate', '--config.valuation.tracin_ghost=False',
     '--method=tracin --config.valuation.tracin_mode=heldout',
     '--method=tracin --config.valuation.tracin_mode=heldout_cos'),
    ('valuate', '--config.valuation.tracin_ghost=False',
     '--method=tracin --config.valuation.tracin_project=True', '--method=tracin'),
    ('valuate', '--config.valuation.projection_dim=4',
     '--method=dvemb --config.valuation.projection=none', '--method=dvemb'),
    # launch.train's tracin_curriculum values the split as launch.valuate --method=tracin does.
    ('train', '--config.valuation.projection=gaussian', '--policy=tracin_curriculum',
     '--policy=tracin_curriculum --config.valuation.tracin_project=True'),
    ('train', '--config.valuation.projection_seed=3', '--config.policy.name=tracin_curriculum',
     '--config.policy.name=tracin_curriculum --config.valuation.tracin_project=True'),
    ('train', '--config.valuation.projection_dim=4',
     '--policy=tracin_curriculum --config.valuation.tracin_project=True '
     '--config.valuation.projection=none',
     '--policy=tracin_curriculum --config.valuation.tracin_project=True'),
]


def _parse(launcher: str, argv: list[str]):
  """(exit code, error output) of a launcher's flag parsing and `check_flags` on `argv`."""
  module = LAUNCHERS[launcher]
  fv = flags.FlagValues()
  module.define_flags(fv, [launcher, *argv])
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      if cli.parse_flags([launcher, *argv], module.__doc__, fv):
        module.check_flags(fv)
  except SystemExit as e:
    return e.code, err.getvalue()
  except UserError as e:
    return 2, str(e)
  return 0, err.getvalue()


@pytest.mark.parametrize('launcher, field, unread, read', UNREAD)
def test_an_override_the_config_leaves_unread_is_refused_and_one_it_reads_is_not(
    launcher, field, unread, read):
  """Refused at flag parsing in one line naming it (no run: the bad-input cases run the
  launchers); the same override where the run reads it parses."""
  base = list(_SAE) if launcher == 'train' and 'policy' not in read else []
  code, out = _parse(launcher, [*base, *unread.split(), field])
  assert code == 2 and f'{field.split("=")[0]} is not read' in out, (code, out)
  assert len(out.strip().splitlines()) == 1, out
  assert _parse(launcher, [*base, *read.split(), field]) == (0, '')


def _override(field: str, shown: str) -> str:
  """The --config override of `field` to the value --help shows (its repr)."""
  value = ast.literal_eval(shown)
  return f'--config.{field}={value if isinstance(value, str) else shown}'


def _help_fields(launcher: str, argv: list[str]) -> dict[str, str]:
  """{dotted field: its value's repr} of the config fields a launcher's --help lists with the
  flags `argv`."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    assert cli.invoke(LAUNCHERS[launcher], [launcher, *argv, '--help']) == 0
  return dict(l[len('  --config.'):].split('=', 1) for l in out.getvalue().splitlines()
              if l.startswith('  --config.'))


@pytest.mark.parametrize('launcher, argv, unread', [
    ('train_rater', '', 'train'), ('train', '', 'inner'), ('train', '--policy=sae', 'valuation'),
    ('valuate', '--method=tracin', 'train'), ('valuate', '--method=datarater', 'task')])
def test_help_lists_the_config_fields_the_launcher_reads_and_no_other(launcher, argv, unread):
  """--help listed every field of the config, a run of launch.train_rater refusing those of
  train, policy, valuation and sae as unread. The oracle is the launcher's own refusal (flag
  parsing and `check_flags`, `_parse`): every field listed, overridden, passes it (all at once),
  and the first field of each section left out (`unread` among them), and each field left out of
  a section listed, is refused as unread."""
  argv = argv.split()
  listed = _help_fields(launcher, argv)
  assert listed and _parse(launcher, [*argv, *map(_override, listed, listed.values())]) == (0, '')
  fv = flags.FlagValues()
  LAUNCHERS[launcher].define_flags(fv, [launcher, *argv])
  fv([launcher, *argv])
  every = {f: repr(v) for f, v in cli._leaves(fv.config)}  # pylint: disable=protected-access
  sections = {f.split('.')[0] for f in listed}
  left_out = {f.split('.')[0]: f for f in sorted(every, reverse=True)
              if f.split('.')[0] not in sections}  # the first field of each section left out
  assert unread in left_out, left_out
  left_out.update({f: f for f in every if f not in listed and f.split('.')[0] in sections})
  for field in left_out.values():
    code, out = _parse(launcher, [*argv, _override(field, every[field])])
    assert code == 2 and f'--config.{field} is not read' in out, (field, code, out)


def _tracin_valuers() -> list[str]:
  """The launch.valuate method and the launch.train policies whose runs value the split with
  TracIn (`policies.VALUATION`), by the flags that choose them."""
  from datarater import policies  # pylint: disable=g-import-not-at-top
  return ['valuate --method=tracin', *(f'train {flag}={name}' for name, method in
                                       sorted(policies.VALUATION.items()) if method == 'tracin'
                                       for flag in ('--policy', '--config.policy.name'))]


@pytest.mark.parametrize('store', ['--config.valuation.store=True', '--config.valuation.topk=3'])
@pytest.mark.parametrize('valuer', _tracin_valuers())
def test_tracins_own_projection_beside_a_store_is_refused_for_the_reason_of_each_run(
    valuer, store):
  """TracIn's own projection settings beside valuation.store or topk: the refusal said "TracIn's
  scores come from the gradient store", which only launch.valuate's are; a policy valuing the
  split itself (tracin_curriculum) computes its scores without one, and refuses the store and
  top-k table (its own check, below). Now the line says both, and its advice, which drops
  them, still parses."""
  launcher, flag = valuer.split()
  for field in ('--config.valuation.tracin_project=True', '--config.valuation.tracin_ghost=False'):
    code, out = _parse(launcher, [flag, store, field])
    assert code == 2 and len(out.strip().splitlines()) == 1, (code, out)
    assert out.startswith(f'error: {field.split("=")[0]} is not read while '), out
    assert out.rstrip().endswith(
        " (a gradient store or top-k table is launch.valuate's, whose TracIn scores then come "
        'from the store, projected by valuation.store_k; a policy that values the split itself '
        'refuses both); give --config.valuation.store=False and valuation.topk=0 too'), out
    assert _parse(launcher, [flag, field]) == (0, '')  # the advice taken
  if launcher == 'train':  # the policy's own refusal of the store, without the field
    from datarater import policies  # pylint: disable=g-import-not-at-top
    from datarater.policies import weighting  # pylint: disable=g-import-not-at-top
    fv = flags.FlagValues()
    train.define_flags(fv, ['train', flag, store])
    fv(['train', flag, store])
    name = flag.split('=')[1]
    context = policies.PolicyContext(None, None, None, fv.config)
    with pytest.raises(UserError, match=f'policy {name} computes its values without valuation'):
      weighting.refuse_valuate_outputs(context, name, policies.VALUATION[name])


def test_final_eval_train_steps_without_fresh_models_is_accepted_where_the_report_reads_it(
    tmp_path):
  """With final_eval.num_models 0 no fresh model is trained, but report.json records
  final_eval whole and a finished run given another train_steps reports again
  (`meta_train._finished_report`): the override is not refused (`config_checks.UNREAD_WHILE`'s
  note), as it is not where models are trained."""
  from datarater.meta_train import _finished_report  # pylint: disable=g-import-not-at-top
  for models in ('0', '2'):
    assert _parse('train_rater', [f'--config.final_eval.num_models={models}',
                                  '--config.final_eval.train_steps=7']) == (0, '')
  config = small_config(str(tmp_path))
  report = {'outer_steps': config.outer.steps, 'final_eval': config.final_eval.to_dict(),
            'noise_auroc': 0.5, 'fresh_models': {}}
  assert report['final_eval']['num_models'] == 0
  files.write_json(str(tmp_path / 'report.json'), report)
  assert _finished_report(str(tmp_path / 'report.json'), config) == report
  config.final_eval.train_steps += 1
  assert _finished_report(str(tmp_path / 'report.json'), config) is None


def test_the_job_stop_after_a_flag_error_reads_a_flagfile_that_is_not_text_without_a_traceback(
    tmp_path):
  """After a flag error's line, a launcher rereads its own flags to stop a multi-process job
  (`distributed.stop_job_after_flag_error`): a --flagfile that is not text (the error's cause)
  names no job, and nothing more is printed (a UnicodeDecodeError traceback followed the line)."""
  from launch import distributed  # pylint: disable=g-import-not-at-top
  binary = tmp_path / 'flags'
  binary.write_bytes(bytes(range(128, 256)))
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  assert distributed.stop_job_after_flag_error(['train', f'--flagfile={binary}'], fv) is None
