import pytest
import torch
from diffusers import StableDiffusionPipeline

from lora_pipeline.core.errors import ModelNotFoundError
from lora_pipeline.diffusion.families import SD1
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.single_file import write_ldm_checkpoint


def test_single_file_ldm_checkpoint_loads_the_same_weights(tiny_models, tmp_path):
    folder = str(tiny_models["tiny-sd"])
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    checkpoint = write_ldm_checkpoint(reference, tmp_path / "tiny-v1-5-pruned.safetensors", SD1)
    with pytest.raises(ValueError, match="single_file_config"):
        load_diffusion_model(str(checkpoint))
    loaded = load_diffusion_model(str(checkpoint), single_file_config=folder)
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"


def test_missing_base_model_says_how_to_fix_it():
    with pytest.raises(ModelNotFoundError, match="allow_download: true"):
        load_diffusion_model("runwayml/stable-diffusion-v1-5")
