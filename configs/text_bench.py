"""configs/text.py sized for `bench/lm_curation.py`: the whole curation experiment in <= 30 min on
2 CPU cores.

Sequences stay 128 bytes; what shrinks is the rest. The corpus is 8,192 training sequences (a
prefix of the shuffled `train` split, with its mix: about 60% clean prose, 15% code, 25%
corrupted prose in five recorded kinds), the outer (held-out) set 1,024 clean prose sequences,
the reported curves 256 test sequences. The rater is meta-learned through K=2 inner language
models of one block (d_model 32, 25k parameters), T=2 inner steps, B=16. The valuations (TracIn,
Mimic, data value embedding) are fitted on that same small model. The fresh models trained on the
filtered corpora (section `transfer`) are the larger language model of configs/text.py (two
blocks, d_model 64, about 100k parameters): the rater transfers to a model 4x its inner models.
`get_config()` is a config of every launcher (`python -m launch.train_rater
--config=configs/text_bench.py` works); `get_config('bench')` (`--bench=configs/text_bench.py:bench`
in the benchmark) is what only the benchmark reads: the fresh language models (`transfer`) and the
experiment (seeds, keep fractions, methods, and the keep fraction at which acceptance is judged,
fixed before the long run).
"""
import ml_collections

from configs import text


def get_config(part: str = '') -> ml_collections.ConfigDict:
  if part == 'bench':
    return bench()
  if part:
    raise ValueError(f"configs/text_bench.py: unknown part {part!r} ('' or 'bench')")
  c = text.get_config()
  c.data.train_split = 'train[:8192]'   # TFDS shuffles the split: a prefix keeps the mix
  c.data.heldout_split = 'heldout[:1024]'  # the outer loss, and the valuations' trusted set
  c.data.eval_split = 'test[:256]'      # the reported held-out curves

  c.task = text.transformer(d_model=32, num_heads=2, num_layers=1, d_mlp=64)  # inner LMs
  c.inner.steps = 2
  c.inner.population = 2
  c.inner.batch_size = 16
  c.inner.reset_every = 50
  c.outer.steps = 150
  c.outer.batch_size = 16
  c.outer.learning_rate = 3e-3
  c.outer.warmup_steps = 15
  c.log_every = 150                     # one AUROC scoring of the corpus, at the end
  c.checkpoint_every = 150
  c.final_eval.num_models = 0           # the benchmark trains its own fresh models

  v = c.valuation                       # on the inner model, plain SGD
  v.batch_size = 32
  v.train_steps = 256                   # one epoch of the corpus
  v.checkpoint_every = 128              # TracIn / Mimic: 2 checkpoints
  v.reference_steps = 128               # Mimic's reference, on the held-out set
  v.dvemb_steps = 256                   # one epoch: every example gets an embedding
  v.chunk_size = 32
  return c


def bench() -> ml_collections.ConfigDict:
  b = ml_collections.ConfigDict()
  # The fresh, larger language models trained on each corpus (the same token budget for all).
  b.transfer = ml_collections.ConfigDict()
  b.transfer.task = text.transformer()  # d_model 64, 2 blocks
  b.transfer.steps = 128
  b.transfer.batch_size = 32            # 4,096 sequences: the smallest kept corpus (keep 0.5)
  b.transfer.optimizer = 'adam'
  b.transfer.learning_rate = 3e-3
  b.transfer.evals = 8                  # test-loss evaluations per epoch (the run: one at most)

  b.seeds = (0, 1, 2)                   # each seeds the rater, valuations, subsets and fresh LMs
  b.keeps = (0.5, 0.7, 0.9)
  b.primary_keep = 0.7                  # acceptance 3 is judged here (decided before the run)
  b.methods = ('datarater', 'tracin', 'mimic', 'dvemb')
  return b
