"""The demo's claim in numbers: on the tiny SD1.x base pre-trained on the demo world (demo/pretrain.py), the grid of
``make demo`` shows ``demo_lora`` (trained on red shapes) raising the red share of its images with its weight
(0 < 0.5 < 1), ``demo_stripes`` (striped backgrounds) raising their stripe energy, and both stacked keeping both.

As ``make demo`` trains them: on the demo's own training sets (the data pipeline of ``kedro run --env demo`` on the
demo's images: auto-captions, sidecars, mixed buckets, the grayscale and transparent files), with the Makefile's
DEMO_PARAMS, and the grid of its prompts file's first prompt. The base is the one ``make demo`` builds, taken from
the machine's cache (``~/.cache/lora_pipeline/pretrained``): seconds when ``make demo`` (or an earlier run of this
test) built it, about five minutes on a 2-core machine the first time.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
from kedro.framework.startup import bootstrap_project
from kedro_helpers import REPO_ROOT, build_project, run
from train_helpers import summary_for

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import PromptSpec, TrainingParams
from lora_pipeline.demo.pretrain import PretrainConfig, ensure_pretrained_sd
from lora_pipeline.demo.world import STRIPE_CYCLES
from lora_pipeline.diffusion.dataset import build_examples
from lora_pipeline.diffusion.evaluation import cell_statistics
from lora_pipeline.diffusion.generation import comparison_cells, inference_pipeline
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, save_lora_file
from lora_pipeline.diffusion.prompts import LoraRef
from lora_pipeline.diffusion.stack import load_stack
from lora_pipeline.diffusion.training import train

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]
LOCON = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
# The Makefile's DEMO_PARAMS (checked below), on top of conf/demo/parameters_training.yml (CONF_DEMO) and
# conf/demo/subjects.yml (LoCon targets for demo_lora).
CONF_DEMO = dict(lora_rank=4, alpha=8, batch_size=4)
SUBJECTS = {"demo_lora": dict(max_steps=400, learning_rate=4e-3, lora_rank=32, alpha=64, unet_targets=LOCON),
            "demo_stripes": dict(max_steps=300, learning_rate=3e-3)}


@pytest.fixture(scope="module")
def world_base(tmp_path_factory):
    return ensure_pretrained_sd(tmp_path_factory.mktemp("base") / "tiny-sd", PretrainConfig())


@pytest.fixture(scope="module")
def demo_datasets(tmp_path_factory, tiny_models, _demo_images_template):
    """The two subjects' normalized training sets, as `kedro run --env demo` writes them."""
    root = build_project(tmp_path_factory.mktemp("demo") / "project", tiny_models, _demo_images_template,
                         subjects=tuple(SUBJECTS))
    with pytest.MonkeyPatch.context() as patch:  # as tests/integration/conftest.py's demo_project
        patch.chdir(root)
        patch.setenv("KEDRO_ENV", "demo")
        bootstrap_project(root)
        run(root, "data", namespaces=list(SUBJECTS))
    return {name: root / "data" / "03_primary" / name / "dataset" for name in SUBJECTS}


def test_the_makefile_trains_the_demo_loras_as_this_test_does():
    [line] = re.findall(r"^DEMO_PARAMS := (.*)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    demo_params = dict(item.split("=") for item in line.split(","))
    for name, settings in SUBJECTS.items():
        for key, value in settings.items():
            if key != "unet_targets":  # conf/demo/subjects.yml
                assert float(demo_params[f"{name}.training.{key}"]) == value, (name, key)


def _train_subject(base, name: str, dataset, tmp) -> str:
    examples = build_examples(dataset, pd.read_csv(dataset / "metadata.csv"))
    settings = {**CONF_DEMO, **SUBJECTS[name]}
    params = TrainingParams(base_model=str(base), device="cpu", save_steps=settings["max_steps"],
                            checkpoint_dir=str(tmp / "checkpoints"), resume="none", output_name=name,
                            sample_prompts=[], **settings)
    components = load_diffusion_model(str(base))
    result = train(components, examples, params, DiskCache(tmp / "cache"), dataset_hash=name, keep_tokens=1)
    state, metadata = build_kohya_file(result.lora_state, summary_for(params, result.spec), components.unet.config,
                                       "fp32", name, "tiny-sd")
    path = tmp / f"{name}.safetensors"
    save_lora_file(path, state, metadata)
    return str(path)


def test_each_demo_lora_shows_more_of_what_it_teaches_as_its_weight_grows(world_base, demo_datasets, tmp_path):
    files = {name: _train_subject(world_base, name, demo_datasets[name], tmp_path) for name in SUBJECTS}
    components = load_diffusion_model(str(world_base))
    pipe = inference_pipeline(components.pipeline(), "cpu")
    load_stack(pipe, components.family, files)
    # make demo's grid: its prompts file's first prompt, seed and stacking weights (demo/assets.py write_demo_prompts)
    spec = PromptSpec(prompt="lorachar, stripechar, circle", seed=1, steps=20, guidance=3.0, width=128, height=128)
    cells = comparison_cells(pipe, spec, [LoraRef("demo_lora", 0.6), LoraRef("demo_stripes", 0.8)], [0.0, 0.5, 1.0])
    rows = cell_statistics(cells, ["red_share", "stripe_energy"], STRIPE_CYCLES)
    red, stripes, stacked = rows[0:3], rows[3:6], rows[6]
    print("\n".join(f"{r['label']}: red {r['red_share']:.4f}, stripes {r['stripe_energy']:.4f}" for r in rows))
    assert red[0]["red_share"] < red[1]["red_share"] < red[2]["red_share"]
    assert red[1]["red_share"] > 0.02  # at 0.5 already a red shape, not a few stray pixels
    assert red[2]["red_share"] > 0.05
    assert stripes[0]["stripe_energy"] < stripes[1]["stripe_energy"] < stripes[2]["stripe_energy"]
    assert stripes[2]["stripe_energy"] > 5 * stripes[0]["stripe_energy"]
    # Stacked, both stay: the stacked cell clears the bars each LoRA clears alone at weight 1. (Not the midpoint of
    # weights 0 and 1: the stripe energy is a share of the picture's brightness variation, and the red LoRA's larger
    # shape takes some of it: at five of the seeds 0-5, stacked kept 0.27-0.49 of the stripe share at weight 1.)
    assert stacked["red_share"] > 0.05
    assert stacked["stripe_energy"] > 5 * stripes[0]["stripe_energy"]
