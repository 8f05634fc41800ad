"""configs/fashion_mnist.py sized for the Fashion-MNIST benchmarks on 2 shared CPU cores.

  python -m bench.valuation_noise --config=configs/fashion_mnist_bench.py ...
  python -m bench.curation --config=configs/fashion_mnist_bench.py ...
  python -m bench.selection --config=configs/fashion_mnist_bench.py --folds=1 ...

Same data, task and rater as configs/fashion_mnist.py (Fashion-MNIST, the stride-2 CNNs,
class-conditional label noise along the real confusions), shrunk so that every benchmark of the
issue fits in about two hours of two CPU cores shared with other jobs:
- models train on the first 5,000 training images (`train[:5000]`), not 50,000; the held-out
  (meta-loss, Mimic reference, TracIn held-out) split stays `train[50000:55000]`; `train[55000:]`
  is left for validation; the test set is the final evaluation only;
- besides the label noise (rate set by the benchmarks' --noise), 1% of the split each is blurred,
  drowned in pixel noise, occluded, a near-duplicate and an out-of-distribution digit (5% input
  corruption in all, recorded per kind; the benchmarks switch them off at --noise=0);
- the rater: K=2 inner CNNs, inner batch 64, T=2 unrolled steps, outer batch 128 (the
  paper-sized K=8, B=128 is too slow here); the benchmarks set the outer steps;
- valuations: TracIn and Mimic read 4 checkpoints of the 600-step SGD run (every 150 steps);
  data value embedding follows a 150-step run;
- training runs: batch 128, Adam 1e-3, 4 epochs (160 steps on 5,000 images: 40 per epoch, the
  last one short) in launch.train and in bench.selection without --epochs; bench.curation and
  bench.noise_ceiling train for their own --epochs (default 40 and 8; the README's curation runs
  give --epochs=4), and the benchmarks take their seeds from --seeds, not `train.seeds`;
- selection features (set in configs/fashion_mnist.py, sized in passes over the split, so the
  stage keeps pace with the split): the hidden layer (64 units) of an MLP trained for 3.84
  passes (300 steps of batch 64 on 5,000 images), and an SAE of batch 128 trained for 6.4
  passes (250 steps) on them; chosen on the tuning split against larger CNN extractors and
  SAEs (`bench/results/selection_{small,mlp}_extractor_prereg.md`,
  `bench/results/selection_offline_scale_prereg.md`).
"""
import ml_collections

from configs import fashion_mnist

INPUT_CORRUPTION = {'blur': 0.01, 'pixel_noise': 0.01, 'occlusion': 0.01, 'duplicate': 0.01,
                    'ood': 0.01}


def get_config() -> ml_collections.ConfigDict:
  c = fashion_mnist.get_config()
  c.data.train_split = 'train[:5000]'
  c.data.input_corruption.update(INPUT_CORRUPTION)

  c.inner.population = 2
  c.inner.batch_size = 64
  c.inner.steps = 2
  c.outer.batch_size = 128
  c.final_eval.num_models = 0
  c.valuation.checkpoint_every = 150
  c.valuation.dvemb_steps = 150

  c.train.epochs = 4                # not read by bench.curation / noise_ceiling: their --epochs
  c.train.seeds = (0,)              # launch.train only: the benchmarks' --seeds

  return c
