"""Export: kohya/WebUI .safetensors, diffusers folder, and a model card."""

from lora_pipeline.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
