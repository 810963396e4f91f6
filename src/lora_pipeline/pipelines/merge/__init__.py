"""Merge: fuse one or several LoRAs into the base model (diffusers folder + WebUI single-file checkpoint)."""

from lora_pipeline.pipelines.merge.pipeline import create_pipeline

__all__ = ["create_pipeline"]
