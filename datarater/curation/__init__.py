"""Curation: scores files, keep thresholds, the TFDS writer and the filter built on them."""
