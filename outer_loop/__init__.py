"""Meta-gradients of held-out loss through unrolled inner training, population, outer optimizer."""
