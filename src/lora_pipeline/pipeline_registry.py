"""Every pipeline by the name users type in ``kedro run --pipelines <name>``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from lora_pipeline.pipelines import captioning, export, normalization, training


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "captioning": captioning.create_pipeline(),
        "normalization": normalization.create_pipeline(),
        "training": training.create_pipeline(),
        "export": export.create_pipeline(),
    }
    pipelines["data"] = pipelines["captioning"] + pipelines["normalization"]
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
