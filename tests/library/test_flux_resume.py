"""Exact resume for Flux.1, as for SD1.x (tests/library/test_training.py): a flow-matching run interrupted after a
checkpoint and resumed ends tensor for tensor where an uninterrupted run ends, and a checkpoint of another flow
recipe (timestep_sampling, discrete_flow_shift) is never continued."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_params, run_dir

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.checkpoints import ResumeError, list_checkpoints
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.training import train

# Everything that draws from the run's generators: LoRA dropout, caption dropout and tag shuffling, the per-image
# sigma (the sigmoid draw, then shifted), the noise, a warmup + cosine schedule. tiny_examples has two buckets
# (64x64 and 96x64 px: 8x8 and 8x12 latents, both packable in 2x2 patches).
FLUX_SETTINGS = dict(max_steps=6, save_steps=2, lora_rank=4, alpha=2, learning_rate=5e-3, dropout=0.1,
                     caption_dropout=0.2, shuffle_tags=True, lr_scheduler="cosine", lr_warmup_steps=2)


def _flux_params(tiny_models, folder, **overrides):
    return make_params(tiny_models, folder, base_model=str(tiny_models["tiny-flux"]), **{**FLUX_SETTINGS, **overrides})


def _run(tiny_models, examples, folder, step_callback=None, **overrides):
    params = _flux_params(tiny_models, folder, **overrides)
    return train(load_diffusion_model(params.base_model), examples, params, DiskCache(folder / "cache"),
                 dataset_hash="d", step_callback=step_callback)


def _interrupt_at_3(step, components):
    if step == 3:  # after checkpoint-0000002, before checkpoint-0000004
        raise KeyboardInterrupt


def _interrupted(tiny_models, examples, folder, **overrides) -> None:
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_models, examples, folder, step_callback=_interrupt_at_3, **overrides)
    checkpoints = list_checkpoints(run_dir(folder / "checkpoints" / "test_lora"))
    assert [p.name for p in checkpoints] == ["checkpoint-0000002"]


@pytest.mark.parametrize("recipe", [{}, {"timestep_sampling": "logit_normal"}], ids=["shift", "logit_normal"])
def test_interrupted_then_resumed_flux_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path, recipe):
    straight = _run(tiny_models, tiny_examples, tmp_path / "a", **recipe)
    _interrupted(tiny_models, tiny_examples, tmp_path / "b", **recipe)
    resumed = _run(tiny_models, tiny_examples, tmp_path / "b", resume="latest", **recipe)
    assert resumed.resumed_from.endswith("checkpoint-0000002")
    assert len(straight.losses) == 6 and len(resumed.losses) == 4  # steps 3..6
    assert straight.losses[2:] == resumed.losses
    assert straight.lora_state.keys() == resumed.lora_state.keys()
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in straight.lora_state)
    for key, tensor in straight.lora_state.items():
        assert torch.equal(tensor, resumed.lora_state[key]), key
    assert any(not torch.equal(tensor, torch.zeros_like(tensor)) for key, tensor in straight.lora_state.items()
               if ".lora_B." in key)  # it did train: lora_B starts at zero


def test_a_flux_checkpoint_of_another_flow_recipe_is_not_continued(tiny_models, tiny_examples, tmp_path):
    _interrupted(tiny_models, tiny_examples, tmp_path)
    with pytest.raises(ResumeError, match="discrete_flow_shift: checkpoint None vs now 1.0"):
        _run(tiny_models, tiny_examples, tmp_path, resume="latest", discrete_flow_shift=1.0)
    with pytest.raises(ResumeError, match="timestep_sampling: checkpoint None vs now 'sigmoid'"):
        _run(tiny_models, tiny_examples, tmp_path, resume="latest", timestep_sampling="sigmoid")
    resumed = _run(tiny_models, tiny_examples, tmp_path, resume="latest")  # the same recipe goes on
    assert resumed.resumed_from.endswith("checkpoint-0000002") and len(resumed.losses) == 4
