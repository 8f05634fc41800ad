"""DataRater on scikit-learn's handwritten digits with 20% symmetric label noise.

The default experiment: it needs no network (the digits ship inside scikit-learn and are
written once into a local TFDS dataset) and trains in a few minutes on 2 CPU cores.
Override any field from the command line, e.g. `--config.inner.steps=4`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'sklearn_digits'   # any TFDS image-classification dataset prepared in data_dir
  c.data.data_dir = ''             # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = 'train'     # what the inner models train on (corrupted below)
  c.data.heldout_split = 'validation'  # clean held-out data for the outer (meta) loss
  c.data.eval_split = 'test'       # final evaluation only
  c.data.label_noise = 0.2         # symmetric label noise rate p on the train split
  c.data.noise_seed = 0

  c.task_model = ml_collections.ConfigDict()
  c.task_model.hidden = (128, 128)
  c.task_model.activation = 'relu'

  c.rater = ml_collections.ConfigDict()
  c.rater.hidden = (128, 128)
  c.rater.activation = 'relu'
  c.rater.temperature = 1.0        # tau in w = B * softmax(score / tau)

  c.inner = ml_collections.ConfigDict()
  c.inner.steps = 2                # T: unrolled inner steps per outer step
  c.inner.population = 8           # K: inner models, each with its own optimizer state
  c.inner.batch_size = 128
  c.inner.optimizer = 'adam'       # 'sgd' | 'momentum' | 'adam'
  c.inner.learning_rate = 1e-3
  c.inner.reset_every = 200        # R: each member is re-initialised every R outer steps, staggered

  c.outer = ml_collections.ConfigDict()
  c.outer.steps = 600
  c.outer.batch_size = 128
  c.outer.learning_rate = 1e-3
  c.outer.warmup_steps = 50
  c.outer.clip_norm = 1.0
  # 'reverse' | 'remat' (jax.checkpoint per inner step: memory for compute) | 'mixed' (custom
  # backward, forward-over-reverse HVPs, memory nearly flat in T); see outer_loop.meta_step.
  c.outer.meta_gradient = 'reverse'
  # mixed only: how inner states come back on the backward pass. 'invert' runs momentum/Adam
  # backwards (no extra steps), 'replay' recomputes from kept states, 'auto' = invert if it can.
  c.outer.mixed_recompute = 'auto'
  c.outer.mixed_segment = 0        # steps between exact states kept (0: 16 invert, sqrt(T) replay)
  # invert only: the exact state each segment is undone from is 'replay'ed from the unroll's
  # input (memory flat in T, extra steps grow ~T^2/S) or 'keep' (T/S states stored, no extra).
  c.outer.mixed_boundaries = 'replay'

  c.log_every = 25
  c.checkpoint_every = 200

  # End-of-run report: fresh models trained on rater weights vs uniform weights.
  c.final_eval = ml_collections.ConfigDict()
  c.final_eval.train_steps = 300
  c.final_eval.num_models = 4
  return c
