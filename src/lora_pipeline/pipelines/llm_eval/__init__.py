"""llm_eval: base vs adapter on held-out prompts (loss, exact match, token F1) and JSON validity."""

from lora_pipeline.pipelines.llm_eval.pipeline import create_pipeline

__all__ = ["create_pipeline"]
