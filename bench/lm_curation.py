r"""Curating real text for a transformer language model: the DataRater paper's experiment, end to end.

  python -m bench.lm_curation          # configs/text_bench.py (experiment) and its 'bench' part

Per seed s (it seeds the rater's meta-training, the valuations' recorded runs, the random subsets
and the fresh models' initialisation and data order), on the corpus of `--config` (python_text:
clean prose, code, and prose corrupted in five recorded kinds):
1. a DataRater is meta-learned through small inner language models (`datarater.meta_train`, the
   config's task/rater/inner/outer sections) and exported (`datarater.export`); TracIn
   (self-influence from ghost dot products), Grad-Mimic and data value embedding (factored
   Kronecker projections) are fitted on the same small model through the same per-example layer
   (`datarater.valuation.factory`, the config's `valuation` section), the exported rater is read
   back through the same factory (method `datarater`);
2. what each learned: AUROC of every corruption kind (and of code) against clean prose, and the
   rater's mean weight N * softmax(score / tau) per domain and per corruption kind;
3. corpora: all data, the oracle (the recorded bad data removed), and at each keep fraction a
   uniformly random subset and each method's top-scored subset (`curation.select.select_top`,
   the exact top-k of `launch.filter`);
4. on each corpus a fresh, larger language model (`bench.transfer`: the rater transfers to a model
   bigger than its inner ones) is trained with the one trainer for the same number of steps, its
   test loss evaluated along the way (`bench.compare.train_run`). A corpus smaller than the
   steps' sequences takes a short last batch each epoch, so over several epochs it sees up to
   one batch an epoch fewer tokens (0.4% in `lm_long_transfer`; none at 128 steps).
Reported over seeds: the final test loss (paired differences against all data and the random
subset of the same size), the tokens a corpus needs to reach all data's final test loss as a
fraction of all data's tokens (linear interpolation between evaluations; the DataRater paper's
compute-saving measure), what each method cost in tokens (the rater's meta-training counted as in
`datarater.export.rater_training_compute`, a lower bound: the meta-backward is not counted) and
the net saving, in tokens of the small model and scaled to the larger one by parameter count.
Acceptance, decided before the long run: AUROC >= 0.9 of random bytes, shuffled words and
boilerplate against clean prose for the rater of every seed; at `bench.primary_keep` (0.7 in
configs/text_bench.py) every seed's DataRater-filtered model reaches all data's final test loss
within 0.8 of the tokens and ends below the random subset of the same size. No choice is made on
the test split (it only gives the reported curves). Writes <out>.json, .md and .png.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import os
import platform
import shutil
import tempfile
import time

from absl import flags
import jax
import numpy as np

from bench import cli as bench_cli
from bench import compare
from bench import provenance
from bench.runs import splits_and_task
from datarater import config_checks, evaluation, export, files, tasks
from datarater.curation import select
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.meta_train import meta_train
from datarater.policies import weighting
from datarater.valuation import factory
from datarater.valuation.run import RunCache
from launch import cli

FLAGS = flags.FLAGS

ACCEPTANCE_KINDS = ('random_bytes', 'shuffled_words', 'boilerplate')
AUROC_GOAL, FRACTION_GOAL = 0.9, 0.8


def seeded(config, seed: int):
  c = config.copy_and_resolve_references()
  c.seed = c.valuation.seed = seed
  return c


def num_params(task, info) -> int:
  del info
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(
      jax.eval_shape(task.init, jax.random.PRNGKey(0)))))


def groups(split) -> dict:
  """Boolean masks of the corpus's groups: clean prose, code, each corruption kind."""
  domain = split.features['domain']
  names = split.info.class_names['domain']
  out = {'clean prose': (domain == names.index('prose')) & ~split.is_corrupted,
         'code': domain == names.index('code')}
  for k, kind in enumerate(split.corruption_kinds[1:], 1):
    out[kind] = split.corruption == k
  return out


def learned(values: np.ndarray, split, temperature=None) -> dict:
  """AUROC of each corruption kind (and of code) against clean prose; with `temperature`, the
  mean weight N * softmax(values / temperature) of every group."""
  g = groups(split)
  prose = ~g['code']  # code is never corrupted: the prose rows are clean prose and every kind
  out = {'auroc': evaluation.auroc_by_kind(values[prose], split.corruption[prose],
                                           split.corruption_kinds)}
  against_code = g['clean prose'] | g['code']
  out['auroc']['code'] = evaluation.noise_auroc(values[against_code], g['code'][against_code])
  if temperature is not None:
    z = values / temperature
    w = np.exp(z - z.max())
    w = w / w.mean()
    out['mean_weight'] = {name: float(w[mask].mean()) for name, mask in g.items()}
    names = split.info.class_names['domain']
    out['mean_weight_domain'] = {f'all {d}': float(w[split.features['domain'] == i].mean())
                                 for i, d in enumerate(names)}
  return out


def run_seed(config, bench, seed: int, tmp: str) -> dict:
  c = seeded(config, seed)
  train, heldout, test, small = splits_and_task(c)
  seconds, values, cost = {}, {}, {}
  t0 = time.time()
  print(f'seed {seed}: training the rater ({c.outer.steps} outer steps) ...', flush=True)
  meta_train(c, os.path.join(tmp, 'rater_run'))
  c.valuation.rater = os.path.join(tmp, 'rater')
  export.export_rater(os.path.join(tmp, 'rater_run'), c.valuation.rater)
  seconds['rater_training'] = time.time() - t0
  cache = RunCache(os.path.join(tmp, 'runs'), f'seed{seed}')  # TracIn and Mimic share a run
  for m in bench.methods:
    t0 = time.time()
    print(f'seed {seed}: {m} values of {len(train)} sequences ...', flush=True)
    valuation = factory.build(m, c, small, train, heldout, cache)
    values[m] = np.asarray(valuation.values(train, c.valuation.score_batch_size), np.float64)
    cost[m] = int(valuation.example_gradients)
    seconds[m] = time.time() - t0
  out = {'learned': {m: learned(values[m], train,
                                c.rater.temperature if m == 'datarater' else None)
                     for m in bench.methods},
         'setup_example_gradients': cost, 'num_train': len(train)}

  t0 = time.time()
  n = len(train)
  corpora = {('all', None): np.arange(n), ('oracle', None): np.flatnonzero(~train.is_corrupted)}
  order = np.random.default_rng([seed, 7]).permutation(n)
  for k in bench.keeps:
    corpora[('random', k)] = np.sort(order[:select.keep_count(n, k)])
    for m in bench.methods:
      corpora[(m, k)] = np.flatnonzero(select.select_top(values[m], k, train.ids))
  big = tasks.make_task(bench.transfer.task, train.info)
  t = bench.transfer
  runs = {}
  for i, ((name, k), idx) in enumerate(corpora.items()):
    print(f'seed {seed}: language model {i + 1}/{len(corpora)} on {name}'
          f'{"" if k is None else f" keep {k:g}"} ({len(idx)} sequences, {t.steps} steps) ...',
          flush=True)
    part = train.subset(idx)
    uniform = weighting.weighting_policy('uniform', len(part))
    r = compare.train_run(big, t, part, test, uniform, seed, 'loss', t.evals,
                          section_name='bench.transfer', steps=t.steps)
    r['kept'] = {g: int(mask[idx].sum()) for g, mask in groups(train).items()}
    runs.setdefault(name, {})['-' if k is None else f'{k:g}'] = r
  seconds['language_models'] = time.time() - t0
  out.update(runs=runs, seconds=seconds)
  return out


def _fraction(curve, target):
  """Tokens (as a fraction of the curve's last step) at which a loss curve reaches `target`."""
  reached = compare.steps_to_reach(curve, target, higher_is_better=False, interpolate=True)
  return None if reached is None else reached / curve[-1][0]


def summarize(seeds: dict, bench, tokens_per_example: int, param_ratio: float) -> dict:
  rs = list(seeds.values())
  budget = bench.transfer.steps * bench.transfer.batch_size * tokens_per_example
  all_loss = [r['runs']['all']['-']['loss'] for r in rs]
  s = {'budget_tokens': budget, 'param_ratio_small_to_large': param_ratio,
       'all': compare.stats(all_loss, 1.0), 'corpora': {}}

  def corpus(name, k):
    got = [r['runs'][name][k] for r in rs]
    loss = [x['loss'] for x in got]
    fractions = [_fraction(x['curve'], r['runs']['all']['-']['loss']) for x, r in zip(got, rs)]
    reached = [f for f in fractions if f is not None]
    kept = {g: float(np.mean([x['kept'][g] for x in got])) for g in got[0]['kept']}
    row = {**compare.stats(loss, 1.0), 'vs_all': compare.paired(loss, all_loss, 1.0),
           'fraction_to_all': fractions,
           'fraction_mean': float(np.mean(reached)) if len(reached) == len(rs) else None,
           'fraction_std': float(np.std(reached)) if len(reached) == len(rs) else None,
           'num_train': int(np.mean([x['num_train'] for x in got])), 'kept': kept}
    if name not in ('all', 'oracle', 'random'):
      rand = [r['runs']['random'][k]['loss'] for r in rs]
      row['vs_random'] = compare.paired(loss, rand, 1.0)
      row['beats_random_every_seed'] = bool(all(a < b for a, b in zip(loss, rand)))
    return row

  s['corpora']['oracle'] = {'-': corpus('oracle', '-')}
  for name in ('random', *bench.methods):
    s['corpora'][name] = {f'{k:g}': corpus(name, f'{k:g}') for k in bench.keeps}
  s['learned'] = {}
  for m in bench.methods:
    per_seed = [r['learned'][m] for r in rs]
    s['learned'][m] = {
        part: {g: {'mean': float(np.mean([p[part][g] for p in per_seed])),
                   'std': float(np.std([p[part][g] for p in per_seed])),
                   'per_seed': [p[part][g] for p in per_seed]} for g in per_seed[0][part]}
        for part in per_seed[0]}
  s['cost'] = {}
  for m in bench.methods:
    tokens = float(np.mean([r['setup_example_gradients'][m] for r in rs])) * tokens_per_example
    s['cost'][m] = {'tokens': tokens, 'large_model_tokens': tokens * param_ratio, 'net_saving': {}}
    for k in bench.keeps:
      f = s['corpora'][m][f'{k:g}']['fraction_mean']
      saved = None if f is None else (1 - f) * budget
      s['cost'][m]['net_saving'][f'{k:g}'] = {
          'saved_tokens': saved,
          'net_tokens': None if saved is None else saved - tokens,
          'net_large_model_tokens': None if saved is None else saved - tokens * param_ratio}
  p = f'{bench.primary_keep:g}'
  dr = s['corpora']['datarater'][p] if 'datarater' in bench.methods else None
  auroc = s['learned'].get('datarater', {}).get('auroc', {})
  s['acceptance'] = {
      'primary_keep': bench.primary_keep,
      'auroc_at_least_0.9_every_seed': {
          kind: bool(min(auroc[kind]['per_seed']) >= AUROC_GOAL) for kind in ACCEPTANCE_KINDS
          if kind in auroc},
      'fraction_at_most_0.8_every_seed': None if dr is None else bool(
          all(f is not None and f <= FRACTION_GOAL for f in dr['fraction_to_all'])),
      'beats_random_every_seed': None if dr is None else dr['beats_random_every_seed']}
  return s


def _fmt_fraction(row) -> str:
  if row['fraction_mean'] is not None:
    return f'{row["fraction_mean"]:.2f} ± {row["fraction_std"]:.2f}'
  return '/'.join('-' if f is None else f'{f:.2f}' for f in row['fraction_to_all'])


def markdown(s: dict, bench, config, wall_s: float) -> str:
  t = bench.transfer
  kinds = list(next(iter(s['learned'].values()))['auroc'])
  lines = [
      f'python_text, {len(bench.seeds)} seeds, {wall_s / 60:.1f} min. Fresh language models '
      f'(d_model {t.task.d_model}, {t.task.num_layers} blocks) trained {t.steps} steps x '
      f'{t.batch_size} sequences ({s["budget_tokens"] / 1e3:.0f}k tokens) on each corpus; test '
      f'loss (nats/byte) on {config.data.eval_split}, mean ± std over seeds; differences with '
      'paired standard errors; "tokens to all" = tokens a corpus needs to reach all data\'s final '
      'test loss, as a fraction of all data\'s (per-seed values when a seed never reaches it).',
      '', '| corpus | keep | sequences | test loss | - all data | - random | tokens to all | '
      'corrupted kept | code kept |', '|---|---|---|---|---|---|---|---|---|']
  fmt = lambda x: f'{x["mean"]:.4f} ± {x["std"]:.4f}'
  dif = lambda x: f'{x["diff"]:+.4f} ± {x["se"]:.4f}'
  a = s['all']
  lines.append(f'| all data | 1.0 | | {fmt(a)} | | | 1.00 | | |')
  for name, rows in s['corpora'].items():
    for k, row in rows.items():
      bad = sum(v for g, v in row['kept'].items() if g not in ('clean prose', 'code'))
      lines.append(f'| {name} | {k} | {row["num_train"]} | {fmt(row)} | {dif(row["vs_all"])} | '
                   f'{dif(row["vs_random"]) if "vs_random" in row else ""} | '
                   f'{_fmt_fraction(row)} | {bad:.0f} | {row["kept"]["code"]:.0f} |')
  lines += ['', 'What each method learned: AUROC of each corruption kind (and code) against clean '
            'prose on the training corpus (1 = every clean prose sequence valued above every '
            'sequence of the kind), mean ± std over seeds, per-seed values in brackets.', '',
            '| method | ' + ' | '.join(kinds) + ' |', '|---|' + '---|' * len(kinds)]
  for m, got in s['learned'].items():
    lines.append(f'| {m} | ' + ' | '.join(
        f'{got["auroc"][k]["mean"]:.3f} ± {got["auroc"][k]["std"]:.3f} ['
        + ', '.join(f'{v:.2f}' for v in got['auroc'][k]['per_seed']) + ']' for k in kinds) + ' |')
  if 'datarater' in s['learned'] and 'mean_weight' in s['learned']['datarater']:
    w = s['learned']['datarater']['mean_weight']
    wd = s['learned']['datarater']['mean_weight_domain']
    lines += ['', 'The rater\'s mean weight N * softmax(score / tau) per group (1 = average), '
              'mean ± std over seeds:', '',
              '| ' + ' | '.join(list(wd) + list(w)) + ' |', '|' + '---|' * (len(wd) + len(w)),
              '| ' + ' | '.join(f'{x["mean"]:.2f} ± {x["std"]:.2f}'
                                for x in list(wd.values()) + list(w.values())) + ' |']
  lines += ['', f'Cost and net saving (tokens; the budget of one training run is '
            f'{s["budget_tokens"] / 1e3:.0f}k). A method\'s cost is counted in tokens through the '
            f'small model it was fitted on, and scaled to the larger model by parameter count '
            f'(x{s["param_ratio_small_to_large"]:.2f}); the rater\'s is a lower bound (the '
            'meta-backward is not counted). Net = tokens saved by training on the filtered corpus '
            '- the method\'s cost, for one training run.', '',
            '| method | cost | cost (large-model tokens) | keep | saved | net | net (large-model '
            'tokens) |', '|---|---|---|---|---|---|---|']
  kilo = lambda x: '-' if x is None else f'{x / 1e3:+.0f}k'
  for m, c in s['cost'].items():
    for k, ns in c['net_saving'].items():
      lines.append(f'| {m} | {c["tokens"] / 1e3:.0f}k | {c["large_model_tokens"] / 1e3:.0f}k | {k} '
                   f'| {kilo(ns["saved_tokens"])} | {kilo(ns["net_tokens"])} | '
                   f'{kilo(ns["net_large_model_tokens"])} |')
  acc = s['acceptance']
  lines += ['', f'Acceptance (judged at keep {acc["primary_keep"]:g}, fixed before the run): '
            f'DataRater AUROC >= {AUROC_GOAL} in every seed: {acc["auroc_at_least_0.9_every_seed"]}; '
            f'tokens to all data\'s final loss <= {FRACTION_GOAL} in every seed: '
            f'{acc["fraction_at_most_0.8_every_seed"]}; lower final loss than the random subset '
            f'in every seed: {acc["beats_random_every_seed"]}; wall time {wall_s / 60:.1f} min '
            f'(goal <= 30).']
  return '\n'.join(lines) + '\n'


def plot(path: str, s: dict, seeds: dict, bench) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
  rs = list(seeds.values())
  p = f'{bench.primary_keep:g}'
  per_token = s['budget_tokens'] / bench.transfer.steps
  ax = axes[0][0]
  lines = [('all data', 'all', '-', 'k', '-'), ('oracle', 'oracle', '-', 'k', ':'),
           (f'random {p}', 'random', p, 'gray', '--')] + [
      (f'{m} {p}', m, p, f'C{i}', '-') for i, m in enumerate(bench.methods)]
  for label, name, k, color, style in lines:
    curves = np.asarray([r['runs'][name][k]['curve'] for r in rs], np.float64)
    ax.plot(curves[0, :, 0] * per_token / 1e3, curves[:, :, 1].mean(0), color=color, ls=style,
            marker='.', label=label)
  ax.axhline(s['all']['mean'], color='k', lw=0.6, alpha=0.5)
  ax.set(xlabel='training tokens (k)', ylabel='test loss (nats/byte)',
         title=f'fresh larger LM, keep {p} (mean of {len(rs)} seeds)')
  # Up to all data's second evaluation (its first is far above the rest), or its only one.
  tops = [c[min(1, len(c) - 1)][1] for c in (r['runs']['all']['-']['curve'] for r in rs)]
  ax.set_ylim(top=float(np.mean(tops)) + 0.05)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  ax = axes[0][1]
  keeps = [f'{k:g}' for k in bench.keeps]
  for i, name in enumerate(('random', *bench.methods)):
    rows = [s['corpora'][name][k] for k in keeps]
    ax.errorbar(bench.keeps, [r['mean'] for r in rows], yerr=[r['std'] for r in rows], capsize=3,
                marker='o', color='gray' if name == 'random' else f'C{i - 1}', label=name,
                ls='--' if name == 'random' else '-')
  ax.axhline(s['all']['mean'], color='k', label='all data')
  ax.axhline(s['corpora']['oracle']['-']['mean'], color='k', ls=':', label='oracle')
  ax.set(xlabel='keep fraction', ylabel='final test loss (nats/byte), mean ± std over seeds',
         title='final test loss by keep')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  ax = axes[1][0]
  kinds = list(next(iter(s['learned'].values()))['auroc'])
  width = 0.8 / len(bench.methods)
  for i, m in enumerate(bench.methods):
    a = s['learned'][m]['auroc']
    ax.bar(np.arange(len(kinds)) + i * width, [a[k]['mean'] for k in kinds], width,
           yerr=[a[k]['std'] for k in kinds], capsize=2, color=f'C{i}', label=m)
  ax.axhline(0.5, color='k', lw=0.6, label='chance')
  ax.axhline(AUROC_GOAL, color='k', lw=0.6, ls='--', label=f'goal {AUROC_GOAL:g}')
  ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=20, fontsize=8)
  ax.set(ylabel='AUROC against clean prose, mean ± std', title='what each method values',
         ylim=(0, 1.02))
  ax.legend(fontsize=8)
  ax = axes[1][1]
  if 'datarater' in s['learned'] and 'mean_weight' in s['learned']['datarater']:
    w = s['learned']['datarater']['mean_weight']
    ax.bar(list(w), [x['mean'] for x in w.values()], yerr=[x['std'] for x in w.values()],
           capsize=3, color='C0')
    ax.axhline(1.0, color='k', lw=0.6)
    ax.set_yscale('log')
    ax.tick_params(axis='x', rotation=20, labelsize=8)
    ax.set(ylabel='mean weight N softmax(score/tau)', title='the rater\'s weight per group')
  fig.suptitle(os.path.basename(path).removesuffix('.png'))
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def define_flags() -> None:
  """Defined when run as a program, so tests can import this module (and others) freely."""
  cli.define_config_file('config', 'configs/text_bench.py', 'Experiment config.')
  cli.define_config_file('bench', 'configs/text_bench.py:bench',
                         'The fresh language models, seeds, keeps, methods.')
  flags.DEFINE_string('out', 'bench/results/lm_curation', 'Output prefix.')
  bench_cli.define_config_check('bench.lm_curation', CONFIG_SECTIONS,
                                {'seed': '--bench.seeds', 'valuation.seed': '--bench.seeds'},
                                top_level=('log_every', 'checkpoint_every'))  # its rater run's


# What the rater's runs and the valuations read of --config (the fresh models: --bench).
CONFIG_SECTIONS = ('data', 'task', 'rater', 'inner', 'outer', 'final_eval', 'valuation')


def check_bench(bench) -> None:
  """Refuses --bench seeds, keeps or methods that would fail only after the first seed's runs."""
  cc = config_checks
  any_value = lambda v: None  # checked below
  cc.check_section('--bench', bench, {k: any_value for k in (
      'transfer', 'seeds', 'keeps', 'primary_keep', 'methods')})
  bench_cli.seeds([str(x) for x in bench.seeds], 'bench.seeds')  # results are kept by seed
  keeps = bench_cli.numbers('bench.keeps', [str(x) for x in bench.keeps], float,
                            lambda x: 0 < x <= 1, 'in (0, 1]', distinct=True)
  # Empty: every result was lost writing the table, after all the runs.
  bench_cli.names('bench.methods', bench.methods, factory.METHODS)
  cc.check_section('--bench.transfer', bench.transfer, {
      'task': lambda v: None, 'steps': cc.integer(1), 'batch_size': cc.integer(1),
      'optimizer': cc.SECTIONS['train']['optimizer'],
      'learning_rate': cc.number(0, lo_open=True), 'evals': cc.integer(1)})
  if f'{bench.primary_keep:g}' not in {f'{k:g}' for k in keeps}:
    raise UserError(f'--bench.primary_keep {bench.primary_keep:g} is not one of --bench.keeps '
                    f'{", ".join(f"{k:g}" for k in keeps)}')


def main(argv):
  del argv
  t_start = time.time()
  load_start = os.getloadavg()
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger('datarater').disabled = True  # the rater runs' own progress lines
  config, bench, out = FLAGS.config, FLAGS.bench, FLAGS.out
  bench_cli.check_config()
  check_bench(bench)
  bench_cli.out_folder(out)
  tmp_root = tempfile.mkdtemp(prefix='bench_lm_curation_')
  # Programs compiled once (the meta-step, the trainer's chunks per corpus size) are reused by
  # the later seeds from the compilation cache of this process (launch.cli.run).
  seeds = {}
  try:
    for s in bench.seeds:
      r = run_seed(config, bench, int(s), os.path.join(tmp_root, str(s)))
      seeds[str(s)] = r
      p = f'{bench.primary_keep:g}'
      a = r['learned']['datarater']['auroc'] if 'datarater' in r['learned'] else {}
      print(f'seed {s}: all {r["runs"]["all"]["-"]["loss"]:.4f} | oracle '
            f'{r["runs"]["oracle"]["-"]["loss"]:.4f} | random {p} '
            f'{r["runs"]["random"][p]["loss"]:.4f} | ' + ' | '.join(
                f'{m} {p} {r["runs"][m][p]["loss"]:.4f}' for m in bench.methods) +
            ' | rater AUROC ' + ', '.join(f'{k} {v:.3f}' for k, v in a.items()) +
            f' | { {k: round(v) for k, v in r["seconds"].items()} } s '
            f'[{time.time() - t_start:.0f} s]', flush=True)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  first = seeds[str(bench.seeds[0])]
  info = pipeline.load_split(config.data, config.data.heldout_split).info
  length = info.spec['tokens'].shape[0]
  ratio = (num_params(tasks.make_task(config.task, info), info) /
           num_params(tasks.make_task(bench.transfer.task, info), info))
  summary = summarize(seeds, bench, length - 1, ratio)
  wall = time.time() - t_start
  table = markdown(summary, bench, config, wall)
  print(table)
  provenance.write_results(out, {
      'summary': summary, 'seeds': seeds, 'bench': bench.to_dict(), 'config': config.to_dict(),
      'num_train': first['num_train'], 'seconds': wall,
      'dataset_sources': dict(pipeline.builder_of(config.data).info.metadata),
      'load_average_start_end': [load_start, os.getloadavg()], 'cpu_count': os.cpu_count(),
      'device': jax.devices()[0].device_kind, 'platform': platform.platform()},
      table, lambda path: plot(path, summary, seeds, bench))
  print(f'wrote {out}.json, .md and .png in {time.time() - t_start:.0f} s')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
