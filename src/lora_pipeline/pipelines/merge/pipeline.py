from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.merge.nodes import merge_loras


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [node(merge_loras, ["params:merge", "params:generation"], ["merged_model", "merged_checkpoint"],
              name="merge_loras")]
    )
