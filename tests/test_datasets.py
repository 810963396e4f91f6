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
