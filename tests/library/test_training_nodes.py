import pandas as pd
import pytest
from PIL import Image

from lora_pipeline.core.config import ExportParams
from lora_pipeline.core.errors import DataError
from lora_pipeline.core.spec import LoraFile
from lora_pipeline.datasets.image_folder import ImageFolder
from lora_pipeline.diffusion.dataset import build_examples, dataset_hash
from lora_pipeline.pipelines.export.nodes import export_kohya, write_model_card


def _folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64), (len(name), 0, 0) if name == "a.png" else (0, 9, 0)).save(tmp_path / name)
    return ImageFolder(tmp_path, ["a.png", "b.png"])


def test_build_examples_and_order_independent_dataset_hash(tmp_path):
    folder = _folder(tmp_path)
    metadata = pd.DataFrame({"file_name": ["a.png", "b.png"], "text": ["sks, a", "sks, b"], "width": [64, 64],
                             "height": [64, 64]})
    examples = build_examples(folder, metadata)
    assert [e.text for e in examples] == ["sks, a", "sks, b"] and examples[0].sha256 != examples[1].sha256
    assert dataset_hash(examples) == dataset_hash(examples[::-1])
    changed = build_examples(folder, metadata.assign(text=["sks, a", "sks, changed"]))
    assert dataset_hash(changed) != dataset_hash(examples)  # captions are part of the dataset identity


def test_build_examples_errors_name_the_next_step(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(DataError, match="normalization"):
        build_examples(folder, pd.DataFrame(columns=["file_name", "text", "width", "height"]))
    missing = pd.DataFrame({"file_name": ["gone.png"], "text": ["x"], "width": [64], "height": [64]})
    with pytest.raises(DataError, match="gone.png.*Re-run the normalization"):
        build_examples(folder, missing)


def test_export_nodes_write_webui_copy_and_card(trained, tmp_path):
    summary = trained["summary"]
    out = export_kohya(LoraFile(trained["result"].lora_state), summary,
                       ExportParams(precision="fp32", webui_lora_dir=str(tmp_path / "webui")))
    assert (tmp_path / "webui" / "test_lora.safetensors").is_file()
    assert isinstance(out, LoraFile) and out.metadata["ss_network_alpha"] == "8.0"
    assert all(isinstance(value, str) for value in out.metadata.values())  # as the file's header holds it
    card = write_model_card(summary, ExportParams())
    assert "<lora:test_lora:0.8>" in card and "load_lora_weights" in card and "| sks | 8 |" in card
