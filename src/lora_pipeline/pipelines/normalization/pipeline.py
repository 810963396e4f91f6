from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.normalization.nodes import build_training_metadata, inspect_images, render_images


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(inspect_images, ["raw_images", "params:normalization", "image_check_cache", "reg_images"],
                 "image_checks",
                 name="inspect_images"),
            node(
                build_training_metadata,
                ["image_checks", "captions", "params:normalization"],
                ["train_metadata", "train_metadata_snapshot", "quality_report", "dataset_info",
                 "normalization_metrics"],
                name="build_training_metadata",
            ),
            node(
                render_images,
                ["raw_images", "image_checks", "params:normalization", "reg_images", "train_metadata"],
                "normalized_images",
                name="render_images",
            ),
        ]
    )
