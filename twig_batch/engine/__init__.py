"""Token generation: sampling, the reference loop and the batched engine."""
