r"""How well each valuation separates label-noise examples from clean ones, over seeds.

  python -m bench.valuation_noise                          # 3 seeds, every gradient method
  python -m bench.valuation_noise --seeds=0 --rater_workdir=RUN   # + a trained DataRater

On sklearn_digits with 20% symmetric label noise (configs/valuate.py), per seed s (noise seed,
initialisation and data order all = s): each method's values over the training split and the
AUROC P(value of a clean example > value of a corrupted one). Also: data value embedding's value
by training phase, and TracIn curricula from two value sources (negative self-influence, and
Grad-Cos influence on the held-out set): fresh models trained with soft loss weights, soft
sampling weights or a hard top-20% subset, against uniform, scored by test accuracy; and
Grad-Mimic online (per-batch softmax weights of the Mimic scores during training) vs uniform. Writes
bench/results/valuation_noise.json and .png.
"""
import json
import os
import platform
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np

from configs.valuate import get_config
from datarater import checkpointing, models
from datarater.data import pipeline
from datarater.evaluation import noise_auroc
from datarater.valuation import base, factory, tracin
from datarater.valuation import mimic as mimic_lib
from inner_loop.optimizers import make_inner_optimizer
from inner_loop.unroll import init_inner_state

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (noise, init, data order).')
_VARIANTS = flags.DEFINE_list(
    'variants', ['tracin_self', 'tracin_heldout', 'tracin_heldout_cos', 'mimic', 'mimic_cos',
                 'mimic_all_layers', 'dvemb'], 'Which valuations to run.')
_RATER = flags.DEFINE_string('rater_workdir', '', 'A train_rater workdir: adds the DataRater.')
_CURRICULUM = flags.DEFINE_bool('curriculum', True, 'Run the TracIn curriculum comparison.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir ("" = default).')
_OUT = flags.DEFINE_string('out', 'bench/results/valuation_noise', 'Output prefix (.json, .png).')

VARIANTS = {  # name -> (method, config overrides)
    'tracin_self': ('tracin', {'tracin_mode': 'self'}),
    'tracin_heldout': ('tracin', {'tracin_mode': 'heldout'}),
    'tracin_heldout_cos': ('tracin', {'tracin_mode': 'heldout_cos'}),
    'mimic': ('mimic', {}),
    'mimic_cos': ('mimic', {'mimic_cosine': True}),
    'mimic_all_layers': ('mimic', {'mimic_layers': ''}),
    'dvemb': ('dvemb', {}),
    'datarater': ('datarater', {}),
}


CURRICULUM_SOURCES = ('tracin_self', 'tracin_heldout_cos')  # values that drive a curriculum


def seeded_config(seed: int, data_dir: str, overrides: dict):
  config = get_config()
  config.data.data_dir = data_dir
  config.data.noise_seed = seed
  config.valuation.order_seed = seed
  config.valuation.init_seed = seed
  for k, val in overrides.items():
    config.valuation[k] = val
  return config


def curriculum(config, train, test, values: np.ndarray, seed: int) -> dict:
  """Test accuracy of fresh models (2 inits) trained uniformly vs with curriculum weights."""
  v = config.valuation
  task, loss_fn, _ = factory.task_problem(config, train)
  steps, b = v.train_steps, v.batch_size
  fixed = pipeline.stream_indices(len(train), 0, steps * b, seed + 100).reshape(steps, b)
  soft = tracin.curriculum_weights(values, 'weight', temperature=1.0)
  hard = tracin.curriculum_weights(values, 'select', fraction=0.2)
  setups = {
      'uniform': (fixed, None),
      'loss_weights': (fixed, soft[fixed]),
      'sampling_weights': (tracin.sample_order(soft, steps, b, seed + 100), None),
      'select_top20': (tracin.sample_order(hard, steps, b, seed + 100), None),
  }
  evaluate = jax.jit(lambda p: models.accuracy(task.apply, p, {'image': test.image,
                                                               'label': test.label}))
  out = {}
  for name, (order, weights) in setups.items():
    accs = []
    for init in range(2):
      params = task.init(jax.random.key(1000 + 10 * seed + init), train.image[:1])
      w = None if weights is None else jnp.asarray(weights, jnp.float32)
      run = jax.jit(lambda bt, w: base.record_run(loss_fn, params, bt, v.learning_rate, steps,
                                                  v.optimizer, w))(train.take(order), w)
      accs.append(float(evaluate(run.final_params)))
    out[name] = float(np.mean(accs))
  return out


def mimic_online(config, train, heldout, test, temperatures=(1.0, 0.1)) -> dict:
  """Test accuracy after training with Grad-Mimic's online softmax weights vs uniform weights.

  Same initialisation and data order for both; the reference is trained on the held-out split.
  """
  v = config.valuation
  task, loss_fn, params = factory.task_problem(config, train)
  reference = factory.record(config, loss_fn, params, heldout, v.reference_steps,
                             v.reference_steps).final_params
  batches = base.fixed_order_batches(train, v.train_steps, v.batch_size, v.order_seed)
  first = jax.tree.map(lambda x: x[0], batches)
  layers = mimic_lib.resolve_layers(loss_fn, params, first, factory.parse_layers(v.mimic_layers))
  opt = make_inner_optimizer(v.optimizer, v.learning_rate)
  online = lambda b, tau: jax.jit(lambda b: mimic_lib.train_online(
      loss_fn, opt, init_inner_state(params, opt), b, reference, tau, layers)[0].params)(b)
  uniform = factory.record(config, loss_fn, params, train, v.train_steps, v.train_steps)
  test_batch = {'image': test.image, 'label': test.label}
  acc = lambda p: float(models.accuracy(task.apply, p, test_batch))
  out = {'uniform': acc(uniform.final_params), 'reference_only': acc(reference)}
  for tau in temperatures:
    out[f'mimic_online_tau{tau:g}'] = acc(online(batches, tau))
  return out


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / tfds chatter off
  variants = list(_VARIANTS.value) + (['datarater'] if _RATER.value else [])
  results = {'platform': platform.platform(), 'device': jax.devices()[0].device_kind,
             'auroc': {n: {} for n in variants}, 'seconds': {n: {} for n in variants},
             'dvemb_phase': {}, 'curriculum': {}, 'mimic_online': {},
             'rater_workdir': _RATER.value or None,
             'note': 'AUROC = P(value of a clean example > value of a corrupted one); the rater, '
                     'if any, was trained by launch.train_rater on the noise of its own config'}
  data_dir = _DATA_DIR.value
  for s in map(int, _SEEDS.value):
    base_cfg = seeded_config(s, data_dir, {})
    d = base_cfg.data
    train = pipeline.load_split(d.name, d.train_split, d.data_dir, d.label_noise, d.noise_seed)
    heldout = pipeline.load_split(d.name, d.heldout_split, d.data_dir)
    test = pipeline.load_split(d.name, d.eval_split, d.data_dir)
    for name in variants:
      method, overrides = VARIANTS[name]
      config = seeded_config(s, data_dir, dict(overrides, rater_workdir=_RATER.value))
      t0 = time.perf_counter()
      val = factory.build(method, config, train, heldout)
      values = base.score_split(val.value, train, config.valuation.score_batch_size,
                                progress=False)
      secs = time.perf_counter() - t0
      auc = noise_auroc(values, train.is_corrupted)
      results['auroc'][name][str(s)] = auc
      results['seconds'][name][str(s)] = secs
      print(f'seed {s} {name:20s} AUROC {auc:.3f}  ({secs:.1f} s)', flush=True)
      if name == 'dvemb':
        phases = val.phase_values()
        results['dvemb_phase'][str(s)] = {
            'mean_abs_value': [float(np.mean(np.abs(p))) for p in phases],
            'auroc': [noise_auroc(p, train.is_corrupted) for p in phases]}
        print(f'  dvemb by phase (early, middle, late): {results["dvemb_phase"][str(s)]}')
      if name == 'mimic' and _CURRICULUM.value:
        results['mimic_online'][str(s)] = mimic_online(config, train, heldout, test)
        print(f'  mimic online vs uniform: test accuracy {results["mimic_online"][str(s)]}')
      if name in CURRICULUM_SOURCES and _CURRICULUM.value:
        cur = results['curriculum'].setdefault(name, {})
        cur[str(s)] = curriculum(config, train, test, values, s)
        print(f'  curriculum from {name}: test accuracy {cur[str(s)]}', flush=True)
  summary = {}
  for name in variants:
    vals = np.array(list(results['auroc'][name].values()))
    summary[name] = {'mean': float(vals.mean()), 'std': float(vals.std()), 'per_seed': vals.tolist()}
  results['summary'] = summary
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  checkpointing.write_json_atomic(_OUT.value + '.json', results)
  plot(results, _OUT.value + '.png')
  print(json.dumps(summary, indent=1))


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results['summary'])
  fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.4),
                                     gridspec_kw={'width_ratios': [2, 1, 0.8]})
  for i, n in enumerate(names):
    per_seed = results['summary'][n]['per_seed']
    ax.bar(i, np.mean(per_seed), color='C0', alpha=0.6)
    ax.plot([i] * len(per_seed), per_seed, 'k.', ms=8)
  ax.axhline(0.85, color='r', ls='--', lw=1, label='0.85 target (TracIn self, Mimic)')
  ax.axhline(0.5, color='gray', ls=':', lw=1, label='chance')
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right')
  ax.set(ylim=(0.0, 1.0), ylabel='AUROC clean vs corrupted',
         title='Separating 20% label noise on sklearn_digits (bars: mean, dots: seeds)')
  ax.legend(loc='lower right', fontsize=8)
  sources = results.get('curriculum') or {}
  lows = []
  for j, (source, cur) in enumerate(sources.items()):
    keys = list(next(iter(cur.values())))
    means = [np.mean([c[k] for c in cur.values()]) for k in keys]
    lows.append(min(min(c.values()) for c in cur.values()))
    x = np.arange(len(keys)) + 0.4 * j
    ax2.bar(x, means, 0.4, color=f'C{j + 2}', alpha=0.7, label=f'values: {source}')
    for i, k in enumerate(keys):
      ax2.plot([x[i]] * len(cur), [c[k] for c in cur.values()], 'k.', ms=6)
    ax2.set_xticks(np.arange(len(keys)) + 0.2, keys, rotation=30, ha='right')
  if sources:
    ax2.set(ylim=(max(0.0, min(lows) - 0.05), 1.0), ylabel='test accuracy',
            title='TracIn curriculum (fresh models)')
    ax2.legend(fontsize=8, loc='lower left')
  phases = results.get('dvemb_phase') or {}
  if phases:
    names3 = ['early', 'middle', 'late']
    for s, p in phases.items():
      ax3.plot(names3, p['mean_abs_value'], 'o-', color='C4', alpha=0.7)
    ax3.set(yscale='log', ylabel='mean |value| (predicted LOO change of held-out loss)',
            title='Data value embedding by phase')
    ax3b = ax3.twinx()
    for s, p in phases.items():
      ax3b.plot(names3, p['auroc'], 's--', color='C1', alpha=0.7)
    ax3b.set_ylabel('noise AUROC of the phase value (dashed)')
    ax3b.set_ylim(0.4, 1.0)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)


if __name__ == '__main__':
  app.run(main)
