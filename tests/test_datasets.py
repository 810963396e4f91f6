import os

import pytest
from PIL import Image

from lora_pipeline.core.files import atomic_path
from lora_pipeline.datasets import ImageFolderDataset, ReviewedCaptionsDataset


def test_reviewed_captions_missing_file_is_empty(tmp_path):
    table = ReviewedCaptionsDataset(str(tmp_path / "reviewed.csv")).load()
    assert table.empty and list(table.columns) == ["file_name", "text"]


def test_reviewed_captions_reports_the_bad_line(tmp_path):
    path = tmp_path / "reviewed.csv"
    path.write_text('file_name,text\na.png,"sks, ok"\nb.png,sks, unquoted comma\n', encoding="utf-8")
    # Kedro wraps load errors in DatasetError; the message is ours.
    with pytest.raises(Exception, match=r"reviewed.csv, line 3: expected 2 columns"):
        ReviewedCaptionsDataset(str(path)).load()
    path.write_text("name,caption\n", encoding="utf-8")
    with pytest.raises(Exception, match="line 1: the header must be 'file_name,text'"):
        ReviewedCaptionsDataset(str(path)).load()


def test_reviewed_captions_are_never_written(tmp_path):
    path = tmp_path / "reviewed.csv"
    path.write_text('file_name,text\na.png,"sks, mine"\n', encoding="utf-8")
    dataset = ReviewedCaptionsDataset(str(path))
    with pytest.raises(Exception, match="edited by people only"):
        dataset.save(dataset.load())
    assert dataset.load().text.tolist() == ["sks, mine"]


def test_image_folder_save_writes_lazily_and_removes_stale_images(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "stale.png")
    (out / "metadata.csv").write_text("file_name,text\n")
    calls = []

    def render():
        calls.append(1)
        return Image.new("RGB", (8, 6), (1, 2, 3))

    ImageFolderDataset(str(out)).save({"a.png": render, "sub/b.png": Image.new("RGB", (2, 2))})
    assert calls == [1]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".manifest.json", "a.png", "metadata.csv", "sub/b.png"]
    assert not [p for p in out.rglob("*.tmp")]


def test_image_folder_refuses_paths_outside_the_folder(tmp_path):
    with pytest.raises(Exception, match="outside"):
        ImageFolderDataset(str(tmp_path / "out")).save({"../evil.png": Image.new("RGB", (2, 2))})


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_image_folder_skips_unchanged_keyed_renders(tmp_path):
    calls = []

    class Render:
        def __init__(self, key):
            self.cache_key = key

        def __call__(self):
            calls.append(self.cache_key)
            return Image.new("RGB", (4, 4))

    dataset = ImageFolderDataset(str(tmp_path / "out"))
    dataset.save({"a.png": Render("k1"), "b.png": Render("k2")})
    dataset.save({"a.png": Render("k1"), "b.png": Render("k2-changed"), "c.png": Render("k3")})
    assert calls == ["k1", "k2", "k2-changed", "k3"]
    (tmp_path / "out" / "a.png").unlink()
    dataset.save({"a.png": Render("k1")})
    assert calls[-1] == "k1" and not (tmp_path / "out" / "b.png").exists()


# ----------------------------------------------------------------------------- typed edges between stages

def _spec(family="sd1"):
    from lora_pipeline.core.spec import LoraSpec

    return LoraSpec(family=family, rank=4, alpha=8, targets={"model" if family == "causal_lm" else "unet": ["q"]})


SHARED = dict(base_model="b", output_name="o", steps=3, epochs=1.0, seed=0, learning_rate=1e-4, dataset_hash="d",
              started_at="t0", finished_at="t1")


def test_lora_weights_travel_as_a_lora_file(tmp_path):
    import torch
    from kedro.io import Version

    from lora_pipeline.core.spec import LoraFile
    from lora_pipeline.datasets import LoraWeightsDataset

    dataset = LoraWeightsDataset(str(tmp_path / "x.safetensors"), version=Version(None, None), log_to_mlflow=True)
    dataset.save(LoraFile({"a.lora_down.weight": torch.ones(2, 3)}, {"ss_network_dim": "2"}))
    # the dataset only marks the file for the run's record; the tracking hook logs it (no MLflow in datasets)
    assert dataset.tracked.artifact_path == "lora" and dataset.tracked.path.is_file()
    loaded = dataset.load()
    assert isinstance(loaded, LoraFile) and loaded.metadata == {"ss_network_dim": "2"}
    assert torch.equal(loaded.state["a.lora_down.weight"], torch.ones(2, 3))
    with pytest.raises(Exception):  # frozen: a stage cannot change what another one reads
        loaded.state = {}


def test_dataset_info_is_typed_in_memory_readable_on_disk_and_pickles(tmp_path):
    import json
    import pickle

    from lora_pipeline.core.spec import DatasetInfo, FolderInfo
    from lora_pipeline.datasets import ModelJSONDataset

    info = DatasetInfo(trigger="sks", keep_tokens=1, resolution=[512, 512], num_images=2, buckets={"512x512": 2},
                       tag_frequency={"sks": 2}, folders=[FolderInfo(folder="10_aki", role="instance", repeats=10)])
    dataset = ModelJSONDataset(str(tmp_path / "dataset_info.json"), model="lora_pipeline.core.spec.DatasetInfo")
    dataset.save(info)
    text = (tmp_path / "dataset_info.json").read_text()
    assert text.startswith("{\n  ") and json.loads(text)["folders"][0]["repeats"] == 10  # indented JSON
    assert dataset.load() == info
    assert pickle.loads(pickle.dumps(dataset)).load() == info  # ParallelRunner pickles datasets and data
    assert pickle.loads(pickle.dumps(info)) == info
    (tmp_path / "dataset_info.json").write_text('{"trigger": 3}')
    with pytest.raises(Exception, match="dataset_info.json is not a valid DatasetInfo"):
        dataset.load()


def test_training_summaries_are_split_by_track_and_old_files_still_load(tmp_path):
    import json

    from kedro.io import Version

    from lora_pipeline.core.spec import ImageTrainingSummary, LLMTrainingSummary
    from lora_pipeline.datasets import TrainingSummaryDataset

    image = ImageTrainingSummary(spec=_spec(), num_images=5, trigger="sks", **SHARED)
    llm = LLMTrainingSummary(spec=_spec("causal_lm"), train_samples=9, eval_losses=[1.0], **SHARED)
    assert "num_images" not in LLMTrainingSummary.model_fields and "train_samples" not in image.model_fields
    for summary in (image, llm):
        dataset = TrainingSummaryDataset(str(tmp_path / f"{summary.family}.json"), version=Version(None, None))
        dataset.save(summary)
        assert dataset.load() == summary and type(dataset.load()) is type(summary)
    # a file of the single summary class (both tracks' fields, the other track's at their defaults)
    old_llm = {**llm.to_json(), "num_images": 0, "resolution": None, "trigger": "", "tag_frequency": {},
               "folders": [], "unet_layout": {}, "clip_skip": 1, "optimizer": "adamw"}
    old_image = {**image.to_json(), "train_samples": 0, "eval_losses": [], "init_from": None,
                 "truncated_samples": 0, "tokens_per_second": 0.0}
    for name, data, expected in (("old_llm", old_llm, llm), ("old_image", old_image, image)):
        (tmp_path / f"{name}.json").mkdir()
        version = tmp_path / f"{name}.json" / "2026-01-01T00.00.00.000Z"
        version.mkdir()
        (version / f"{name}.json").write_text(json.dumps(data))
        loaded = TrainingSummaryDataset(str(tmp_path / f"{name}.json"), version=Version(None, None)).load()
        assert loaded == expected and type(loaded) is type(expected)
    with pytest.raises(Exception):  # an unknown key is still an error (extra="forbid")
        ImageTrainingSummary.model_validate({**image.to_json(), "lora_rnak": 4})


def test_a_checkpoint_dataset_writes_a_state_dict_atomically(tmp_path):
    import torch
    from safetensors.torch import load_file

    from lora_pipeline.datasets import CheckpointDataset

    shared = torch.arange(4.0)
    dataset = CheckpointDataset(str(tmp_path / "merged.safetensors"))
    dataset.save({"a": shared, "b": shared})  # tied weights: written as two tensors
    assert dataset.load() == tmp_path / "merged.safetensors"
    assert torch.equal(load_file(str(dataset.load()))["b"], shared)
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no temp file left
