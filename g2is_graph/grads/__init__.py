"""Per-example LoRA gradients, Adam-adjusted features and the random projection."""
