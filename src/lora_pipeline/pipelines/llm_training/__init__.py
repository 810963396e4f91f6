"""llm_training: LoRA (PEFT) on a causal LM, loss on the response only, eval loss per epoch."""

from lora_pipeline.pipelines.llm_training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
