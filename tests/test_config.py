import pytest

from lora_pipeline.core.config import CaptioningParams, NormalizationParams, parse_params, validate_all
from lora_pipeline.core.errors import ConfigError


def test_unknown_key_is_named_with_the_known_keys():
    with pytest.raises(ConfigError) as info:
        parse_params(NormalizationParams, {"min_sise": 512}, "normalization")
    message = str(info.value)
    assert "normalization.min_sise: unknown parameter" in message
    assert "min_size" in message and "parameters_normalization.yml" in message


def test_unknown_backend_lists_allowed_values():
    with pytest.raises(ConfigError, match="'sidecar', 'blip', 'clip_tags' or 'wd14'"):
        parse_params(CaptioningParams, {"backend": "gpt"}, "captioning")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"min_size": 0}, "normalization.min_size"),
        ({"resolution": 500}, "multiple of bucket_step"),
        ({"bucket_min": 1024, "bucket_max": 512}, "must not exceed"),
        ({"background": [0, 0, 300]}, "between 0 and 255"),
        ({"prompt": {"keep_tokens": -1}}, "normalization.prompt.keep_tokens"),
    ],
)
def test_out_of_range_values_are_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_params(NormalizationParams, override, "normalization")


def test_backends_that_need_a_model_say_so():
    with pytest.raises(ConfigError, match="needs 'model'"):
        parse_params(CaptioningParams, {"backend": "blip"}, "captioning")
    with pytest.raises(ConfigError, match="vocabulary"):
        parse_params(CaptioningParams, {"backend": "clip_tags", "model": "x"}, "captioning")
    with pytest.raises(ConfigError, match="must contain '{caption}'"):
        parse_params(CaptioningParams, {"backend": "sidecar", "template": "{trigger}"}, "captioning")


def test_validate_all_checks_known_groups_and_refuses_unknown_ones():
    assert set(validate_all({"normalization": {}})) == {"normalization"}
    with pytest.raises(ConfigError, match="something_else: unknown parameter group"):
        validate_all({"normalization": {}, "something_else": {"x": 1}})
    with pytest.raises(ConfigError):
        validate_all({"captioning": {"backend": "sidecar", "batch_size": 0}})


def test_resolution_auto_follows_the_base_model_family(tiny_models):
    from lora_pipeline.core.config import NormalizationParams
    from lora_pipeline.pipelines.normalization.nodes import sized_params

    sd1 = sized_params(NormalizationParams(base_model=str(tiny_models["tiny-sd"])))
    sdxl = sized_params(NormalizationParams(base_model=str(tiny_models["tiny-sdxl"])))
    assert (sd1.resolution, sd1.bucket_min, sd1.bucket_max) == (512, 256, 1024)
    assert (sdxl.resolution, sdxl.bucket_min, sdxl.bucket_max) == (1024, 512, 2048)
    assert sized_params(NormalizationParams(base_model="someone/not-downloaded", base_model_family="sdxl")
                        ).resolution == 1024
    explicit = NormalizationParams(resolution=768, bucket_min=512, bucket_max=1024).sized(1024)
    assert (explicit.resolution, explicit.bucket_min, explicit.bucket_max) == (768, 512, 1024)
    with pytest.raises(ConfigError, match="resolution is 1024.*explicitly"):
        NormalizationParams(bucket_max=768).sized(1024)


def test_llm_errors_name_the_file_that_exists():
    from lora_pipeline.core.config import LLMTrainingParams

    with pytest.raises(ConfigError, match=r"conf/\*/parameters_llm\.yml") as info:
        parse_params(LLMTrainingParams, {"base_model": "x", "init_adaptr": "latest"}, "llm_training")
    assert "did you mean 'init_adapter'" in str(info.value)
