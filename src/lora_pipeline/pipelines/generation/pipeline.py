from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.generation.nodes import generate_images


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(generate_images, ["lora_kohya", "params:generation"],
                 ["generated_images", "contact_sheet", "comparison_grid"], name="generate_images"),
        ]
    )
