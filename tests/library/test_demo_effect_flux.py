"""The demo's claim on the tiny Flux.1 base pre-trained on the demo world (demo/pretrain_flux.py): a LoRA trained on
red shapes raises the red share of the comparison grid's images with its weight (0 < 0.5 < 1).

The base comes from the machine's cache (``~/.cache/lora_pipeline/pretrained/tiny-flux-<key>``): seconds when an
earlier run built it, about two minutes on a 2-core machine the first time. The LoRA trains here, on images of the
same world generator, through the library's own trainer, and is read back from its exported kohya file.
"""

from __future__ import annotations

import pytest
from train_helpers import summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import PromptSpec, TrainingParams
from lora_pipeline.core.files import sha256_file
from lora_pipeline.demo.pretrain_flux import PretrainFluxConfig, ensure_pretrained_flux
from lora_pipeline.demo.world import STRIPE_CYCLES, draw_random
from lora_pipeline.diffusion.evaluation import cell_statistics
from lora_pipeline.diffusion.families import FLUX
from lora_pipeline.diffusion.generation import comparison_cells, inference_pipeline
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, save_lora_file
from lora_pipeline.diffusion.prompts import LoraRef
from lora_pipeline.diffusion.stack import load_stack
from lora_pipeline.diffusion.training import Example, train

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]
SIDE = 128  # the world's resolution
TRIGGER, STEPS, LEARNING_RATE = "redchar", 250, 3e-3


@pytest.fixture(scope="module")
def flux_world_base(tmp_path_factory):
    return ensure_pretrained_flux(tmp_path_factory.mktemp("base") / "tiny-flux", PretrainFluxConfig())


def _train_red(base, tmp) -> str:
    folder = tmp / "red"
    folder.mkdir()
    examples = []
    for index in range(8):
        image, scene = draw_random(700 + index, (SIDE, SIDE), red=True)
        path = folder / f"{index}.png"
        image.save(path)
        examples.append(Example(path, f"{TRIGGER}, {scene.caption()}", SIDE, SIDE, sha256_file(path)))
    params = TrainingParams(base_model=str(base), device="cpu", lora_rank=4, alpha=8, batch_size=4, max_steps=STEPS,
                            learning_rate=LEARNING_RATE, save_steps=STEPS, checkpoint_dir=str(tmp / "checkpoints"),
                            resume="none", output_name="red", sample_prompts=[])
    components = load_diffusion_model(str(base))
    result = train(components, examples, params, DiskCache(tmp / "cache"), dataset_hash="red")
    summary = summary_for(params, result.spec, family="flux", unet_layout=FLUX.naming_layout(components.denoiser.config),
                          recipe=FLUX.recipe(params, components.denoiser.config))
    state, metadata = build_kohya_file(result.lora_state, summary, summary.unet_config(), "fp32", "red", "tiny-flux")
    path = tmp / "red.safetensors"
    save_lora_file(path, state, metadata)
    return str(path)


def test_the_red_lora_shows_more_red_as_its_weight_grows_on_flux(flux_world_base, tmp_path):
    path = _train_red(flux_world_base, tmp_path)
    pipe = inference_pipeline(load_diffusion_model(str(flux_world_base)).pipeline(), "cpu")
    load_stack(pipe, FLUX, {"red": path})
    spec = PromptSpec(prompt=f"{TRIGGER}, circle, grey background, simple background", seed=3, steps=20,
                      guidance=3.0, width=SIDE, height=SIDE)
    cells = comparison_cells(pipe, spec, [LoraRef("red", 1.0)], [0.0, 0.5, 1.0])
    red = cell_statistics(cells, ["red_share"], STRIPE_CYCLES)[0:3]
    print("\n".join(f"{r['label']}: red {r['red_share']:.4f}" for r in red))
    assert red[0]["red_share"] < red[1]["red_share"] < red[2]["red_share"]
    assert red[2]["red_share"] > 0.05  # a red shape, not a few red pixels
