import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import make_params, model_outputs, run_dir

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.checkpoints import ResumeError, find_resume_checkpoint, list_checkpoints
from lora_pipeline.core.errors import LoraPipelineError
from lora_pipeline.core.trainer import NonFiniteLossError
from lora_pipeline.diffusion.caches import encode_latents
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import build_kohya_file, read_lora_modules, save_lora_file, to_peft_state
from lora_pipeline.diffusion.training import (
    bucket_batches,
    denoising_loss,
    inject_lora,
    load_lora_state,
    lora_spec,
    prepare_caption,
    train,
)


def test_bucket_batches_never_mix_buckets_and_are_reproducible(tiny_examples):
    batches = bucket_batches(tiny_examples, 4, repeats=2, seed=1, epoch=0)
    assert sum(len(b) for b in batches) == 2 * len(tiny_examples)
    for batch in batches:
        assert len({(tiny_examples[i].width, tiny_examples[i].height) for i in batch}) == 1
    assert batches == bucket_batches(tiny_examples, 4, repeats=2, seed=1, epoch=0)
    assert batches != bucket_batches(tiny_examples, 4, repeats=2, seed=1, epoch=1)


def test_prepare_caption_keeps_leading_tokens():
    import random

    rng = random.Random(0)
    for _ in range(20):
        out = prepare_caption("sks, red dress, a, b, c, d", rng, dropout=0.0, shuffle=True, keep_tokens=2)
        assert out.startswith("sks, red dress, ") and sorted(out.split(", ")[2:]) == ["a", "b", "c", "d"]
    assert prepare_caption("sks, x", random.Random(0), dropout=1.0, shuffle=False, keep_tokens=1) == ""


def test_training_lowers_a_fixed_denoising_loss(tiny_models, tiny_examples, tmp_path):
    params = make_params(tiny_models, tmp_path, max_steps=30, learning_rate=2e-3, batch_size=4)
    components = load_diffusion_model(params.base_model)
    cache = DiskCache(tmp_path / "cache")
    keys, encoded = encode_latents(components, tiny_examples, cache, torch.device("cpu"))
    assert encoded == len(tiny_examples)
    before = denoising_loss(components, tiny_examples, cache, keys)
    result = train(components, tiny_examples, params, cache, dataset_hash="d")
    after = denoising_loss(components, tiny_examples, cache, keys)
    assert after < before * 0.95, (before, after)
    assert len(result.losses) == 30 and result.images_per_second > 0
    assert encode_latents(components, tiny_examples, cache, torch.device("cpu"))[1] == 0  # all cached now


def _final_state(tiny_models, examples, tmp_path, **overrides):
    params = make_params(tiny_models, tmp_path, **overrides)
    return train(load_diffusion_model(params.base_model), examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d")


def test_interrupted_then_resumed_run_equals_uninterrupted(tiny_models, tiny_examples, tmp_path):
    settings = dict(max_steps=6, save_steps=2, dropout=0.1, caption_dropout=0.2, shuffle_tags=True,
                    lr_scheduler="cosine", lr_warmup_steps=2, noise_offset=0.05, min_snr_gamma=5.0)
    straight = _final_state(tiny_models, tiny_examples, tmp_path / "a", **settings)

    def interrupt(step, components):
        if step == 3:
            raise KeyboardInterrupt

    params = make_params(tiny_models, tmp_path / "b", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "b" / "cache"),
              dataset_hash="d", step_callback=interrupt)
    assert [p.name for p in list_checkpoints(run_dir(tmp_path / "b" / "checkpoints" / "test_lora"))] == ["checkpoint-0000002"]
    resumed = _final_state(tiny_models, tiny_examples, tmp_path / "b", resume="latest", **settings)
    assert resumed.resumed_from.endswith("checkpoint-0000002")
    assert len(resumed.losses) == 4  # steps 3..6
    assert straight.losses[2:] == resumed.losses
    assert straight.lora_state.keys() == resumed.lora_state.keys()
    for key, tensor in straight.lora_state.items():
        assert torch.equal(tensor, resumed.lora_state[key]), key


def test_resume_never_silently_starts_over(tiny_models, tiny_examples, tmp_path):
    with pytest.raises(ResumeError, match="no intact checkpoint"):
        _final_state(tiny_models, tiny_examples, tmp_path, resume="latest")
    _final_state(tiny_models, tiny_examples, tmp_path, max_steps=4, save_steps=2)
    with pytest.raises(ResumeError, match="learning_rate: checkpoint 0.001 vs now 0.01"):
        _final_state(tiny_models, tiny_examples, tmp_path, max_steps=4, resume="latest", learning_rate=1e-2)
    with pytest.raises(ResumeError, match="already finished"):
        _final_state(tiny_models, tiny_examples, tmp_path, max_steps=4, resume="latest")
    longer = _final_state(tiny_models, tiny_examples, tmp_path, max_steps=6, resume="latest")
    assert longer.resumed_from.endswith("checkpoint-0000004") and len(longer.losses) == 2
    fresh = _final_state(tiny_models, tiny_examples, tmp_path, max_steps=4, resume="auto", learning_rate=1e-2)
    assert fresh.resumed_from is None and len(fresh.losses) == 4  # auto: another run's checkpoint is not used


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tiny_models, tiny_examples, tmp_path):
    _final_state(tiny_models, tiny_examples, tmp_path, max_steps=6, save_steps=2)
    folder = run_dir(tmp_path / "checkpoints" / "test_lora")
    latest = list_checkpoints(folder)[-1]
    data = (latest / "lora.safetensors").read_bytes()
    (latest / "lora.safetensors").write_bytes(data[: len(data) // 2])
    assert find_resume_checkpoint("latest", folder).name == "checkpoint-0000004"


def _poison_after_step_2(step, components):
    if step == 2:
        for name, param in components.unet.named_parameters():
            if "lora_A" in name:
                param.data.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_models, tiny_examples, tmp_path):
    params = make_params(tiny_models, tmp_path, max_steps=6, save_steps=2)
    with pytest.raises(NonFiniteLossError, match="step 2.*checkpoint-0000002.*bf16"):
        train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
              dataset_hash="d", step_callback=_poison_after_step_2)
    [kept] = list_checkpoints(run_dir(tmp_path / "checkpoints" / "test_lora"))
    assert find_resume_checkpoint("latest", kept.parent) == kept


@pytest.mark.parametrize("new_alpha", [8.0, 2.0])
def test_init_from_exported_lora_reproduces_it_at_step_zero(trained, tiny_models, tmp_path, new_alpha):
    state, metadata = build_kohya_file(trained["result"].lora_state, trained["summary"], trained["summary"].unet_config(), "fp32", "t", "tiny")
    save_lora_file(tmp_path / "t.safetensors", state, metadata)
    params = make_params(tiny_models, tmp_path, train_text_encoder=True, alpha=new_alpha)
    components = load_diffusion_model(params.base_model)
    init = to_peft_state(read_lora_modules(tmp_path / "t.safetensors", components.family, components.modules()),
                         target_scale=params.alpha / params.lora_rank)
    inject_lora(components, lora_spec(params, components.family))
    load_lora_state(components, init, "init")
    unet_out, te_out = model_outputs(components)
    assert torch.allclose(unet_out, trained["outputs"][0], atol=1e-5)
    assert torch.allclose(te_out, trained["outputs"][1], atol=1e-5)


def test_init_lora_with_wrong_rank_says_what_to_change(trained, tiny_models, tmp_path):
    params = make_params(tiny_models, tmp_path, lora_rank=2)
    components = load_diffusion_model(params.base_model)
    inject_lora(components, lora_spec(params, components.family))
    unet_only = {k: v for k, v in trained["result"].lora_state.items() if k.startswith("unet.")}
    with pytest.raises(LoraPipelineError, match="set training.lora_rank"):
        load_lora_state(components, unet_only, "init")


def test_checkpoints_are_pruned_to_keep_checkpoints(tiny_models, tiny_examples, tmp_path):
    _final_state(tiny_models, tiny_examples, tmp_path, max_steps=6, save_steps=1, keep_checkpoints=2)
    names = [p.name for p in list_checkpoints(run_dir(tmp_path / "checkpoints" / "test_lora"))]
    assert names == ["checkpoint-0000005", "checkpoint-0000006"]
    assert not list(run_dir(tmp_path / "checkpoints" / "test_lora").glob(".*tmp"))
    shutil.rmtree(tmp_path / "checkpoints")


@pytest.mark.parametrize("cache_latents", [True, False])
def test_dataloader_workers_do_not_change_the_run(tiny_models, tiny_examples, tmp_path, cache_latents):
    inline = _final_state(tiny_models, tiny_examples, tmp_path / "a", max_steps=3, cache_latents=cache_latents,
                          data_workers=0)
    workers = _final_state(tiny_models, tiny_examples, tmp_path / "b", max_steps=3, cache_latents=cache_latents,
                           data_workers=2)
    assert inline.losses == workers.losses
    for key, tensor in inline.lora_state.items():
        assert torch.equal(tensor, workers.lora_state[key]), key


def test_windowed_loss_readback_still_stops_before_saving_a_nan_checkpoint(tiny_models, tiny_examples, tmp_path):
    # Losses are read back every 5 steps, but a checkpoint is due at step 4: the read-back before it finds step 2.
    params = make_params(tiny_models, tmp_path, max_steps=8, save_steps=4, log_every_steps=5)
    with pytest.raises(NonFiniteLossError, match="step 2.*none saved yet"):
        train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
              dataset_hash="d", step_callback=_poison_after_step_2)
    assert not list((tmp_path / "checkpoints" / "test_lora").glob("run-*/checkpoint-*"))


def test_metrics_are_reported_once_per_window_with_every_step_loss_kept(tiny_models, tiny_examples, tmp_path):
    params = make_params(tiny_models, tmp_path, max_steps=7, log_every_steps=3)
    seen = []
    result = train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
                   dataset_hash="d", on_metrics=lambda metrics, step: seen.append((step, metrics["loss"])))
    assert [step for step, _ in seen] == [3, 6, 7]
    assert len(result.losses) == 7
    assert seen[0][1] == pytest.approx(sum(result.losses[:3]) / 3)
    assert seen[-1][1] == pytest.approx(result.losses[6])


def test_subjects_with_different_precision_train_one_after_another_in_one_process(tiny_models, tiny_examples,
                                                                                  tmp_path):
    """One `kedro run` trains subject after subject in one process; accelerate's process-wide state must not
    make the second subject's mixed_precision an error ("restart your runtime")."""
    losses = {}
    for mixed in ("no", "bf16", "no"):
        params = make_params(tiny_models, tmp_path / mixed, max_steps=2, mixed_precision=mixed)
        result = train(load_diffusion_model(params.base_model), tiny_examples, params,
                       DiskCache(tmp_path / "cache"), dataset_hash="d")
        losses.setdefault(mixed, []).append(result.losses)
    assert all(np.isfinite(losses["bf16"][0]))
    assert losses["no"][0] == losses["no"][1]  # the fp32 run after a bf16 one is really fp32 again


def test_a_run_shorter_than_save_steps_is_accepted_and_saves_at_its_end(tiny_models, tiny_examples, tmp_path):
    params = make_params(tiny_models, tmp_path, max_steps=2, save_steps=10)
    result = train(load_diffusion_model(params.base_model), tiny_examples, params, DiskCache(tmp_path / "cache"),
                   dataset_hash="d")
    assert result.steps == 2
    [checkpoint] = list_checkpoints(run_dir(Path(params.checkpoint_dir) / params.output_name))
    assert checkpoint.name.endswith("0000002")


@pytest.mark.parametrize("shuffle_tags", [False, True])
def test_cached_text_encoders_run_before_the_first_step_and_leave_the_loop(tiny_models, tiny_examples, tmp_path,
                                                                          shuffle_tags):
    """With cached text-encoder outputs every caption (and the dropped one, "") is encoded in set-up, so the
    frozen encoders are off the device for the loop; with shuffle_tags the texts are new each epoch: they stay."""
    params = make_params(tiny_models, tmp_path, base_model=str(tiny_models["tiny-flux"]), max_steps=3,
                         caption_dropout=0.5, shuffle_tags=shuffle_tags)
    components = load_diffusion_model(params.base_model)
    calls, steps_done = [], []
    for encoder in components.text_encoders:
        encoder.register_forward_pre_hook(lambda *_: calls.append(len(steps_done)))
    train(components, tiny_examples, params, DiskCache(tmp_path / "cache"), dataset_hash="d",
          step_callback=lambda step, _: steps_done.append(step))
    assert len(steps_done) == 3 and calls
    distinct = len({ex.text for ex in tiny_examples}) + 1  # and ""
    if shuffle_tags:
        assert max(calls) > 0  # encoded as the loop meets new texts
    else:
        assert calls == [0] * 2 * distinct  # both encoders, each text once, all before step 1
