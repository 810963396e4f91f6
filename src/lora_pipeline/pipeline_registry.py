"""Every pipeline by the name users type in ``kedro run --pipelines <name>``.

The image stages (captioning -> evaluation) run once per subject, each under the subject's Kedro namespace
(``kedro run --namespaces aki`` runs one). Generation and merge work on the whole LoRA library; the LLM track
is not per subject.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline, pipeline

from lora_pipeline.pipelines import (
    generation,
    llm_data,
    llm_eval,
    llm_export,
    llm_training,
    merge,
    reporting,
)
from lora_pipeline.pipelines.stages import SHARED_DATASETS, SUBJECT_STAGES
from lora_pipeline.project.subjects import project_subjects


def per_subject(template: Pipeline, subjects: list[str]) -> Pipeline:
    """The stage once per subject, each under its namespace (datasets ``aki.captions``, ``params:aki.training``)
    and tagged with its name, so that ``kedro run --tags aki,llm`` runs one subject and the LLM track together."""
    shared = SHARED_DATASETS & template.datasets()
    return sum((pipeline(template, namespace=name, inputs=shared or None, tags=name) for name in subjects),
               Pipeline([]))


def register_pipelines() -> dict[str, Pipeline]:
    subjects = list(project_subjects())
    pipelines = {name: per_subject(module.create_pipeline(), subjects) for name, module in SUBJECT_STAGES.items()}
    # Tags for `kedro run --tags`: "library" for the stages over every subject's LoRA, "llm" for the LLM track.
    pipelines.update({
        "generation": pipeline(generation.create_pipeline(subjects=subjects), tags="library"),
        "reporting": pipeline(reporting.create_pipeline(subjects=subjects), tags="library"),
        "merge": merge.create_pipeline(),
        "llm_data": pipeline(llm_data.create_pipeline(), tags="llm"),
        "llm_training": pipeline(llm_training.create_pipeline(), tags="llm"),
        "llm_export": pipeline(llm_export.create_pipeline(), tags="llm"),
        "llm_eval": pipeline(llm_eval.create_pipeline(), tags="llm"),
        "llm_merge": llm_export.create_merge_pipeline(),
    })
    image = ("captioning", "normalization", "training", "export", "evaluation", "reporting", "generation")
    llm = ("llm_data", "llm_training", "llm_export", "llm_eval")
    pipelines["data"] = pipelines["captioning"] + pipelines["normalization"]
    pipelines["image"] = sum((pipelines[n] for n in image), Pipeline([]))
    pipelines["llm"] = sum((pipelines[n] for n in llm), Pipeline([]))
    # The merges write full-size models (GBs for real bases): run them on purpose, e.g. --pipelines merge.
    pipelines["__default__"] = pipelines["image"]
    return pipelines
