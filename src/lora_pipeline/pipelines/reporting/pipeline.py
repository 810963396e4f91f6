from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.reporting.nodes import summarize_subjects


def create_pipeline(subjects: list[str] | None = None, **kwargs) -> Pipeline:
    """The library's report, after every subject's training and evaluation."""
    inputs = [name for subject in subjects or [] for name in (f"{subject}.training_summary",
                                                                f"{subject}.evaluation_figures")]
    return pipeline([node(summarize_subjects, inputs, ["subjects_summary", "subjects_report"],
                          name="summarize_subjects")])
