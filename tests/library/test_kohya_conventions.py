"""kohya's conventions: N_concept folders, regularization images, clip_skip, flip_aug, non-square buckets,
epoch saving and the optimizers kohya users pick."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from train_helpers import make_params

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import NormalizationParams, TrainingParams
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import sha256_file
from lora_pipeline.core.trainer import make_optimizer
from lora_pipeline.datasets.image_folder import ImageFolder, ImageFolderDataset
from lora_pipeline.diffusion.dataset import build_examples
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.training import Example, bucket_batches, encode_latents, train
from lora_pipeline.pipelines.normalization import nodes
from lora_pipeline.prep.concepts import Concept, concept_of, epoch_items
from lora_pipeline.prep.images import make_buckets


def _image(path: Path, seed: int, size=(80, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_concept_folders_are_read_as_kohya_reads_them():
    assert concept_of("10_aki/a.png") == Concept("10_aki", 10, "aki")
    assert concept_of("3_sks  woman/x/b.png") == Concept("3_sks  woman", 3, "sks woman")
    assert concept_of("a.png") == Concept("", 1, "")
    assert concept_of("portraits/a.png") == Concept("portraits", 1, "")
    assert concept_of("2_cats/a.png", kohya_folders=False) == Concept("2_cats", 1, "")  # the opt-out


def test_epoch_items_repeat_instances_and_fill_as_many_places_with_class_images():
    # two instance images x 3 repeats = 6 places; 4 class images are cycled to 6, in a fixed order
    assert epoch_items([(0, 3), (1, 3)], [(5, 1), (6, 1), (7, 1), (8, 1)]) == [0, 0, 0, 1, 1, 1, 5, 6, 7, 8, 5, 6]
    # more class images than places: cut, as kohya does
    assert epoch_items([(0, 1)], [(5, 2), (6, 1)]) == [0, 5]
    assert epoch_items([(0, 2)], []) == [0, 0]


def _examples(tmp_path: Path) -> list[Example]:
    examples = []
    for index, (repeats, is_reg) in enumerate([(4, False), (4, False), (1, True), (1, True), (1, True)]):
        path = tmp_path / f"{index}.png"
        _image(path, index, (64, 64))
        examples.append(Example(path, "aki" if not is_reg else "woman", 64, 64, sha256_file(path),
                                repeats=repeats, is_reg=is_reg))
    return examples


def test_bucket_batches_mix_class_images_and_flip_reproducibly(tmp_path):
    examples = _examples(tmp_path)
    batches = bucket_batches(examples, 2, repeats=1, seed=0, epoch=0)
    items = [i for batch in batches for i in batch]
    assert sorted(i for i in items if i < 2) == [0] * 4 + [1] * 4
    assert len([i for i in items if examples[i].is_reg]) == 8  # as many class-image places as instance places
    flipped = bucket_batches(examples, 2, repeats=1, seed=0, epoch=0, flip=True)
    assert flipped == bucket_batches(examples, 2, repeats=1, seed=0, epoch=0, flip=True)
    flat = [i for batch in flipped for i in batch]
    assert len(flat) == 16 and any(i >= len(examples) for i in flat) and any(i < len(examples) for i in flat)
    assert sorted(i % len(examples) for i in flat) == sorted(items)  # same places, some mirrored


def _kohya_raw(tmp_path: Path) -> tuple[ImageFolder, ImageFolder]:
    train_dir, reg_dir = tmp_path / "train", tmp_path / "reg"
    _image(train_dir / "10_aki" / "a.png", 1)
    (train_dir / "10_aki" / "a.txt").write_text("aki, red hair", encoding="utf-8")
    _image(train_dir / "3_sks woman" / "b.png", 2)
    _image(train_dir / "c.png", 3)
    _image(reg_dir / "1_woman" / "r1.png", 4)
    _image(reg_dir / "1_woman" / "r2.png", 5)
    (reg_dir / "1_woman" / "r2.txt").write_text("a woman, outdoors", encoding="utf-8")
    _image(reg_dir / "1_woman" / "dup.png", 1)  # the same bytes as an instance image
    return (ImageFolderDataset(str(train_dir)).load(), ImageFolderDataset(str(reg_dir), required=False).load())


def _captions(checks: pd.DataFrame) -> pd.DataFrame:
    instance = checks[checks.role == "instance"]
    texts = {"10_aki/a.png": "aki, red hair", "3_sks woman/b.png": "sks, smiling", "c.png": "sks, blue sky"}
    return pd.DataFrame({"file_name": instance.file_name, "sha256": instance.sha256,
                         "text": [texts[n] for n in instance.file_name]})


PARAMS = NormalizationParams(min_size=32, resolution=64, bucket_step=32, bucket_min=64, bucket_max=128,
                             prompt={"trigger": "sks"})


def test_normalization_reads_folders_repeats_class_tokens_and_reg_images(tmp_path):
    raw, reg = _kohya_raw(tmp_path)
    checks = nodes.inspect_images(raw, PARAMS, None, reg)
    by_name = checks.set_index(["role", "file_name"])
    assert by_name.loc[("instance", "10_aki/a.png"), "repeats"] == 10
    assert by_name.loc[("instance", "3_sks woman/b.png"), "class_tokens"] == "sks woman"
    assert by_name.loc[("reg", "1_woman/dup.png"), "reason_code"] == "duplicate"  # every rejection says why
    assert by_name.loc[("reg", "1_woman/r1.png"), "output_name"] == "reg/1_woman/r1.png"
    metadata, _, report, info, metrics = nodes.build_training_metadata(checks, _captions(checks), PARAMS)
    text = dict(zip(metadata.file_name, metadata.text))
    assert text["10_aki/a.png"] == "aki, red hair"  # the folder's class token is the trigger
    assert text["3_sks woman/b.png"] == "sks woman, sks, smiling"
    assert text["c.png"] == "sks, blue sky"  # outside kohya folders: the subject's trigger
    assert text["reg/1_woman/r1.png"] == "woman"  # no caption file: the class token
    assert text["reg/1_woman/r2.png"] == "a woman, outdoors"  # its caption file
    roles = dict(zip(metadata.file_name, zip(metadata.repeats, metadata.is_reg)))
    assert roles["10_aki/a.png"] == (10, 0) and roles["reg/1_woman/r1.png"] == (1, 1)
    folders = {(f.role, f.folder): f.model_dump() for f in info.folders}
    assert folders[("instance", "10_aki")] == {"folder": "10_aki", "role": "instance", "repeats": 10,
                                               "class_tokens": "aki", "kept": 1, "rejected": 0}
    assert folders[("reg", "1_woman")]["kept"] == 2 and folders[("reg", "1_woman")]["rejected"] == 1
    assert info.num_images == 3 and info.num_reg_images == 2
    assert set(report.columns) >= {"role", "folder", "repeats", "class_tokens"}
    renders = nodes.render_images(raw, report, PARAMS, reg)
    assert renders["reg/1_woman/r1.png"]().size == (64, 64)
    # the training set built from it
    out = tmp_path / "dataset"
    ImageFolderDataset(str(out)).save(renders)
    examples = build_examples(out, metadata)
    assert sum(ex.repeats for ex in examples if not ex.is_reg) == 14 and sum(ex.is_reg for ex in examples) == 2


def test_kohya_folders_false_reads_names_literally(tmp_path):
    raw, _ = _kohya_raw(tmp_path)
    checks = nodes.inspect_images(raw, PARAMS.model_copy(update={"kohya_folders": False}), None)
    assert set(checks.repeats) == {1} and set(checks.class_tokens) == {""}


def test_a_missing_reg_folder_is_no_class_images(tmp_path):
    assert ImageFolderDataset(str(tmp_path / "nothing"), required=False).load().names == []


def test_non_square_resolution_gives_kohya_buckets():
    p = NormalizationParams(resolution="768,512", bucket_min=256, bucket_max=1024)
    assert p.size == (768, 512)
    buckets = make_buckets(p.size, 256, 1024, 64)
    assert (768, 512) in buckets and (512, 768) in buckets and max(w * h for w, h in buckets) <= 768 * 512
    assert NormalizationParams(resolution=[512, 512]).resolution == 512
    with pytest.raises(ValueError, match="W,H"):
        NormalizationParams(resolution="768,abc")


def test_clip_skip_2_conditions_on_the_penultimate_layer_like_diffusers(tiny_models):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    with torch.no_grad():
        ours = components.family.encode_prompt(components.text_encoders, components.tokenizers, ["sks, red circle"], torch.device("cpu"), 2)
        ids = components.tokenizer(["sks, red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = components.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = components.text_encoder.final_layer_norm(states[-2])  # kohya's and WebUI's definition of clip skip 2
        last = components.family.encode_prompt(components.text_encoders, components.tokenizers, ["sks, red circle"], torch.device("cpu"))
        kwargs = components.family.prompt_kwargs(components.pipeline(), "sks, red circle", "ugly", 2)
    torch.testing.assert_close(ours.hidden, expected)
    assert not torch.allclose(ours.hidden, last.hidden)
    torch.testing.assert_close(kwargs["prompt_embeds"], expected)
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds"}


def test_clip_skip_is_refused_for_sdxl(tiny_models):
    from lora_pipeline.diffusion.families import SDXL

    with pytest.raises(ConfigError, match="SDXL"):
        SDXL.check_clip_skip(2)


def test_flip_aug_caches_the_mirrored_latent_too(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    examples = _examples(tmp_path)[:1]
    cache = DiskCache(tmp_path / "cache")
    keys, encoded = encode_latents(components, examples, cache, torch.device("cpu"), flip=True)
    assert encoded == 2
    plain, mirrored = (cache.get_tensors(keys[examples[0].sha256 + suffix])["mean"] for suffix in ("", ":flip"))
    assert not torch.allclose(plain, mirrored)
    with torch.no_grad():  # the mirrored entry is the VAE's latent of the mirrored image
        image = torch.from_numpy(np.asarray(Image.open(examples[0].path), dtype=np.float32).copy())
        pixels = (image.permute(2, 0, 1).flip(-1) / 127.5 - 1).unsqueeze(0)
        torch.testing.assert_close(components.vae.encode(pixels).latent_dist.mean[0], mirrored, atol=1e-5, rtol=1e-4)


def test_training_with_reg_images_flip_and_epoch_saving(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    examples = _examples(tmp_path)
    params = make_params(tiny_models, tmp_path, batch_size=4, max_steps=None, epochs=2, repeats=1,
                         prior_loss_weight=0.5, flip_aug=True, save_every_n_epochs=1, clip_skip=2)
    result = train(components, examples, params, DiskCache(tmp_path / "cache"), dataset_hash="k")
    assert result.steps == 8  # (8 instance places + 8 class-image places) / 4 per step, 2 epochs
    assert result.latents_encoded == 10  # 5 images, each plain and mirrored
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints" / "test_lora").glob("run-*/checkpoint-*"))
    assert checkpoints == ["checkpoint-0000004", "checkpoint-0000008"]  # the end of epoch 1, then the end


@pytest.mark.parametrize("name, expected", [("prodigy", "Prodigy"), ("lion", "Lion"), ("adafactor", "Adafactor"),
                                            ("adamw", "AdamW")])
def test_each_optimizer_comes_from_its_package_and_trains(name, expected):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8))
    target = torch.randn(8, 8)
    lr = 1.0 if name == "prodigy" else 1e-2
    optimizer = make_optimizer(name, [{"params": [weight], "lr": lr}], {"weight_decay": 0.0})
    assert type(optimizer).__name__ == expected
    first = None
    for _ in range(30):
        loss = ((weight - target) ** 2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ((weight - target) ** 2).mean().item() < first


def test_a_missing_optimizer_package_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'lora_pipeline\[optimizers\]'"):
        make_optimizer("prodigy", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}])
    with pytest.raises(ConfigError, match="optimizer_args"):
        make_optimizer("lion", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], {"bogus": 1})


def test_training_params_accept_the_kohya_knobs():
    p = TrainingParams(base_model="x", optimizer="lion", lr_scheduler="cosine_with_restarts",
                       lr_scheduler_num_cycles=3, clip_skip=2, prior_loss_weight=0.5)
    assert p.lr_scheduler_num_cycles == 3
    with pytest.raises(ValueError):
        TrainingParams(base_model="x", clip_skip=3)


def test_prior_loss_weight_scales_the_class_images_loss(tiny_models, tmp_path):
    components = load_diffusion_model(str(tiny_models["tiny-sd"]))
    examples = [ex if ex.is_reg else Example(ex.path, ex.text, ex.width, ex.height, ex.sha256)
                for ex in _examples(tmp_path)]  # 2 instance images (1 repeat) and 3 class images
    params = make_params(tiny_models, tmp_path, batch_size=1, max_steps=None, epochs=1, prior_loss_weight=0.0)
    losses = train(components, examples, params, DiskCache(tmp_path / "cache"), dataset_hash="w").losses
    assert len(losses) == 4 and sorted(loss == 0.0 for loss in losses) == [False, False, True, True]
