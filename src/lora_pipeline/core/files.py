"""File helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only be read by setting it, which would briefly change
    # the mode of files other threads (the image writers) create at that moment.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _no_space(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``target``; rename it over ``target`` only if the block succeeds.

    Readers never see a half-written file under the final name, even after kill -9:
    ``os.replace`` is atomic on one filesystem, and the temp file lives in the same folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
        except OSError as exc:
            if _no_space(exc):
                raise OSError(exc.errno, f"no space left on {target.parent} while writing {target.name}; free some "
                                         f"space and re-run (nothing was left half-written)") from None
            raise
        except RuntimeError as exc:  # safetensors reports a short write as "unexpected pos ..."
            if "unexpected pos" in str(exc) or "No space" in str(exc):
                raise OSError(28, f"no space left on {target.parent} while writing {target.name}; free some space "
                                  f"and re-run (nothing was left half-written)") from None
            raise
        # mkstemp creates 0600; a finished output gets the mode any new file gets here (0644 under umask 022)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to ``target``; it replaces ``target`` only if the block succeeds.

    A leftover temp folder from a killed run is cleared first; readers never see a half-written folder under
    the final name (a crash between removing the old folder and the rename leaves no folder, never a partial one).
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
