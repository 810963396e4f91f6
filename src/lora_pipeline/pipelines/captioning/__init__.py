"""Captioning: reviewed captions > kohya sidecars > cached auto captions > new auto captions."""

from lora_pipeline.pipelines.captioning.pipeline import create_pipeline

__all__ = ["create_pipeline"]
