from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.training.nodes import train_lora


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                train_lora,
                ["normalized_images", "train_metadata_snapshot", "dataset_info", "latent_cache", "params:training"],
                ["lora_weights", "training_summary"],
                name="train_lora",
            ),
        ]
    )
