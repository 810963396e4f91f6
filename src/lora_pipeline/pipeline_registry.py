"""Every pipeline by the name users type in ``kedro run --pipelines <name>``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from lora_pipeline.pipelines import captioning, normalization


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "captioning": captioning.create_pipeline(),
        "normalization": normalization.create_pipeline(),
    }
    pipelines["data"] = pipelines["captioning"] + pipelines["normalization"]
    pipelines["__default__"] = pipelines["data"]
    return pipelines
