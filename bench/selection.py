r"""Dynamic data selection: accuracy vs example-gradients for full/random/InfoBatch/SAE policies.

`python -m bench.selection [--quick] [--config=configs/selection.py] [--config.FIELD=VALUE ...]`
(e.g. `--config.sae_scores.mislabel_rule=knn`; `--help` lists every field): clean labels and 20%
symmetric label noise, 5 folds x 10 seeds, selection ratios {0.3, 0.5, 0.7}, every policy trained
from scratch for the same epochs (the config's `train` section) with the one trainer. The
SAE-score defaults were chosen on the validation split, so accuracy is reported on held-out test
folds (clean labels, used for no choice); validation accuracy (on the config's
`data.heldout_split`, which no policy reads) is listed beside it. Fold 0 is the
dataset's own split; folds 1-4 each hold out a quarter of `train` (1/(F-1) at F folds) and
train on the rest plus `test`, read through TFDS split expressions (the folds multiply the test
examples by five).
Each (fold, seed) run draws its own corruption, extractor, SAE, initialisation, data order and
policy keys (`run_seed`; fold 0 keeps seed s), the same for every policy of that run, so policies
are compared paired. The checks are read from the mean over every (fold, seed) pair; fold 0 alone
is also reported.
Three ablations of the SAE policy share its codes: `sae_hardguard` (suspected mislabels are
excluded while the others can fill the budget, instead of losing a point of score),
`sae_noguard` (no label guard) and `sae_prev` (split-wide representativeness, most
representative first: the seed article's order).
Writes bench/results/selection{,_quick}.json, .png (accuracy against example-gradients) and .md
(the table), and prints the table. Also measures the Gini coefficient of per-example selection
counts of the SAE policy with and without the usage penalty on the real SAE codes. Compiled epochs
are cached on disk for the run (same shapes -> one compilation per policy and ratio).
Wall-clock times leave compilation out; an SAE row's offline time counts the extractor's training,
the feature extraction, the SAE and its codes, and the policy's setup (score statistics, label
guard). `--quick`: fold 0, 1 seed, ratios {0.3, 0.7}, 10 epochs. `--extractor=pixels` uses raw pixels
as the SAE's feature space (no offline extractor training; files get a `_pixels` suffix).
`--offline_only` runs the offline stage and the label guard alone (no model is trained) and
writes the guard's suspect share, recall, precision and AUROC per run.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import itertools
import json
import os
import time

from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from bench import cli as bench_cli  # pylint: disable=g-import-not-at-top
from bench import provenance  # pylint: disable=g-import-not-at-top
from bench import runs as bench_runs  # pylint: disable=g-import-not-at-top
from datarater import files, tasks
from datarater import train as train_lib
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.policies import SECTIONS as POLICY_SECTIONS
from datarater.policies import PolicyContext, make_policy as registered_policy
from datarater.policies import sae_scores as scores
from datarater.policies import selection as policies
from datarater.policies.selection import gini
from datarater.trainer import Trainer
from inner_loop.optimizers import make_inner_optimizer

FLAGS = flags.FLAGS
POLICY_ORDER = ('full', 'random', 'infobatch', 'sae', 'sae_hardguard', 'sae_noguard', 'sae_prev')
COLORS = {'full': 'k', 'random': 'tab:gray', 'infobatch': 'tab:orange', 'sae': 'tab:blue',
          'sae_hardguard': 'tab:green', 'sae_noguard': 'tab:cyan', 'sae_prev': 'tab:purple'}
# Bench-only SAE variants: (policy, sae_scores overrides). `sae_prev`: split-wide scores, most
# representative first (the seed article's order).
VARIANTS = {'sae_hardguard': ('sae', {'mislabel_guard': 'exclude'}),
            'sae_noguard': ('sae', {'mislabel_guard': 'off'}),
            'sae_prev': ('sae', {'class_conditional': False, 'rep_weight_start': 1.0,
                                 'rep_weight_end': 0.3, 'div_weight_start': 0.0,
                                 'div_weight_end': 1.0, 'usage_penalty': 1.0, 'temperature': 0.1,
                                 'mislabel_guard': 'off'})}


def variant_config(cfg, name: str):
  """(policy name, config) of a bench entry: a policy of launch.train or an SAE ablation."""
  if name not in VARIANTS:
    return name, cfg
  policy, overrides = VARIANTS[name]
  c = cfg.copy_and_resolve_references()
  c.sae_scores.update(overrides)
  return policy, c


def fold_splits(fold: int, num_folds: int, num_train: int, train: str = 'train',
                test: str = 'test') -> tuple[str, str]:
  """(train, test) TFDS split expressions of a cross-validation fold; fold 0 = (`train`, `test`),
  the config's own splits; folds 1..num_folds-1 each hold out 1/(num_folds-1) of the whole
  `train` split (a quarter at 5 folds)."""
  if fold == 0:
    return train, test
  bounds = np.round(np.linspace(0, num_train, num_folds)).astype(int)
  lo, hi = bounds[fold - 1], bounds[fold]
  kept = [f'train[{a}:{b}]' for a, b in ((0, lo), (hi, num_train)) if b > a]
  return '+'.join(kept + ['test']), f'train[{lo}:{hi}]'


FOLD_TAG = 0x464F4C44  # 'FOLD': the numpy seed of a fold's run seeds


def run_seed(fold: int, seed: int) -> int:
  """The seed of run (fold, seed): its corruption draw (`data.noise_seed`), feature extractor and
  SAE (`features.seed`), the trainer's initialisation, data order and policy keys. Fold 0 (all
  of --folds=1) keeps `seed`; a fold >= 1 draws its own from (FOLD_TAG, fold, seed), < 2**31.
  Folds of one size sharing a seed would corrupt the same positions (the examples they share
  among them) and start from the same model."""
  if fold == 0:
    return seed
  return int(np.random.SeedSequence([FOLD_TAG, fold, seed]).generate_state(1)[0] >> 1)


def run_config(base_cfg, noise: float, fold: int, seed: int):
  """`base_cfg` corrupted at rate `noise` (0: clean) and seeded for run (fold, seed):
  `run_seed` as the corruption, feature and training seed (`train.seeds`)."""
  cfg = bench_runs.corrupted(base_cfg, noise)
  cfg.data.noise_seed = cfg.features.seed = run_seed(fold, seed)
  cfg.train.seeds = (cfg.features.seed,)
  return cfg


def count_gini_ablation(codes, labels, num_classes: int, ratio: float, epochs: int, cfg,
                        seed: int) -> dict:
  """Selection counts of the SAE policy (select/update only) with and without the usage penalty."""
  out = {}
  for key, penalty in (('without_penalty', 0.0), ('with_penalty', cfg.sae_scores.usage_penalty)):
    c = cfg.sae_scores.copy_and_resolve_references()
    c.usage_penalty = penalty
    policy = policies.sae(codes, ratio, epochs, c, labels=labels, num_classes=num_classes)
    state = policy.init(len(codes), jax.random.PRNGKey(seed))
    select, update = jax.jit(policy.select), jax.jit(policy.update)
    for _ in range(epochs):
      idx, w, state = select(policy.aux, state)
      state = update(policy.aux, state, idx, w, np.zeros(idx.shape, np.float32))
    out[key] = gini(state.counts)  # (equal where the config's penalty is 0)
  return out


def mislabel_diagnostics(codes, train, labels, num_classes, cfg) -> dict:
  """The label guard on these codes: share of the split suspected and, under label noise, the
  AUROC for the planted corruptions of the margin and of the k-NN own-label share, and the
  suspects' recall and precision."""
  sc = cfg.sae_scores
  knn = sc.get('mislabel_knn', 50)
  stats = scores.factor_stats(codes, sc.high_freq_fraction, labels, num_classes)
  suspect = np.asarray(scores.config_suspects(stats, sc))
  out = {'suspect_share': float(suspect.mean()),
         'confident_error_count': int(scores.confident_error_count(stats))}
  flipped = train.is_corrupted
  if flipped.any():
    reference = scores.config_reference(len(labels), sc)  # the one config_suspects reads
    own = np.asarray(scores.knn_label_shares(stats, knn, reference=reference))[
        np.arange(len(labels)), labels]
    # Imported here: sklearn takes a second or more to import, which a command line refused at
    # its flags (or --help) need not wait for.
    from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
    out.update(margin_auroc=float(roc_auc_score(flipped, -np.asarray(scores.label_margin(stats)))),
               knn_auroc=float(roc_auc_score(flipped, -own)),
               suspect_recall=float(suspect[flipped].mean()),
               suspect_precision=float(flipped[suspect].mean()) if suspect.any() else 0.0)
  return out


def summarise(runs: list[dict]) -> list[dict]:
  rows = {}
  for r in runs:
    rows.setdefault((r['noise'], r['policy'], r['ratio']), []).append(r)
  table = []
  for (noise, policy, ratio), rs in sorted(rows.items(), key=lambda kv: (
      kv[0][0], POLICY_ORDER.index(kv[0][1]), kv[0][2])):
    acc = np.array([r['test_accuracy'] for r in rs]) * 100
    val = np.array([r['validation_accuracy'] for r in rs]) * 100
    table.append({'noise': noise, 'policy': policy, 'ratio': ratio, 'runs': len(rs),
                  'accuracy': float(acc.mean()), 'accuracy_std': float(acc.std()),
                  'accuracy_sem': float(acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else 0.,
                  'validation_accuracy': float(val.mean()),
                  'validation_accuracy_std': float(val.std()),
                  'grads_rel_full': float(np.mean([r['example_grads'] / r['example_grads_full']
                                                   for r in rs])),
                  'example_grads': int(np.mean([r['example_grads'] for r in rs])),
                  'offline_rel_full': float(np.mean([r['offline_example_grads'] /
                                                     r['example_grads_full'] for r in rs])),
                  'wall_s': float(np.mean([r['wall_s'] for r in rs])),
                  'wall_incl_offline_s': float(np.mean([r['wall_s'] + r.get('offline_s', 0.0)
                                                        for r in rs])),
                  # mean wall of full training / mean wall with every overhead, compilation
                  # left out on both sides, then counted on both sides
                  'speedup_vs_full': float(np.mean([r['full_wall_s'] for r in rs]) / np.mean(
                      [r['wall_s'] + r.get('offline_s', 0.0) for r in rs]))
                                     if all(r.get('full_wall_s') for r in rs) else None,
                  'speedup_vs_full_with_compile': float(
                      np.mean([r['full_wall_s'] + r['full_compile_s'] for r in rs]) /
                      np.mean([r['wall_s'] + r['compile_s'] + r.get('offline_s', 0.0) +
                               r.get('offline_compile_s', 0.0) for r in rs]))
                                                  if all(r.get('full_compile_s') is not None
                                                         for r in rs) else None,
                  'compile_s': float(np.mean([r['compile_s'] for r in rs])),
                  'count_gini': float(np.mean([r['count_gini'] for r in rs])),
                  'noisy_share_of_grads': float(np.mean([r['noisy_share_of_grads'] for r in rs]))})
  return table


def acceptance(table: list[dict], policy: str = 'sae', metric: str = 'accuracy',
               noise: float = 0.2) -> dict:
  """The selection checks for `policy` on `metric` (test accuracy by default), from the table.

  Clean, r = 0.7: `clean_r0.7_pass` is issue 5's (within 0.5 points of full data at <= 0.75x its
  example-gradients), `clean_r0.7_pass_wall_speedup` issue 17's (within 0.3 points at >= 1.3x
  its wall-clock, the offline stages included). Under noise, per ratio: the policy's drop minus
  InfoBatch's, with its paired standard error. Reported whichever way they come out.
  """
  get = {(r['noise'], r['policy'], r['ratio']): r for r in table}
  out = {'policy': policy, 'metric': metric}
  full_clean, sae_clean = get.get((0.0, 'full', 1.0)), get.get((0.0, policy, 0.7))
  if full_clean and sae_clean:
    gap = sae_clean[metric] - full_clean[metric]
    out['clean_r0.7_sae_minus_full_points'] = gap
    out['clean_r0.7_sae_grads_rel_full'] = sae_clean['grads_rel_full']
    out['clean_r0.7_sae_grads_incl_offline_rel_full'] = (sae_clean['grads_rel_full'] +
                                                         sae_clean['offline_rel_full'])
    out['clean_r0.7_pass'] = bool(gap >= -0.5 and sae_clean['grads_rel_full'] <= 0.75)
    if sae_clean.get('speedup_vs_full') is not None:  # within 0.3 points at >= 1.3x wall-clock
      out['clean_r0.7_wall_speedup_incl_offline'] = sae_clean['speedup_vs_full']
      out['clean_r0.7_wall_speedup_incl_offline_and_compile'] = sae_clean.get(
          'speedup_vs_full_with_compile')
      out['clean_r0.7_pass_wall_speedup'] = bool(gap >= -0.3 and sae_clean['speedup_vs_full'] >= 1.3)
  for ratio in sorted({r['ratio'] for r in table if r['policy'] == policy}):
    drops = {}
    for name in (policy, 'infobatch'):
      clean, noisy = get.get((0.0, name, ratio)), get.get((noise, name, ratio))
      if clean and noisy:
        drops[name] = clean[metric] - noisy[metric]
    if len(drops) == 2:
      out[f'noise_drop_r{ratio}'] = drops
      out[f'noise_drop_r{ratio}_sae_less'] = bool(drops[policy] < drops['infobatch'])
  return out


def paired_differences(runs: list[dict], ratios, noise: float = 0.2) -> dict:
  """Per-(fold, seed) paired differences behind the issue's checks, with their standard errors.

  A (fold, seed) pair fixes the split, the label flips and the initialisation for every policy,
  so the clean gap (SAE - full at r=0.7) and the noise-drop difference (SAE - InfoBatch) are
  taken per pair.
  """
  acc_of = lambda p, r, z: {(x['fold'], x['seed']): 100 * x['test_accuracy'] for x in runs
                            if x['noise'] == z and x['policy'] == p and x['ratio'] == r}
  sem = lambda d: float(np.std(d, ddof=1) / np.sqrt(len(d)))
  out = {}
  full_acc, sae_acc = acc_of('full', 1.0, 0.0), acc_of('sae', 0.7, 0.0)
  gaps = [sae_acc[k] - full_acc[k] for k in sorted(full_acc) if k in sae_acc]
  if len(gaps) > 1:
    out['clean_r0.7_gap_per_pair'] = gaps
    out['clean_r0.7_gap_sem'] = sem(gaps)
  for ratio in ratios:
    (sc, sn), (ic, in_) = [(acc_of(p, ratio, 0.0), acc_of(p, ratio, noise))
                           for p in ('sae', 'infobatch')]
    diff = [(sc[k] - sn[k]) - (ic[k] - in_[k]) for k in sorted(sc)
            if all(k in d for d in (sn, ic, in_))]
    if len(diff) > 1:
      out[f'noise_drop_r{ratio}_sae_minus_infobatch_per_pair'] = diff
      out[f'noise_drop_r{ratio}_sae_minus_infobatch_mean'] = float(np.mean(diff))
      out[f'noise_drop_r{ratio}_sae_minus_infobatch_sem'] = sem(diff)
      # the SAE policy loses less than InfoBatch by at least 2 paired standard errors
      out[f'noise_drop_r{ratio}_sae_less_by_2se'] = bool(np.mean(diff) + 2 * sem(diff) < 0)
  return out


def markdown(table: list[dict], ginis: dict, offline: list[dict] = ()) -> str:
  lines = ['| corruption | policy | ratio | test acc. (%, mean ± std over folds x seeds) | '
           'validation acc. (%, mean ± std) | '
           'example-grads (x full) | + offline extractor (x full) | train wall (s) | '
           '+ offline wall (s) | wall speed-up vs full | with compilation | count Gini | '
           'noisy share of grads |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in table:
    speedup, with_compile = r.get('speedup_vs_full'), r.get('speedup_vs_full_with_compile')
    lines.append(f"| {r['noise']:.0%} | {r['policy']} | {r['ratio']:.1f} | "
                 f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f} | "
                 f"{r['validation_accuracy']:.2f} ± {r['validation_accuracy_std']:.2f} | "
                 f"{r['grads_rel_full']:.2f} | "
                 f"{r['offline_rel_full']:.2f} | "
                 f"{r['wall_s']:.2f} | {r.get('wall_incl_offline_s', r['wall_s']):.2f} | "
                 f"{'' if speedup is None else f'{speedup:.2f}x'} | "
                 f"{'' if with_compile is None else f'{with_compile:.2f}x'} | "
                 f"{r['count_gini']:.3f} | {r['noisy_share_of_grads']:.3f} |")
  lines.append('')
  lines.append('Gini of SAE-policy selection counts (real codes, mean over folds x seeds), '
               'without -> with the usage penalty:')
  for key, g in sorted(ginis.items()):
    lines.append(f"- {key}: {g['without_penalty']:.3f} -> {g['with_penalty']:.3f}")
  if offline:
    lines += ['', 'Label guard on the SAE codes (mean over folds x seeds):'] + guard_lines(offline)
  return '\n'.join(lines) + '\n'


def guard_lines(offline: list[dict]) -> list[str]:
  """One line per noise level: the label guard's suspect share, AUROCs, recall and precision."""
  lines = []
  for noise in sorted({o['noise'] for o in offline}):
    os_ = [o for o in offline if o['noise'] == noise]
    mean = lambda k: float(np.mean([o[k] for o in os_]))  # pylint: disable=cell-var-from-loop
    line = (f"- {noise:.0%} noise: {mean('suspect_share'):.1%} of the split suspected "
            f"(confident-learning count {mean('confident_error_count'):.0f})")
    if noise:
      line += (f"; AUROC for the corrupted examples: margin {mean('margin_auroc'):.3f}"
               + (f", k-NN label share {mean('knn_auroc'):.3f}" if 'knn_auroc' in os_[0] else '')
               + f"; suspects' recall {mean('suspect_recall'):.2f}, precision "
               f"{mean('suspect_precision'):.2f}")
    lines.append(line)
  return lines


def write_offline(stem: str, cfg, offline: list[dict], total_s: float) -> None:
  """`--offline_only`: the offline stage and label guard per run, as <stem>.json and .md."""
  lines = ['| noise | fold | seed | offline (s) | suspected | recall | precision | k-NN AUROC |',
           '|---|---|---|---|---|---|---|---|']
  for o in offline:
    cell = lambda k: f'{o[k]:.3f}' if k in o else ''  # pylint: disable=cell-var-from-loop
    lines.append(f"| {o['noise']:.0%} | {o['fold']} | {o['seed']} | {o['offline_s']:.2f} | "
                 f"{o['suspect_share']:.2%} | {cell('suspect_recall')} | "
                 f"{cell('suspect_precision')} | {cell('knn_auroc')} |")
  md = '\n'.join(lines + ['', 'Mean over folds x seeds:'] + guard_lines(offline)) + '\n'
  provenance.write_results(stem, {'config': cfg.to_dict(), 'offline': offline,
                                  'total_s': total_s, 'device': jax.devices()[0].platform}, md)
  print(md)


def plot(table: list[dict], path: str, dataset: str = 'digits') -> None:
  noises = sorted({r['noise'] for r in table})
  fig, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 4), squeeze=False)
  for ax, noise in zip(axes[0], noises):
    for policy in POLICY_ORDER:
      rs = sorted((r for r in table if r['noise'] == noise and r['policy'] == policy),
                  key=lambda r: r['ratio'])
      if not rs:
        continue
      ax.errorbar([r['grads_rel_full'] + r.get('offline_rel_full', 0.0) for r in rs],
                  [r['accuracy'] for r in rs],
                  yerr=[r['accuracy_sem'] for r in rs], marker='o' if policy != 'full' else '*',
                  ms=10 if policy == 'full' else 5, capsize=3, color=COLORS[policy], label=policy,
                  ls='--' if policy in VARIANTS else '-')
    ax.set_xlabel('example-gradients incl. offline extractor (fraction of full data)')
    ax.set_ylabel('test accuracy (%), mean ± s.e.')
    ax.set_title(f'{dataset}, {noise:.0%} corruption, '
                 f'{max(r["runs"] for r in table if r["noise"] == noise)} runs')
    ax.grid(alpha=0.3)
  handles = {l: h for ax in axes[0] for h, l in zip(*ax.get_legend_handles_labels())}
  fig.legend(handles.values(), handles.keys(), loc='lower center',  # off the data
             ncol=len(handles))
  fig.suptitle(os.path.basename(path).removesuffix('.png'))
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  files.save_figure(fig, path, dpi=120)
  plt.close(fig)


def make_policy(name: str, cfg, train, task, codes, setup: int):
  """A bench entry's policy at `cfg.policy.ratio`, as launch.train makes it (the SAE ones on the
  shared codes, which cost `setup` example-gradients)."""
  policy, pcfg = variant_config(cfg, name)
  ctx = PolicyContext(train, None, task, pcfg)
  if policy == 'sae':
    return policies.sae_policy(ctx, codes, setup)
  return registered_policy(policy, ctx)


def define_flags() -> None:
  """Defined when run as a program, so tests can import this module (and others) freely."""
  bench_cli.config_file('configs/selection.py')()
  flags.DEFINE_bool('quick', False, 'Fold 0, 1 seed, ratios 0.3 and 0.7, 10 epochs.')
  flags.DEFINE_string('out', '', 'Output prefix of <out>.json, .md and .png (default: '
                      'bench/results/selection, with _quick and _<extractor> suffixes).')
  flags.DEFINE_integer('folds', 5, "Cross-validation folds (>= 1); fold 0 is the dataset's own "
                       'train/test split.')
  flags.DEFINE_integer('seeds', 10, 'Seeds per fold.')
  flags.DEFINE_string('extractor', '', "features.extractor: 'penultimate' (its training is "
                      "counted as offline cost) or 'pixels' (free).")
  flags.DEFINE_float('noise', 0.2, "Corruption rate of the noisy setting (label noise of the "
                     "config's kind plus its input corruptions); 0: clean data only.")
  flags.DEFINE_list('ratios', ['0.3', '0.5', '0.7'], 'Selection ratios.')
  flags.DEFINE_list('policies', list(POLICY_ORDER),
                    'Bench entries to run (full is always run: the reference).')
  flags.DEFINE_integer('epochs', 0, "train.epochs (0: the config's).")
  flags.DEFINE_bool('offline_only', False, "Run the SAE policy's offline stage and label guard "
                    'only (no training): writes <out>.json and .md.')
  bench_cli.define_config_check('bench.selection', train_lib.SECTIONS + POLICY_SECTIONS['sae'],
                                set_by, depends=('--quick', '--epochs', '--extractor'))


def set_by(fv) -> dict:
  """{--config field: the flag of `fv` that sets it}: the bench's overrides of the config."""
  fields = {'data.label_noise': '--noise', 'data.noise_seed': '--seeds',
            'features.seed': '--seeds', 'train.seeds': '--seeds'}
  if fv.quick or fv.epochs:
    fields['train.epochs'] = '--quick' if fv.quick else '--epochs'
  if fv.extractor:
    fields['features.extractor'] = '--extractor'
  return fields


def main(argv):
  del argv
  cfg = FLAGS.config
  bench_cli.at_least('epochs', FLAGS.epochs, 0)  # 0: the config's
  bench_cli.quick_sets(FLAGS.quick, ('seeds', 'folds', 'ratios', 'epochs'))
  if FLAGS.epochs:
    cfg.train.epochs = FLAGS.epochs
  bench_cli.check_config()
  bench_cli.names('policies', FLAGS.policies, POLICY_ORDER)  # empty: full alone would run
  policy_names = [p for p in POLICY_ORDER if p in FLAGS.policies or p == 'full']
  if FLAGS.extractor:
    cfg.features.extractor = FLAGS.extractor
  if FLAGS.folds < 1 or FLAGS.folds == 2:  # at 2, fold 1 would hold out all of train
    raise UserError(f'--folds must be 1 or >= 3 (folds 1.. each hold out 1/(folds-1) of train), '
                    f'got {FLAGS.folds}')
  bench_cli.at_least('folds', FLAGS.folds, 1)
  bench_cli.at_least('seeds', FLAGS.seeds, 1)
  if not 0 <= FLAGS.noise < 1:
    raise UserError(f'--noise must be in [0, 1), got {FLAGS.noise}')
  ratios = bench_cli.numbers('ratios', FLAGS.ratios, float, lambda x: 0 < x <= 1, 'in (0, 1]',
                            distinct=True)  # (a ratio given twice ran every policy twice)
  out = FLAGS.out or 'bench/results/selection' + ('_quick' if FLAGS.quick else '') + (
      f'_{cfg.features.extractor}' if cfg.features.extractor != 'penultimate' else '')
  bench_cli.out_folder(out)  # an unwritable --out fails now, not after the runs
  quick = FLAGS.quick
  if quick:
    ratios, cfg.train.epochs = [0.3, 0.7], 10
  seeds = [0] if quick else list(range(FLAGS.seeds))
  folds = [0] if quick else list(range(FLAGS.folds))
  if FLAGS.folds > 1 and (cfg.data.train_split, cfg.data.eval_split) != ('train', 'test'):
    raise UserError('--folds > 1 needs a config training on the whole train split and testing '
                    f'on test, not {cfg.data.train_split!r} / {cfg.data.eval_split!r}')
  # One compilation per (policy, ratio, train size): data and policy arrays are arguments (and
  # the compilation cache of launch.cli.run holds what the trainers compile alike).
  validation = pipeline.load_split(cfg.data, cfg.data.heldout_split)
  num_train = pipeline.builder_of(cfg.data).info.splits['train'].num_examples
  optimizer = make_inner_optimizer(cfg.train.optimizer, cfg.train.learning_rate)
  runs, offline, ginis = [], [], {}
  t_start = time.time()
  base_cfg = cfg
  noises = (0.0, FLAGS.noise) if FLAGS.noise else (0.0,)  # --noise=0: clean data only
  for noise, fold, seed in itertools.product(noises, folds, seeds):
    train_split, test_split = fold_splits(fold, FLAGS.folds, num_train, base_cfg.data.train_split,
                                          base_cfg.data.eval_split)
    cfg = run_config(base_cfg, noise, fold, seed)  # noise 0: clean (input corruptions off too)
    (drawn,) = cfg.train.seeds  # every draw of this (fold, seed), shared by its policies
    test = pipeline.load_split(cfg.data, test_split)
    train = pipeline.load_split(cfg.data, train_split, corrupt=True)
    task = tasks.make_task(cfg.task, train.info)
    labels, num_classes = np.asarray(task.labels(train.features)), tasks.num_classes(task)
    t0, c0 = time.perf_counter(), bench_runs.compile_seconds()
    codes, info = policies.sae_codes(PolicyContext(train, None, task, cfg), drawn)
    compile_s = bench_runs.compile_seconds() - c0
    # Measured like the trainer's wall_s: compilation apart.
    info.update(noise=noise, fold=fold, seed=seed, run_seed=drawn, offline_compile_s=compile_s,
                offline_s=time.perf_counter() - t0 - compile_s,
                **mislabel_diagnostics(codes, train, labels, num_classes, cfg))
    offline.append(info)
    print(f'noise={noise} fold={fold} seed={seed} offline={info["offline_s"]:.2f}s '
          f'suspects={info["suspect_share"]:.4f}', flush=True)
    if FLAGS.offline_only:
      continue
    for ratio in ratios:
      g = count_gini_ablation(codes, labels, num_classes, ratio, cfg.train.epochs, cfg, drawn)
      for k, v in g.items():
        ginis.setdefault(f'noise {noise:.0%}, ratio {ratio}', {}).setdefault(k, []).append(v)
    full_wall = full_compile = None
    for policy in policy_names:
      for ratio in ([1.0] if policy == 'full' else ratios):
        cfg.policy.ratio = ratio
        setup = info['extractor_example_grads'] if policy.startswith('sae') else 0
        t0, c0 = time.perf_counter(), bench_runs.compile_seconds()
        pol = make_policy(policy, cfg, train, task, codes, setup)
        jax.block_until_ready(pol.aux)
        # the policy's own setup (the SAE scores' statistics and label guard), compilation apart
        policy_compile_s = bench_runs.compile_seconds() - c0
        policy_s = time.perf_counter() - t0 - policy_compile_s
        res = Trainer(task, optimizer, pol, cfg.train.batch_size,
                      batch_size_setting='train.batch_size').run(
            train, {'validation': validation, 'test': test}, [drawn], epochs=cfg.train.epochs)
        counts = np.asarray(res.policy_state.counts[0])
        if policy == 'full':
          full_wall, full_compile = res.wall_s, res.compile_s
        run = {'noise': noise, 'fold': fold, 'seed': seed, 'run_seed': drawn, 'policy': policy,
               'ratio': ratio,
               'offline_example_grads': setup,
               # wall-clock overhead: extractor + SAE + codes + the policy's setup,
               # compilation apart
               'offline_s': (info['offline_s'] if policy.startswith('sae') else 0.0) + policy_s,
               'offline_compile_s': (info['offline_compile_s'] if policy.startswith('sae')
                                     else 0.0) + policy_compile_s,
               'policy_setup_s': policy_s,
               'full_wall_s': full_wall, 'full_compile_s': full_compile,
               'validation_accuracy': res.final['validation']['accuracy'][0],
               'test_accuracy': res.final['test']['accuracy'][0],
               'test_loss': res.final['test']['loss'][0],
               'example_grads': res.example_gradients,
               'example_grads_full': cfg.train.epochs * len(train),
               'wall_s': res.wall_s, 'compile_s': res.compile_s, 'count_gini': gini(counts),
               # of the selections (compute), not of the weighted loss: InfoBatch up-weights
               'noisy_share_of_grads': (float(counts[train.is_corrupted].sum() / counts.sum())
                                        if train.is_corrupted.any() else 0.0),
               'curve': [(h['example_gradients'], h['test']['accuracy'][0])
                         for h in res.history]}
        runs.append(run)
        print(f"noise={noise} fold={fold} seed={seed} {policy:11s} r={ratio:.1f} "
              f"test={run['test_accuracy']:.4f} val={run['validation_accuracy']:.4f} "
              f"grads={run['example_grads']} "
              f"wall={run['wall_s']:.2f}s gini={run['count_gini']:.3f} "
              f"[{time.time() - t_start:.0f}s]", flush=True)
  if FLAGS.offline_only:
    write_offline(out, base_cfg, offline, time.time() - t_start)
    return
  ginis = {k: {kk: float(np.mean(vv)) for kk, vv in v.items()} for k, v in ginis.items()}
  table = summarise(runs)
  acc = acceptance(table, noise=FLAGS.noise)
  acc.update(paired_differences(runs, ratios, FLAGS.noise))
  fold0 = [r for r in runs if r['fold'] == 0]
  fixed_split = {**acceptance(summarise(fold0), noise=FLAGS.noise),
                 **paired_differences(fold0, ratios, FLAGS.noise)}
  acc_by_fold = {f: acceptance(summarise([r for r in runs if r['fold'] == f]), noise=FLAGS.noise)
                 for f in folds}
  result = {'config': base_cfg.to_dict(), 'folds': folds, 'seeds': seeds, 'ratios': ratios,
            'table': table, 'acceptance': acc,
            'acceptance_other': {'fold0_fixed_split': fixed_split,
                                 **{f'fold{f}': a for f, a in acc_by_fold.items()},
                                 'sae_on_validation': acceptance(
                                     table, metric='validation_accuracy', noise=FLAGS.noise),
                                 **{v: acceptance(table, v, noise=FLAGS.noise)
                                    for v in VARIANTS if v in policy_names}},
            'gini_usage_penalty': ginis, 'offline': offline,
            'runs': runs, 'total_s': time.time() - t_start,
            'device': str(jax.devices()[0].platform)}
  md = markdown(table, ginis, offline)
  provenance.write_results(out, result, md,
                           lambda path: plot(table, path, base_cfg.data.name))
  print(md)
  print(json.dumps(result['acceptance'], indent=1))
  print(f'wrote {out}.json, .md and .png in {result["total_s"]:.0f} s')


if __name__ == '__main__':
  bench_cli.run(main, __doc__, define_flags)
