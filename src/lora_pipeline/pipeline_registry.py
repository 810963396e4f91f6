"""Every pipeline by the name users type in ``kedro run --pipelines <name>``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from lora_pipeline.pipelines import (
    captioning, evaluation, export, generation, merge, normalization, training,
)


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = {
        "captioning": captioning.create_pipeline(),
        "normalization": normalization.create_pipeline(),
        "training": training.create_pipeline(),
        "export": export.create_pipeline(),
        "evaluation": evaluation.create_pipeline(),
        "generation": generation.create_pipeline(),
        "merge": merge.create_pipeline(),
    }
    pipelines["data"] = pipelines["captioning"] + pipelines["normalization"]
    # merge writes a multi-GB model for real bases: run it on purpose (kedro run --pipelines merge).
    pipelines["__default__"] = sum((p for n, p in pipelines.items() if n not in ("data", "merge")), Pipeline([]))
    return pipelines
