import pandas as pd
import pytest
from PIL import Image

from lora_pipeline.core.cache import DiskCache
from lora_pipeline.core.config import CaptioningParams
from lora_pipeline.core.errors import ModelNotFoundError
from lora_pipeline.datasets.image_folder import ImageFolderDataset
from lora_pipeline.pipelines.captioning import nodes

NO_REVIEW = pd.DataFrame(columns=["file_name", "text"])


class SpyCaptioner:
    """Stands in for BLIP/CLIP so a test can see exactly which images reached the captioner."""

    name = "spy"

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def caption(self, images):
        self.seen.extend(image.size for image in images)
        return [f"auto {image.size[0]}x{image.size[1]}" for image in images]


@pytest.fixture
def spy(monkeypatch):
    captioner = SpyCaptioner()
    monkeypatch.setattr(nodes, "load_captioner", lambda params: captioner)
    return captioner


def _params(model, **overrides):
    return CaptioningParams(**{"backend": "blip", "model": str(model), "trigger": "sks", **overrides})


def _run(folder, cache_dir, params, reviewed=NO_REVIEW):
    raw = ImageFolderDataset(str(folder)).load()
    manifest = nodes.scan_images(raw)
    return nodes.caption_images(manifest, reviewed, DiskCache(cache_dir), raw, params)


def test_scan_images_hashes_and_reads_sidecars(demo_images):
    manifest = nodes.scan_images(ImageFolderDataset(str(demo_images)).load())
    row = manifest.set_index("file_name").loc["red_circle_0.jpg"]
    assert row.has_sidecar and row.sidecar == "circle, red background, simple background"
    assert not manifest.set_index("file_name").loc["red_circle_1.png"].has_sidecar
    copy = manifest.set_index("file_name").loc["red_circle_0_copy.jpg"]
    assert copy.sha256 == row.sha256  # same bytes, same hash
    assert manifest.sha256.nunique() < len(manifest) and row.sha256 != manifest.set_index("file_name").loc[
        "red_circle_1.png"].sha256  # other bytes, another hash


def test_precedence_reviewed_then_sidecar_then_auto(demo_images, tmp_path, tiny_models, spy):
    reviewed = pd.DataFrame({"file_name": ["red_circle_0.jpg"], "text": ["Hand Written, kept verbatim"]})
    table, metrics = _run(demo_images, tmp_path / "cache", _params(tiny_models["tiny-blip"]), reviewed)
    by_name = table.set_index("file_name")
    assert by_name.loc["red_circle_0.jpg"].text == "Hand Written, kept verbatim"
    assert by_name.loc["red_circle_0.jpg"].source == "reviewed"
    assert by_name.loc["red_square_0.png"].text == "sks, square, red background, simple background"
    assert by_name.loc["red_square_0.png"].source == "sidecar" and by_name.loc["red_square_0.png"].reviewed
    assert by_name.loc["red_circle_1.png"].source == "auto" and not by_name.loc["red_circle_1.png"].reviewed
    assert by_name.loc["red_circle_1.png"].text.startswith("sks, auto ")
    assert by_name.loc["corrupt.jpg"].source == "none"
    auto = (table.source == "auto").sum()
    assert len(spy.seen) == auto == metrics["auto_new"]["value"]
    assert metrics["unreadable"]["value"] == 1


def test_only_new_or_changed_images_reach_the_captioner(demo_images, tmp_path, tiny_models, spy):
    params = _params(tiny_models["tiny-blip"])
    first, _ = _run(demo_images, tmp_path / "cache", params)
    first_count = len(spy.seen)
    assert first_count > 0
    spy.seen.clear()
    _, metrics = _run(demo_images, tmp_path / "cache", params)
    assert spy.seen == [] and metrics["auto_new"]["value"] == 0

    Image.new("RGB", (640, 512), (1, 2, 3)).save(demo_images / "new_a.png")
    Image.new("RGB", (512, 704), (4, 5, 6)).save(demo_images / "new_b.png")
    Image.new("RGB", (600, 600), (7, 8, 9)).save(demo_images / "red_circle_1.png")  # changed content
    table, metrics = _run(demo_images, tmp_path / "cache", params)
    assert sorted(spy.seen) == sorted([(640, 512), (512, 704), (600, 600)])
    assert metrics["auto_new"]["value"] == 3
    assert metrics["auto_cached"]["value"] == (first.source == "auto").sum() - 1


def test_changed_captioner_settings_recaption_everything(demo_images, tmp_path, tiny_models, spy):
    _run(demo_images, tmp_path / "cache", _params(tiny_models["tiny-blip"]))
    first = len(spy.seen)
    spy.seen.clear()
    _run(demo_images, tmp_path / "cache", _params(tiny_models["tiny-blip"], max_new_tokens=7))
    assert len(spy.seen) == first


def test_sidecar_backend_never_loads_a_model(demo_images, tmp_path, monkeypatch):
    monkeypatch.setattr(nodes, "load_captioner", lambda p: pytest.fail("no model for backend: sidecar"))
    table, _ = _run(demo_images, tmp_path / "cache", CaptioningParams(backend="sidecar", trigger="sks"))
    assert set(table.source) == {"sidecar", "none"}


def test_missing_model_stops_before_any_captioning(demo_images, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no/such/model"):  # the real loader, not the spy
        _run(demo_images, tmp_path / "cache", _params("./no/such/model"))


def test_captions_to_metadata_has_imagefolder_columns():
    captions = pd.DataFrame({"file_name": ["a.png"], "sha256": ["x"], "text": ["t"], "source": ["auto"],
                             "reviewed": [False], "auto_caption": ["t"]})
    assert nodes.captions_to_metadata(captions).to_dict("records") == [{"file_name": "a.png", "text": "t"}]


def test_caption_extension_reads_kohya_caption_files(tmp_path):
    from PIL import Image

    from lora_pipeline.datasets.image_folder import ImageFolderDataset

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("aki, red jacket\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("not this one\n", encoding="utf-8")
    raw = ImageFolderDataset(str(tmp_path)).load()
    caption = CaptioningParams(backend="sidecar", caption_extension=".caption")
    assert nodes.scan_images(raw, None, caption).sidecar[0] == \
        "aki, red jacket"
    assert nodes.scan_images(raw).sidecar[0] == "not this one"  # .txt by default
