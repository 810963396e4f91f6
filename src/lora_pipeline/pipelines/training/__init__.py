"""Training: LoRA on the normalized dataset, tracked in MLflow, checkpointed and resumable."""

from lora_pipeline.pipelines.training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
