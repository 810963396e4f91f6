from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.llm_training.nodes import train_llm_lora


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [node(train_llm_lora, ["llm_train", "llm_validation", "params:llm_data", "params:llm_training"],
              ["llm_adapter_weights", "llm_training_summary"], name="train_llm_lora")]
    )
