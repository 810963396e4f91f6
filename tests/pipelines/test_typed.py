"""Nodes get their parameter groups as validated models: Kedro 1.7 builds them from the node annotations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from kedro.validation.parameter_validator import ParameterValidator
from kedro.validation.type_extractor import TypeExtractor
from kedro.validation.utils import _unwrap_optional
from pydantic import BaseModel

import lora_pipeline
from lora_pipeline.core.config import SCHEMAS
from lora_pipeline.core.errors import ConfigError

PACKAGE = Path(lora_pipeline.__file__).parent
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_parameter_input_of_every_pipeline_is_annotated_with_its_groups_model(registered):
    pipelines, _ = registered
    required = TypeExtractor(pipelines).extract_types_from_pipelines()
    used = {name.removeprefix("params:") for p in pipelines.values() for name in p.inputs() if name.startswith("params:")}
    assert set(required) == used  # no params: input reaches a node as a dict
    for key, annotation in required.items():
        assert _unwrap_optional(annotation) is SCHEMAS[key.rsplit(".", 1)[-1]], key


def test_kedro_builds_each_nodes_model_from_the_project_parameters(registered):
    pipelines, parameters = registered
    built = ParameterValidator(pipelines).validate_raw_params(parameters)
    assert isinstance(built["demo_lora"]["training"], SCHEMAS["training"])
    assert built["demo_lora"]["training"].output_name == "demo_lora"  # the subject's copy, with what it implies
    assert isinstance(built["llm_eval"], SCHEMAS["llm_eval"]) and isinstance(built["merge"], SCHEMAS["merge"])
    assert isinstance(parameters["demo_lora"]["training"], dict)  # the config loader's values stay as written


def test_a_typo_is_our_message_before_kedro_builds_any_model():
    from lora_pipeline.project.hooks import ValidateParametersHook

    class Loader(dict):
        runtime_params: dict = {}

    class Context:
        config_loader = Loader(parameters={"training": {"base_model": "b", "lora_rnak": 4}})

        @property
        def params(self):
            pytest.fail("context.params builds Kedro's models first, with Kedro's message")

    with pytest.raises(ConfigError, match=r"parameters_training\.yml:\n  - training\.lora_rnak: unknown parameter"):
        ValidateParametersHook().after_context_created(Context())


def test_no_node_module_parses_parameters():
    offenders = []
    for path in (PACKAGE / "pipelines").rglob("nodes.py"):
        for item in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(item, ast.Name) and item.id in ("parse_params", "validate_all"):
                offenders.append(str(path))
            if isinstance(item, ast.Attribute) and item.attr == "model_validate" and \
                    isinstance(item.value, ast.Name) and item.value.id.endswith("Params"):
                offenders.append(str(path))
    assert offenders == []


def test_parameter_models_are_logged_one_key_at_a_time(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lora_pipeline.pipelines import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("params")
    p = SCHEMAS["normalization"].model_validate({"resolution": 128, "prompt": {"trigger": "sks"}})
    with mlflow.start_run() as run:
        tracking.log_parameter_groups({"params:aki.normalization": p, "aki.images": object(), "params:x": {"a": 1}})
    params = MlflowClient().get_run(run.info.run_id).data.params
    # what the YAML set, flattened as kedro-mlflow flattens dicts; defaults are not params of the run
    assert params == {"aki.normalization.resolution": "128", "aki.normalization.prompt.trigger": "sks"}
    assert isinstance(p, BaseModel)
