"""Diffusion LoRAs: model families, loading, training, LoRA file formats, stacking, generation, evaluation."""
