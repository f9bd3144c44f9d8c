"""Models: Hugging Face folders and GGUF files, LoRA wrapping, tiny test models."""
