from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.captioning.nodes import caption_images, captions_to_metadata, scan_images


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(scan_images, ["raw_images", "caption_cache", "params:captioning"], "image_manifest",
                 name="scan_images"),
            node(
                caption_images,
                ["image_manifest", "reviewed_captions", "caption_cache", "raw_images", "params:captioning"],
                ["captions", "captioning_metrics"],
                name="caption_images",
            ),
            node(captions_to_metadata, "captions", "captions_metadata", name="captions_to_metadata"),
        ]
    )
