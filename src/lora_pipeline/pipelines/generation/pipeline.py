from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.generation.nodes import generate_and_measure


def create_pipeline(subjects: list[str] | None = None, **kwargs) -> Pipeline:
    """One generation stage for the whole LoRA library: it runs after every subject's export (its inputs), so
    prompts can stack any of them, and ``kedro viz`` shows those links."""
    exports = [f"{name}.lora_kohya" for name in subjects or []]
    return pipeline(
        [
            node(generate_and_measure, ["params:generation", *exports],
                 ["generated_images", "contact_sheet", "comparison_grid", "comparison_statistics",
                  "comparison_report"], name="generate_images"),
        ]
    )
