"""lora-pipeline: images or prompt/response pairs in, LoRA adapters out."""
__version__ = "0.1.0"
