from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.evaluation.nodes import evaluate_lora


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                evaluate_lora,
                ["normalized_images", "train_metadata_snapshot", "latent_cache", "lora_kohya", "training_summary",
                 "params:evaluation", "params:training"],
                ["evaluation_report", "evaluation_metrics", "evaluation_figures"],
                name="evaluate_lora",
            ),
        ]
    )
