"""Every pipeline by the name users type in ``kedro run --pipelines <name>``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from lora_pipeline.pipelines import (
    captioning,
    evaluation,
    export,
    generation,
    llm_data,
    llm_eval,
    llm_export,
    llm_training,
    merge,
    normalization,
    training,
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
        "llm_data": llm_data.create_pipeline(),
        "llm_training": llm_training.create_pipeline(),
        "llm_export": llm_export.create_pipeline(),
        "llm_eval": llm_eval.create_pipeline(),
        "llm_merge": llm_export.create_merge_pipeline(),
    }
    image = ("captioning", "normalization", "training", "export", "evaluation", "generation")
    llm = ("llm_data", "llm_training", "llm_export", "llm_eval")
    pipelines["data"] = pipelines["captioning"] + pipelines["normalization"]
    pipelines["image"] = sum((pipelines[n] for n in image), Pipeline([]))
    pipelines["llm"] = sum((pipelines[n] for n in llm), Pipeline([]))
    # The merges write full-size models (GBs for real bases): run them on purpose, e.g. --pipelines merge.
    pipelines["__default__"] = pipelines["image"]
    return pipelines
