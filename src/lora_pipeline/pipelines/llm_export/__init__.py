"""llm_export: the PEFT adapter folder (PeftModel.from_pretrained), optionally a merged model, a model card."""

from lora_pipeline.pipelines.llm_export.pipeline import create_merge_pipeline, create_pipeline

__all__ = ["create_merge_pipeline", "create_pipeline"]
