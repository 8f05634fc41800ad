"""Weighted inner training: scores -> per-example weights, one weighted step, T unrolled steps."""
from inner_loop.optimizers import make_inner_optimizer
from inner_loop.unroll import InnerState, init_inner_state, inner_step, unroll
from inner_loop.weighting import softmax_weights
