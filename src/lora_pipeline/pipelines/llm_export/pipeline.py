from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.llm_export.nodes import export_llm_adapter, export_llm_merged


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(export_llm_adapter, ["llm_adapter_weights", "llm_training_summary", "params:llm_training"],
                 ["llm_adapter", "llm_model_card"], name="export_llm_adapter"),
        ]
    )


def create_merge_pipeline(**kwargs) -> Pipeline:
    """``llm_merge``: base + adapter fused into one model folder (as large as the base model)."""
    return pipeline(
        [node(export_llm_merged, ["llm_adapter_weights", "llm_training_summary", "params:llm_training"],
              "llm_merged_model", name="export_llm_merged")]
    )
