"""Using a trained run: its weights (any kind of run) and KV-cache sampling."""
