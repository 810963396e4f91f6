"""The one helper per concern in core: content hashes, seeds, safetensors headers, version folders, run signatures.

The pinned values are names and keys users already have on disk (run folders, cache keys, image store names):
a change to them would orphan checkpoints and caches, so they are fixed here."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_pipeline.core.cache import settings_key
from lora_pipeline.core.checkpoints import run_folder, run_signature
from lora_pipeline.core.files import (
    json_sha256,
    newest_version,
    read_safetensors_header,
    sha256_file,
    sha256_hex,
    versions,
)
from lora_pipeline.core.models import DTYPES
from lora_pipeline.core.spec import LoraSpec
from lora_pipeline.core.trainer import derive_seed
from lora_pipeline.prep.selection import render_key, store_name


def test_sha256_hex_hashes_bytes_text_and_streams_alike(tmp_path):
    whole = sha256_hex(b"abcdef")
    assert whole == "bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721"
    assert sha256_hex("abcdef") == whole == sha256_hex([b"ab", "cd", memoryview(b"ef")])
    assert sha256_hex(iter([b"abc", b"def"]), 12) == whole[:12]
    (tmp_path / "f").write_bytes(b"abcdef")
    assert sha256_file(tmp_path / "f") == whole


def test_json_hash_ignores_key_order_and_keeps_non_ascii_choice():
    assert json_sha256({"a": 1, "b": [2]}) == json_sha256({"b": [2], "a": 1})
    assert json_sha256({"t": "é"}) != json_sha256({"t": "é"}, ensure_ascii=False)
    assert json_sha256({"p": Path("x")}, 16) == json_sha256({"p": "x"}, 16)


def test_names_and_keys_on_disk_stay_what_they_were():
    signature = {"base_model": "x", "dataset": "d", "spec": {"rank": 8}, "seed": 3, "lr": 1e-4, "p": Path("/a")}
    assert run_folder(Path("s"), signature).name == "run-eebea959c55a"
    assert settings_key({"model": "m", "n": 3, "p": Path("q"), "ü": "é"}) == "03eea5e7fc9017db"
    assert store_name(render_key("ab" * 32, (64, 96), (255, 255, 255)), "png") == \
        "9f7b4fdb8531d6893ec3d282cc1b796a.png"


@pytest.mark.parametrize("seed", [0, 1, 42, 123_456])
def test_derive_seed_gives_the_seeds_runs_were_trained_with(seed):
    for part in (0, 7, 999, 5000):
        assert derive_seed(seed, part) == seed * 1_000_003 + part  # noise
        assert derive_seed(seed, part, stream="order") == seed * 1_000_003 + part
        assert derive_seed(seed, part, stream="dropout") == seed * 7_919 + part
        assert derive_seed(seed, part, stream="captions") == seed * 104_729 + part
        assert derive_seed(seed, part, 300) == seed * 1_000_003 + part * 1000 + 300  # (image, timestep)


def test_read_safetensors_header_without_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.ones(1)}, str(path), metadata={"ss_output_name": "x"})
    header = read_safetensors_header(path)
    assert sorted(header.keys) == ["a", "b"] and header.metadata == {"ss_output_name": "x"}
    save_file({"a": torch.ones(1)}, str(path))
    assert read_safetensors_header(path).metadata == {}


def test_versions_are_kedro_version_folders_oldest_first(tmp_path):
    versioned = tmp_path / "aki.safetensors"
    assert versions(versioned) == [] and newest_version(versioned) is None
    for version in ("2026-03-01T00.00.00.000Z", "2026-11-02T10.00.00.000Z", "2026-05-01T00.00.00.000Z"):
        (versioned / version).mkdir(parents=True)
        (versioned / version / "aki.safetensors").write_bytes(b"")
    (versioned / "2026-12-01T00.00.00.000Z").mkdir()  # a version folder a failed save left empty
    assert [p.parent.name for p in versions(versioned)] == [
        "2026-03-01T00.00.00.000Z", "2026-05-01T00.00.00.000Z", "2026-11-02T10.00.00.000Z"]
    assert newest_version(versioned) == versioned / "2026-11-02T10.00.00.000Z" / "aki.safetensors"
    assert newest_version(versioned, "other") is None


def test_run_signature_leaves_out_later_settings_at_their_default():
    spec = LoraSpec(family="sd1", rank=4, alpha=4.0, dropout=0.0, targets={"unet": ["to_q"]})
    old = run_signature("base", "data", spec, {"seed": 1, "clip_skip": 1}, {"clip_skip": 1})
    assert old == {"base_model": "base", "dataset": "data", "spec": spec.model_dump(mode="json"), "seed": 1}
    assert run_signature("base", "data", spec, {"seed": 1, "clip_skip": 2}, {"clip_skip": 1})["clip_skip"] == 2


def test_one_dtype_per_precision_setting():
    assert DTYPES["no"] is DTYPES["fp32"] is torch.float32
    assert (DTYPES["fp16"], DTYPES["bf16"]) == (torch.float16, torch.bfloat16)
