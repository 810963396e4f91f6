"""llm_data: validate prompt/response JSONL (line-numbered report), deduplicate, split, tokenize-check."""

from lora_pipeline.pipelines.llm_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
