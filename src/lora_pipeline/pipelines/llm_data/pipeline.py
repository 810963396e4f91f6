from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.llm_data.nodes import prepare_llm_data


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [node(prepare_llm_data, ["llm_raw", "params:llm_data"],
              ["llm_train", "llm_validation", "llm_data_report", "llm_data_metrics"], name="prepare_llm_data")]
    )
