"""Evaluation: held-out denoising loss and (optional) CLIP adherence of base vs base+LoRA, plus a report."""

from lora_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
