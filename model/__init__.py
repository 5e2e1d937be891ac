"""Skip-DiT networks, cache policies, checkpoints and the sampling pipeline."""
