"""Normalization: checked, oriented, RGB, bucketed images + metadata.csv + a row per input in a report."""

from lora_pipeline.pipelines.normalization.pipeline import create_pipeline

__all__ = ["create_pipeline"]
