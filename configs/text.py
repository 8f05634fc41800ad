"""DataRater for a byte-level transformer language model on Python's documentation and code.

The dataset `python_text` (datarater/data/python_text.py; needs Debian's `python3.11-doc`) is
built here from installed files: its train split mixes clean prose, code and prose corrupted in
five recorded ways (random bytes, shuffled words, boilerplate, markup only, truncated words);
heldout and test are clean prose from other documents. The inner model is a small decoder-only
transformer (datarater/tasks/lm.py), the rater a one-block transformer scoring whole sequences.
Sized for 2 CPU cores. One config serves every launcher, with the sections of configs/digits.py.
"""
import ml_collections

from configs import digits


def transformer(name: str = 'transformer_lm', **fields) -> ml_collections.ConfigDict:
  c = {'name': name, 'vocab': 256, 'd_model': 64, 'num_heads': 4, 'num_layers': 2,
       'd_mlp': 128, 'max_len': 128, 'activation': 'gelu', 'input': 'tokens',
       # Mixed precision, as in configs/digits.py ('': float32; e.g. --config.task.dtype=bfloat16)
       'dtype': '', 'param_dtype': ''}
  if name == 'transformer_lm':
    c['token_weights'] = ''   # a float feature [L] weighing each next-token loss ('': none)
  else:
    c['causal'] = False       # the sequence rater reads the whole sequence both ways
  c.update(fields)
  return ml_collections.ConfigDict(c)


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config()

  c.data.name = 'python_text'
  c.data.train_split = 'train'     # clean prose, code and corrupted prose, recorded per sequence
  c.data.heldout_split = 'heldout'  # clean prose (the outer loss)
  c.data.eval_split = 'test'       # clean prose from yet other documents
  c.data.label_noise = 0.0         # the dataset records its own corruption: plant none

  c.task = transformer()           # loss: mean next-byte negative log-likelihood (nats)
  c.rater = transformer('sequence_rater', d_model=32, num_heads=2, num_layers=1, d_mlp=64,
                        temperature=1.0)

  c.inner.steps = 2
  c.inner.population = 2          # K and B sized for 2 CPU cores (about 4x less than K=4, B=32)
  c.inner.batch_size = 16
  c.inner.optimizer = 'adam'
  c.inner.learning_rate = 3e-3
  c.inner.reset_every = 100

  c.outer.steps = 300
  c.outer.batch_size = 16
  c.outer.warmup_steps = 30

  c.log_every = 100                # each log scores all of train with the rater
  c.checkpoint_every = 100

  c.final_eval.train_steps = 200
  c.final_eval.num_models = 2

  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.seeds = (0,)

  v = c.valuation
  v.train_steps = 300
  v.batch_size = 32
  v.learning_rate = 0.3
  v.checkpoint_every = 30
  v.layers = ''                    # all parameters ('head' = the output layer)
  v.projection = 'kronecker'
  v.chunk_size = 16
  v.tracin_ghost = True            # all Dense layers: exact self-influence, heldout_cos norms
  v.reference_steps = 200
  v.dvemb_curvature = 'empirical_fisher'  # no class labels: no Gauss-Newton
  v.dvemb_steps = 100

  c.features.extractor = 'penultimate'  # the mean-pooled final states of a briefly trained LM
  c.features.task = transformer(d_model=32, num_heads=2, num_layers=1, d_mlp=64)
  c.features.train_steps = 100
  c.features.batch_size = 32

  c.sae.num_factors = 64
  c.sae.steps = 1000
  c.sae_scores.class_conditional = False  # no class labels (so no label guard either)
  c.sae_scores.mislabel_guard = 'off'
  return c
