"""What the export writes on disk: file modes under the user's umask, and a real full disk (a tiny tmpfs)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from disk_helpers import everything_under, mount_small_disk, unmount
from kedro.io import DatasetError, Version
from safetensors.torch import save_file

from lora_pipeline.cli.commands import user_error
from lora_pipeline.core.config import ExportParams
from lora_pipeline.core.files import NoSpaceError, atomic_folder, atomic_path
from lora_pipeline.core.spec import LoraFile
from lora_pipeline.datasets import DiffusersLoraDataset, LoraWeightsDataset
from lora_pipeline.datasets.files import DiskFullError
from lora_pipeline.diffusion.lora_files import save_lora_file
from lora_pipeline.pipelines.export.nodes import export_diffusers, export_kohya


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (it is process-wide), and put it back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.fixture
def small_disk(tmp_path):
    folder = mount_small_disk(tmp_path / "small_disk")
    yield folder
    unmount(folder)


# ----------------------------------------------------------------------------- modes

def test_atomic_folder_gives_what_save_file_wrote_the_umask_mode(tmp_path, umask):
    """safetensors' save_file creates 0600 files; a finished folder gets the mode any new file gets here."""
    for mask, file_mode, folder_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        umask(mask)
        target = tmp_path / f"out_{mask:o}"
        with atomic_folder(target) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "more.safetensors"))
        assert mode(target / "weights.safetensors") == file_mode
        assert mode(target / "sub" / "more.safetensors") == file_mode
        assert mode(target / "sub") == folder_mode and mode(target) == folder_mode


def test_diffusers_export_is_readable_like_the_kohya_file_under_umask_022(trained, tmp_path, umask):
    """Issue repro: pytorch_lora_weights.safetensors came out 0600 beside a 0644 kohya file."""
    umask(0o022)
    lora = LoraFile(trained["result"].lora_state)
    kohya = LoraWeightsDataset(str(tmp_path / "t.safetensors"), version=Version(None, None))
    kohya.save(export_kohya(lora, trained["summary"], ExportParams()))
    diffusers = DiffusersLoraDataset(str(tmp_path / "t_diffusers"), version=Version(None, None))
    diffusers.save(export_diffusers(lora, trained["summary"]))
    [weights] = (tmp_path / "t_diffusers").glob("*/t_diffusers/pytorch_lora_weights.safetensors")
    [kohya_file] = (tmp_path / "t.safetensors").glob("*/t.safetensors")
    assert mode(kohya_file) == 0o644
    assert mode(weights) == 0o644 and mode(weights.parent) == 0o755


# ----------------------------------------------------------------------------- a real full disk

def test_a_real_full_disk_under_atomic_path_is_one_error_and_leaves_nothing(small_disk):
    target = small_disk / "hero.safetensors" / "2026-01-01T00.00.00.000Z" / "hero.safetensors"
    with pytest.raises(NoSpaceError) as info:
        save_lora_file(target, {"lora_unet_x.lora_down.weight": torch.zeros(4, 4096)}, {"v": "1"})
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror.startswith(f"no space left on {target.parent} while writing hero.safetensors")
    assert "free some space" in info.value.strerror
    assert everything_under(small_disk) == []  # no temp file, no version folder


def test_a_real_full_disk_under_atomic_folder_is_one_error_and_leaves_nothing(small_disk):
    target = small_disk / "hero_diffusers" / "2026-01-01T00.00.00.000Z" / "hero_diffusers"
    with pytest.raises(NoSpaceError, match=f"no space left on {target.parent} while writing hero_diffusers"):
        with atomic_folder(target) as tmp:
            save_file({"w": torch.zeros(4, 4096)}, str(tmp / "pytorch_lora_weights.safetensors"))
    assert everything_under(small_disk) == []


def test_a_file_that_fits_is_still_written_on_the_small_disk(small_disk):
    """The tmpfs is a disk, not a trap: a small output lands, so the full-disk tests above can fail."""
    target = small_disk / "v" / "small.safetensors"
    with atomic_path(target) as tmp:
        save_file({"w": torch.zeros(4)}, str(tmp))
    assert everything_under(small_disk) == ["v", "v/small.safetensors"]


@pytest.mark.parametrize("dataset", ["kohya", "diffusers"])
def test_a_real_full_disk_during_export_is_one_message_and_no_version_folder(trained, small_disk, dataset):
    """Through Kedro's own save wrapper: a DatasetError passes it unchanged (anything else it wraps, and the
    user gets a traceback), and `kedro run` (lora_pipeline.cli) prints our error as one `Error: ...` line."""
    lora = LoraFile(trained["result"].lora_state)
    if dataset == "kohya":
        target, data = LoraWeightsDataset, export_kohya(lora, trained["summary"], ExportParams())
    else:
        target, data = DiffusersLoraDataset, export_diffusers(lora, trained["summary"])
    name = {"kohya": "t.safetensors", "diffusers": "t_diffusers"}[dataset]
    with pytest.raises(DatasetError) as info:
        target(str(small_disk / name), version=Version(None, None)).save(data)
    error = info.value
    assert isinstance(error, DiskFullError) and user_error(error) is error
    assert error.message.startswith(f"no space left on {small_disk / name}/")  # where: the version folder
    assert f"while writing {name}; free some space" in error.message  # what, and what to do
    assert "\n" not in error.message and "Failed while saving" not in error.message
    assert everything_under(small_disk) == []
