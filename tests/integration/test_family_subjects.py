"""The newer families' demo subjects (conf/demo/subjects.yml: demo_sd3, demo_chroma, demo_z_image,
demo_qwen_image, demo_flux2) through Kedro in one `kedro run`: each is captioned, normalized, trained on its tiny
base, exported (kohya file with its family's header, diffusers folder) and evaluated, in one project with the SD1.x
subject beside them."""

from __future__ import annotations

import pytest
from kedro_helpers import build_project, run

from lora_pipeline.core.files import newest_version, read_safetensors_header

pytestmark = pytest.mark.slow

FAMILY_SUBJECTS = {"demo_sd3": "stable-diffusion-3-5-medium/lora", "demo_chroma": "chroma/lora",
                   "demo_z_image": "Z-Image/lora", "demo_qwen_image": "Qwen-Image/lora",
                   "demo_flux2": "flux-2-dev/lora"}


def test_each_family_subject_trains_exports_and_evaluates(tmp_path, tiny_models, _demo_images_template, monkeypatch):
    from kedro.framework.startup import bootstrap_project

    root = build_project(tmp_path / "project", tiny_models, _demo_images_template, subjects=tuple(FAMILY_SUBJECTS))
    monkeypatch.chdir(root)
    monkeypatch.setenv("KEDRO_ENV", "demo")
    bootstrap_project(root)
    run(root, "data", "training", "export", "evaluation")
    for subject, architecture in FAMILY_SUBJECTS.items():
        kohya = newest_version(root / f"data/07_model_output/{subject}.safetensors")
        header = read_safetensors_header(kohya)
        assert header.metadata["modelspec.architecture"] == architecture, subject
        assert any(key.startswith("lora_unet_") for key in header.keys), subject
        folder = newest_version(root / f"data/07_model_output/{subject}_diffusers")
        assert (folder / "pytorch_lora_weights.safetensors").is_file(), subject
        assert list((root / f"data/08_reporting/{subject}").glob("evaluation*")), subject
