"""File helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


class NoSpaceError(OSError):
    """The disk filled up while an output was written; the write was rolled back. ``strerror`` is the message
    for the user (what, where, what to do)."""


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


# A full disk in the words of what the writers raise: safetensors' SafetensorError ("I/O error: No space left on
# device (os error 28)") is no OSError, and older safetensors reported a short write as "unexpected pos ...".
_NO_SPACE_TEXT = ("No space left", "os error 28", "Disk quota exceeded", "os error 122", "unexpected pos")


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, Exception) and any(text in str(exc) for text in _NO_SPACE_TEXT)


def _no_space_error(target: Path) -> NoSpaceError:
    return NoSpaceError(errno.ENOSPC, f"no space left on {target.parent} while writing {target.name}; free some "
                                      f"space on that disk (or point the catalog entry at another one) and re-run "
                                      f"(nothing was left half-written)")


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Undo the folders a failed write created (a versioned dataset's version folder), deepest first; a folder
    something else wrote into meanwhile stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _output_mode(path: Path, umask: int) -> None:
    """The mode any new file or folder gets here (0644 / 0755 under umask 022): mkstemp and safetensors'
    ``save_file`` create 0600, which would make an export unreadable to the web UI's or a colleague's account."""
    executable = path.is_dir() or path.stat().st_mode & 0o111
    os.chmod(path, (0o777 if executable else 0o666) & ~umask)


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
    ``os.replace`` is atomic on one filesystem, and the temp file lives in the same folder. A full disk raises
    :class:`NoSpaceError` and leaves neither the temp file nor a folder this call created.
    """
    target = Path(target)
    created = _missing_parents(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        _output_mode(tmp_path, _umask())
        os.replace(tmp_path, target)
    except Exception as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        _remove_if_empty(created)
        if _no_space(exc):
            raise _no_space_error(target) from None
        raise
    except BaseException:  # KeyboardInterrupt: no temp file either
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to ``target``; it replaces ``target`` only if the block succeeds.

    A leftover temp folder from a killed run is cleared first; readers never see a half-written folder under
    the final name (a crash between removing the old folder and the rename leaves no folder, never a partial one).
    What was written gets the umask's mode, as :func:`atomic_path` gives it; a full disk raises
    :class:`NoSpaceError` and leaves neither the temp folder nor a folder this call created.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    created = _missing_parents(target.parent)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        umask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                _output_mode(path, umask)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        if isinstance(exc, Exception) and _no_space(exc):
            raise _no_space_error(target) from None
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
