"""Each component's root PRNG key, from the run's seed and the component's purpose.

`root_key(seed, purpose)` is fold_in(PRNGKey(seed), tag), one 32-bit tag per purpose (its name in
ASCII, as `pipeline.STREAM_TAG` tags the numpy stream), so components given the same seed draw
from different roots. PRNGKey(seed) as every root would start a rater run of seed s from the
parameters a trainer of seed s gives its first model (split(k, n)[i] is fold_in(k, i)), and give
the SAE the feature extractor's keys (both seeded by `features.seed`).
"""
import jax

PURPOSES = {
    'rater': 0x52415452,      # 'RATR': a rater run (the rater, its inner models, their resets)
    'train': 0x5452414E,      # 'TRAN': task models the trainer trains (launch.train, reports)
    'valuation': 0x56414C55,  # 'VALU': a valuation's recorded runs
    'features': 0x46454154,   # 'FEAT': the selection feature extractor (features.seed)
    'sae': 0x53414520,        # 'SAE ': the sparse autoencoder on those features (features.seed)
}
# How root keys derive from seeds. Recorded by the runs whose state does not hold every key they
# draw (launch.train's checkpoints, valuation fingerprints): a record of other keys is not reused.
KEYS_VERSION = 2


def root_key(seed, purpose: str) -> jax.Array:
  """The root key of `purpose` (a key of PURPOSES) for `seed` (an int, or traced: vmaps)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), PURPOSES[purpose])
