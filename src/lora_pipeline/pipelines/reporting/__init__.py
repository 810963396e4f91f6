"""The subjects report: one row per LoRA of the library."""

from lora_pipeline.pipelines.reporting.pipeline import create_pipeline  # noqa: F401
