"""The networks: Skip-DiT, Skip-Latte, DyDiT, their presets, checkpoints and FLOP counts."""
