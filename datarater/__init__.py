"""datarater: learned data curation in JAX/Flax. `datarater.load_rater(DIR)` loads a rater."""


def __getattr__(name):
  # Lazy, so `import datarater.x` stays light and free of import cycles.
  if name == 'load_rater':
    from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
    return load_rater
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
