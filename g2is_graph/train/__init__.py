"""LoRA training loops: the warmup's and fine-tuning on a selection."""
