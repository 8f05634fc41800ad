"""Data valuations with one API (fit/accumulate over training, then score), all on `pergrad`."""
from datarater.valuation.base import TrainingRun, Valuation, record_run
from datarater.valuation.dvemb import DataValueEmbedding
from datarater.valuation.mimic import Mimic, mimic_filter
from datarater.valuation.rater import RaterValuation
from datarater.valuation.tracin import TracIn
