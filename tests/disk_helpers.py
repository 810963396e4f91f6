"""A real small disk for full-disk tests: a tmpfs mounted for one test (we run as root here; skipped elsewhere)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def mount_small_disk(folder: Path, size: str = "4k") -> Path:
    """A tmpfs of ``size`` at ``folder``: writes beyond it fail with ENOSPC from the kernel, the way a full disk
    fails them (what a monkeypatched OSError cannot show: safetensors' own error type). Skips the test where
    mounting is not allowed (not root, no mount, a container without the capability). Unmount with
    :func:`unmount`."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here: a real full disk (tmpfs) cannot be simulated")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({result.stderr.strip()}): a real full disk "
                    f"cannot be simulated")
    return folder


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)


def everything_under(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
