"""Pictures of a rater run (learning curves, how scores split clean from corrupted examples) and
of a training run (`launch.train`: losses and eval metrics over steps, per seed), and what every
figure of the project shares: histogram bins over scores of any finite range, and drawing a
figure without risking the results written beside it (`draw_or_warn`)."""
import logging
import warnings
from typing import Callable, Optional, Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from datarater import evaluation
from datarater import files
from datarater.curation import select

log = logging.getLogger('datarater.plots')  # (a child: shown where 'datarater' is switched off)


def draw_or_warn(draw: Callable[[str], None], path: str) -> bool:
  """`draw(path)`; an error drawing the figure is logged as a warning, not raised, so the
  results it shows are written all the same. True if it was drawn."""
  try:
    draw(path)
    return True
  except Exception as e:  # pylint: disable=broad-except
    log.warning('could not draw %s (%s: %s); the results are written without it', path,
                type(e).__name__, e)
    return False


def score_bins(scores: np.ndarray, num: int = 40) -> tuple[float, np.ndarray]:
  """(unit, bin edges): `num` equal bins over the finite `scores / unit`; `unit` is 1, or the
  power of ten of the largest |score| above 1e100 (a range of 1e308 overflows); scores (almost)
  all equal get bins around them."""
  s = np.asarray(scores, np.float64)
  s = s[np.isfinite(s)]
  top = np.abs(s).max(initial=0.0)
  unit = 10.0 ** np.floor(np.log10(top)) if top > 1e100 else 1.0
  lo, hi = (s.min() / unit, s.max() / unit) if s.size else (0.0, 0.0)
  if hi - lo <= 1e-6 * max(abs(lo), abs(hi)):  # equal bins would not increase
    half = max(0.5, 1e-6 * abs(lo))
    lo, hi = (lo + hi) / 2 - half, (lo + hi) / 2 + half
  return float(unit), np.linspace(lo, hi, num + 1)


def log_scale_over_decades(ax, values) -> None:
  """A log y axis on `ax` if the finite `values` (None: not finite) are positive and span
  more than 30x."""
  v = np.array([np.nan if x is None else x for x in np.ravel(values)], np.float64)
  v = v[np.isfinite(v)]
  if v.size and v.min() > 0 and v.max() > 30 * v.min():
    ax.set_yscale('log')


def save_rater_report(path: str, history: list[dict], scores: np.ndarray,
                      record: np.ndarray, kinds: Sequence[str] = ('clean', 'corrupted'),
                      title: str = '', keep: Optional[float] = None) -> None:
  """Three panels: outer/inner loss, noise AUROC over outer steps (overall, and per kind where
  `history` records it), final score histograms of the clean examples and of each corruption
  kind (`record`: each example's index in `kinds`, 0 clean; a boolean record is one kind), with
  the threshold that keeps the best `keep`."""
  record = np.asarray(record).astype(np.int64)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  steps = [h['step'] for h in history]
  dots = {'marker': 'o', 'ms': 3} if len(steps) < 30 else {}  # a few logged points stay visible
  for key in ('outer_loss', 'inner_loss'):
    axes[0].plot(steps, [h.get(key, np.nan) for h in history], label=key.replace('_', ' '),
                 **dots)
  log_scale_over_decades(axes[0], [h.get(k, np.nan) for h in history
                                    for k in ('outer_loss', 'inner_loss')])
  axes[0].set(xlabel='outer step', ylabel='loss (mean per example)', title='Losses')
  axes[0].legend()
  # The overall AUROC, and each kind's where the records hold them (several kinds recorded) in
  # its histogram's colour; records without them (an older run's) draw the overall line alone.
  logged = [h for h in history if 'noise_auroc' in h]
  curves = {'all corrupted': [h['noise_auroc'] for h in logged]}
  for kind in dict.fromkeys(k for h in logged for k in h.get('auroc_by_kind') or {}):
    curves[kind] = [(h.get('auroc_by_kind') or {}).get(kind) for h in logged]
  seen = []
  for name, values in curves.items():
    ys = np.array([np.nan if a is None else a for a in values], np.float64)
    if len(ys):
      color = 'k' if name == 'all corrupted' else f'C{kinds.index(name)}' if name in kinds else None
      axes[1].plot([h['step'] for h in logged], ys, color=color, label=name, **dots)
    seen += list(ys[np.isfinite(ys)])
  low = max(0.0, min([0.4] + [a - 0.05 for a in seen]))  # a rater worse than chance shows too
  axes[1].axhline(0.5, color='gray', ls=':', lw=1, label='chance')
  axes[1].set(xlabel='outer step', ylabel='noise AUROC',
              title='Rater: clean ranked above corrupted', ylim=(low, 1.0))
  axes[1].legend(loc='lower right', fontsize=8)
  if not seen:  # nothing recorded as corrupted (or everything): the panel would be blank
    axes[1].text(0.5, 0.7, 'no noise AUROC: no training example\nis recorded as corrupted '
                 '(or every one is)', ha='center', va='center', transform=axes[1].transAxes,
                 color='gray')
    axes[1].set_xlim(axes[0].get_xlim())
  unit, bins = score_bins(scores)
  scaled = np.asarray(scores, np.float64) / unit
  by_kind = evaluation.auroc_by_kind(scores, record, kinds)  # each against the clean examples
  for k, kind in enumerate(kinds):
    group = record == k
    if group.any():
      a = by_kind.get(kind, np.nan)
      shown = f', AUROC {a:.3f}' if np.isfinite(a) else ''
      # Clean filled, each kind outlined, in the colour of its AUROC curve
      axes[2].hist(scaled[group], bins=bins, density=True, color=f'C{k}',
                   **({'alpha': 0.5} if k == 0 else {'histtype': 'step', 'lw': 1.5}),
                   label=f'{kind} ({int(group.sum())}{shown})')
  if keep is not None and len(scaled):
    cut = scaled[select.select_top(scaled, keep)].min()  # the lowest score the keep keeps
    axes[2].axvline(cut, color='k', ls='--', lw=1, label=f'suggested keep {keep:.0%}')
  axes[2].set(xlabel='rater score' if unit == 1.0 else f'rater score / {unit:.0e}',
              ylabel='density (area 1 per group)', title='Scores on the training split')
  entries = len(axes[2].get_legend_handles_labels()[1])
  axes[2].set_ylim(0, axes[2].get_ylim()[1] * (1.1 + 0.1 * entries))  # room for the legend
  axes[2].legend(loc='upper left', fontsize=8)
  if title:
    fig.suptitle(title)
  # Fixed margins: tight_layout would draw the figure a second time (half of this function).
  fig.subplots_adjust(left=0.055, right=0.99, bottom=0.12, top=0.85 if title else 0.92,
                      wspace=0.22)
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def train_figure(history: list[dict], seeds: Sequence[int], title: str = '',
                 eval_split: str = 'eval'):
  """A training run's figure (returned, not saved): a panel per metric of the eval split
  (`eval_split` names it), the loss panel with the running training loss; a thin line per seed
  (labelled 'train seed <s>', 'eval seed <s>') and their mean over training steps, the x label
  giving an epoch's steps and example-gradients (a selection or filter trains on fewer)."""
  value = lambda r, split, metric, i: (r.get(split) or {}).get(metric, [None] * len(seeds))[i]
  metrics = ['loss'] + sorted({m for r in history for m in r.get('eval', {})} - {'loss'})
  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.3), squeeze=False)
  steps = [r['step'] for r in history]
  dots = {'marker': 'o', 'ms': 3} if len(steps) < 30 else {}
  for ax, metric in zip(axes[0], metrics):
    handles = []
    for color, split in (('C0', 'train'), ('C1', 'eval')):
      ys = np.array([[np.nan if value(r, split, metric, i) is None else value(r, split, metric, i)
                      for r in history] for i in range(len(seeds))], np.float64)
      if np.isnan(ys).all():  # (no training accuracy; a history from before the train loss)
        continue
      for seed, y in zip(seeds, ys):
        ax.plot(steps, y, color=color, lw=0.8, alpha=0.4, label=f'{split} seed {seed}')
      with np.errstate(invalid='ignore'), warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # a step where every seed is null
        mean = np.nanmean(ys, axis=0)
      shown = 'train' if split == 'train' else eval_split
      handles += ax.plot(steps, mean, color=color, lw=2, label=f'{shown}: mean of {len(seeds)} '
                         'seeds (thin: each)' if len(seeds) > 1 else shown, **dots)
    if metric == 'loss':
      log_scale_over_decades(ax, [y for line in ax.get_lines() for y in line.get_ydata()])
    ax.set(ylabel=metric if metric != 'loss' else 'loss (mean per example)',
           title=(f'Loss: running training loss, {eval_split} split' if metric == 'loss'
                  else f'{eval_split} split: {metric}'))
    if handles:
      ax.legend(handles=handles, fontsize=8)
  last = history[-1] if history else {}
  per_epoch = (f' ({last["step"] / last["epoch"]:.4g} steps, '
               f'{last["example_gradients"] / last["epoch"]:,.0f} example-gradients per epoch)'
               if last.get('epoch') else '')
  for ax in axes[0]:
    ax.set_xlabel('training step' + per_epoch)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.82 if title else 0.9, wspace=0.2)
  return fig


def save_train_report(path: str, history: list[dict], seeds: Sequence[int], title: str = '',
                      eval_split: str = 'eval') -> None:
  """`train_figure` as a PNG at `path` (a temp file, then renamed)."""
  fig = train_figure(history, seeds, title, eval_split)
  try:
    files.save_figure(fig, path, dpi=100)
  finally:
    plt.close(fig)
