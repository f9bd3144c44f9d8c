"""Ingest jobs: LoRA warmup and per-example gradient features (CPU or GPU)."""
