from kedro.pipeline import Pipeline, node, pipeline

from lora_pipeline.pipelines.llm_eval.nodes import evaluate_llm


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [node(evaluate_llm, ["llm_validation", "llm_adapter", "llm_training_summary", "params:llm_data",
                             "params:llm_training", "params:llm_eval"], ["llm_eval_report", "llm_eval_metrics"],
              name="evaluate_llm")]
    )
