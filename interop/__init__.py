"""Other formats: Hugging Face `transformers` checkpoints and configs, raw safetensors."""
