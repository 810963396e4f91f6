"""The WD14 tagger backend, offline: a tiny ONNX model with the SmilingWolf taggers' interface (NHWC, BGR,
0-255, 448 px square in; one sigmoid score per selected_tags.csv row out) is built here."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import CaptioningParams
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.datasets.image_folder import ImageFolderDataset
from lora_pipeline.pipelines.captioning import nodes
from lora_pipeline.prep.wd14 import WD14Tagger, format_tag, to_model_input

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# name, category, weights on the (B, G, R) channel means, bias: the logit of each tag
TAGS = [("general", 9, (0, 0, 0), 5.0), ("red_hair", 0, (0, 0, 10), -5.0), ("blue_sky", 0, (10, 0, 0), -5.0),
        ("smile_(happy)", 0, (0, 0, 0), 3.0), ("hatsune_miku", 4, (0, 0, 10), -7.5), ("^_^", 0, (0, 0, 0), 2.0),
        ("simple_background", 0, (0, 0, 0), 4.0), ("rare_tag", 0, (0, 0, 0), -3.0)]


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("wd-tagger")
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T  # (3, tags)
    bias = np.array([t[3] for t in TAGS], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["mean", "inv255"], ["unit"]),
         helper.make_node("MatMul", ["unit", "weights"], ["logits0"]),
         helper.make_node("Add", ["logits0", "bias"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", 448, 448, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
         numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    rows = [{"tag_id": i, "name": n, "category": c, "count": 100} for i, (n, c, _, _) in enumerate(TAGS)]
    pd.DataFrame(rows).to_csv(folder / "selected_tags.csv", index=False)
    return folder


def _solid(color, size=(300, 300)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_tags_follow_thresholds_categories_and_formatting(tagger_dir):
    tagger = WD14Tagger(str(tagger_dir), exclude_tags=["simple_background"])
    red, blue = tagger.caption([_solid((255, 0, 0)), _solid((0, 0, 255))])
    # characters first, then general tags by score; no rating tag; escaped parentheses; spaces; ^_^ kept
    assert red == r"hatsune miku, red hair, smile \(happy\), ^_^"
    assert blue == r"blue sky, smile \(happy\), ^_^"  # BGR order: blue lights the B weight, not the R one
    strict = WD14Tagger(str(tagger_dir), general_threshold=0.9, character_threshold=0.95)
    assert strict.caption([_solid((255, 0, 0))]) == ["red hair, simple background, smile \\(happy\\)"]


def test_input_is_a_white_padded_448_square_in_bgr():
    wide = _solid((255, 0, 0), (200, 100))
    array = to_model_input(wide, 448)
    assert array.shape == (448, 448, 3) and array.dtype == np.float32
    assert tuple(array[224, 224]) == (0.0, 0.0, 255.0)  # red in BGR, 0-255
    assert tuple(array[5, 224]) == (255.0, 255.0, 255.0)  # the padding is white
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert tuple(to_model_input(transparent, 448)[200, 200]) == (255.0, 255.0, 255.0)


def test_format_tag():
    assert format_tag("long_hair") == "long hair" and format_tag("^_^") == "^_^"
    assert format_tag("nakiri_ayame_(hololive)") == r"nakiri ayame \(hololive\)"
    assert format_tag("a_(b)", escape_parentheses=False, underscores_to_spaces=False) == "a_(b)"


def test_captioning_node_tags_new_images_once_and_keeps_the_trigger_first(tagger_dir, tmp_path, monkeypatch):
    raw = tmp_path / "images"
    raw.mkdir()
    _solid((255, 0, 0)).save(raw / "red.png")
    _solid((0, 0, 255)).save(raw / "blue.png")
    (raw / "blue.txt").write_text("human caption", encoding="utf-8")  # a sidecar is never overwritten
    folder = ImageFolderDataset(str(raw)).load()
    params = CaptioningParams(backend="wd14", model=str(tagger_dir), trigger="sks", wd14={"exclude_tags": ["^_^"]})
    cache = DiskCache(tmp_path / "cache")
    manifest = nodes.scan_images(folder, cache, params)
    captions, _ = nodes.caption_images(manifest, pd.DataFrame(columns=["file_name", "text"]), cache, folder, params)
    text = dict(zip(captions.file_name, captions.text))
    assert text["red.png"] == r"sks, hatsune miku, red hair, simple background, smile \(happy\)"
    assert text["blue.png"] == "sks, human caption"
    calls = []
    monkeypatch.setattr(WD14Tagger, "caption", lambda self, images: calls.append(len(images)) or [])
    again, _ = nodes.caption_images(manifest, pd.DataFrame(columns=["file_name", "text"]), cache, folder, params)
    assert calls == [] and again.text.tolist() == captions.text.tolist()  # cached by image hash


def test_a_folder_without_the_tag_list_says_what_it_needs(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(Exception, match="selected_tags.csv"):
        WD14Tagger(str(tmp_path))


def test_hub_ids_need_allow_download():
    with pytest.raises(Exception, match="allow_download"):
        WD14Tagger("SmilingWolf/wd-vit-tagger-v3")


def test_missing_onnxruntime_names_the_extra(monkeypatch, tagger_dir):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"lora_pipeline\[tagger\]"):
        WD14Tagger(str(tagger_dir))
