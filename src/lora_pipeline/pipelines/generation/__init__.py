"""Generation: prompts with stacked <lora:name:weight> tags, contact sheet and comparison grid."""

from lora_pipeline.pipelines.generation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
