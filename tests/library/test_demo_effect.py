"""The demo's claim in numbers: on the tiny SD1.x base pre-trained on the demo world (demo/pretrain.py), a LoRA
trained on red shapes raises the red share of the comparison grid's images with its weight (0 < 0.5 < 1), a LoRA
trained on striped backgrounds raises their stripe energy, and both stacked keep both.

The base is the one ``make demo`` builds, taken from the machine's cache (``~/.cache/lora_pipeline/pretrained``):
seconds when ``make demo`` (or an earlier run of this test) built it, about four minutes on a 2-core machine the
first time. The two LoRAs train here, on images of the same world generator, through the library's own trainer.
"""

from __future__ import annotations

import pytest
from train_helpers import summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import PromptSpec, TrainingParams
from lora_pipeline.core.files import sha256_file
from lora_pipeline.demo.pretrain import PretrainConfig, ensure_pretrained_sd
from lora_pipeline.demo.world import STRIPE_CYCLES, draw_random
from lora_pipeline.diffusion.evaluation import cell_statistics
from lora_pipeline.diffusion.generation import comparison_cells, inference_pipeline
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, save_lora_file
from lora_pipeline.diffusion.prompts import LoraRef
from lora_pipeline.diffusion.stack import load_stack
from lora_pipeline.diffusion.training import Example, train

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]
SIDE = 128  # the world's resolution
# name: trigger, what the world adds, steps, learning rate, LoRA targets (None: the defaults). As the Makefile's
# DEMO_PARAMS and conf/demo/subjects.yml train demo_lora (LoCon targets) and demo_stripes.
LOCON = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
SUBJECTS = {"red": ("redchar", dict(red=True), 400, 4e-3, LOCON), "stripes": ("stripechar", dict(stripes=True), 300, 3e-3, None)}


@pytest.fixture(scope="module")
def world_base(tmp_path_factory):
    return ensure_pretrained_sd(tmp_path_factory.mktemp("base") / "tiny-sd", PretrainConfig())


def _train_subject(base, name: str, tmp) -> str:
    trigger, world, steps, learning_rate, targets = SUBJECTS[name]
    folder = tmp / name
    folder.mkdir()
    examples = []
    for index in range(8):
        image, scene = draw_random(700 + index, (SIDE, SIDE), **world)
        path = folder / f"{index}.png"
        image.save(path)
        examples.append(Example(path, f"{trigger}, {scene.caption()}", SIDE, SIDE, sha256_file(path)))
    params = TrainingParams(base_model=str(base), device="cpu", lora_rank=4, alpha=8, batch_size=4, max_steps=steps,
                            learning_rate=learning_rate, save_steps=steps, checkpoint_dir=str(tmp / "checkpoints"),
                            resume="none", output_name=name, sample_prompts=[],
                            **({"unet_targets": targets} if targets else {}))
    components = load_diffusion_model(str(base))
    result = train(components, examples, params, DiskCache(tmp / "cache"), dataset_hash=name)
    state, metadata = build_kohya_file(result.lora_state, summary_for(params, result.spec), components.unet.config,
                                       "fp32", name, "tiny-sd")
    path = tmp / f"{name}.safetensors"
    save_lora_file(path, state, metadata)
    return str(path)


def test_each_demo_lora_shows_more_of_what_it_teaches_as_its_weight_grows(world_base, tmp_path):
    files = {name: _train_subject(world_base, name, tmp_path) for name in SUBJECTS}
    pipe = inference_pipeline(load_diffusion_model(str(world_base)).pipeline(), "cpu")
    load_stack(pipe, load_diffusion_model(str(world_base)).family, files)
    spec = PromptSpec(prompt="redchar, stripechar, circle, grey background, simple background", seed=3, steps=20,
                      guidance=3.0, width=SIDE, height=SIDE)
    cells = comparison_cells(pipe, spec, [LoraRef("red", 1.0), LoraRef("stripes", 1.0)], [0.0, 0.5, 1.0])
    rows = cell_statistics(cells, ["red_share", "stripe_energy"], STRIPE_CYCLES)
    red, stripes, stacked = rows[0:3], rows[3:6], rows[6]
    print("\n".join(f"{r['label']}: red {r['red_share']:.4f}, stripes {r['stripe_energy']:.4f}" for r in rows))
    assert red[0]["red_share"] < red[1]["red_share"] < red[2]["red_share"]
    assert red[2]["red_share"] > 0.05  # a twentieth of the picture red: the shape, not a few stray pixels
    assert stripes[0]["stripe_energy"] < stripes[1]["stripe_energy"] < stripes[2]["stripe_energy"]
    assert stripes[2]["stripe_energy"] > 0.15
    # each LoRA leaves the other's statistic near the base's, and stacked both stay
    assert stacked["red_share"] > (red[0]["red_share"] + red[2]["red_share"]) / 2
    assert stacked["stripe_energy"] > (stripes[0]["stripe_energy"] + stripes[2]["stripe_energy"]) / 2
