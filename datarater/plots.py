"""Pictures of a rater run: learning curves and how scores split clean from corrupted examples."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from datarater import files


def save_rater_report(path: str, history: list[dict], scores: np.ndarray,
                      is_corrupted: np.ndarray) -> None:
  """Three panels: outer/inner loss, noise AUROC over outer steps, final score histograms."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  steps = [h['step'] for h in history]
  dots = {'marker': 'o', 'ms': 3} if len(steps) < 30 else {}  # a few logged points stay visible
  for key in ('outer_loss', 'inner_loss'):
    axes[0].plot(steps, [h[key] for h in history], label=key.replace('_', ' '), **dots)
  axes[0].set(xlabel='outer step', ylabel='loss', title='Losses')
  axes[0].legend()
  auroc = [(h['step'], h['noise_auroc']) for h in history if 'noise_auroc' in h]
  if auroc:
    axes[1].plot(*zip(*auroc), **dots)
  seen = [a for _, a in auroc if a is not None and np.isfinite(a)]
  low = max(0.0, min([0.4] + [a - 0.05 for a in seen]))  # a rater worse than chance shows too
  axes[1].axhline(0.5, color='gray', ls=':', lw=1, label='chance')
  axes[1].set(xlabel='outer step', ylabel='noise AUROC',
              title='Rater: clean ranked above corrupted', ylim=(low, 1.0))
  axes[1].legend(loc='lower right')
  if not seen:  # nothing recorded as corrupted (or everything): the panel would be blank
    axes[1].text(0.5, 0.7, 'no noise AUROC: no training example\nis recorded as corrupted '
                 '(or every one is)', ha='center', va='center', transform=axes[1].transAxes,
                 color='gray')
    axes[1].set_xlim(axes[0].get_xlim())
  lo, hi = float(scores.min()), float(scores.max())
  bins = np.linspace(lo, hi, 40) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, 40)
  axes[2].hist(scores[~is_corrupted], bins=bins, alpha=0.6, label='clean', density=True)
  if is_corrupted.any():
    axes[2].hist(scores[is_corrupted], bins=bins, alpha=0.6, label='corrupted', density=True)
  axes[2].set(xlabel='rater score', ylabel='density (area 1 per group)',
              title='Scores on the training split')
  axes[2].legend(loc='best')
  # Fixed margins: tight_layout would draw the figure a second time (half of this function).
  fig.subplots_adjust(left=0.055, right=0.99, bottom=0.13, top=0.92, wspace=0.22)
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)
