from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.export.nodes import export_diffusers, export_kohya, write_model_card


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(export_kohya, ["lora_weights", "training_summary", "params:export"], "lora_kohya",
                 name="export_kohya"),
            node(export_diffusers, ["lora_weights", "training_summary"], "lora_diffusers", name="export_diffusers"),
            node(write_model_card, ["training_summary", "params:export"], "model_card", name="write_model_card"),
        ]
    )
