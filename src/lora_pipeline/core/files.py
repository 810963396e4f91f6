"""File helpers shared by every stage: atomic writes, content hashes, safetensors headers and Kedro version
folders (read as plain folders: nothing here imports Kedro)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

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


Chunk = bytes | bytearray | memoryview | str


def sha256_hex(data: Chunk | Iterable[Chunk], length: int = 64) -> str:
    """The one content hash: hex sha256 of ``data``, cut to its first ``length`` characters.

    ``data`` is bytes (or any buffer, such as a numpy view of a tensor), a str (UTF-8; undecodable file-name bytes
    kept as ``surrogateescape`` writes them), or an iterable of those, hashed as their concatenation without
    holding it in memory. ``length`` is each caller's to keep, as it is part of names and keys already on disk:
    run folders 12, settings keys and project ids 16, module fingerprints 24, image store names 32."""
    digest = hashlib.sha256()
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview, str)) else data:
        digest.update(chunk.encode("utf-8", "surrogateescape") if isinstance(chunk, str) else chunk)
    return digest.hexdigest()[:length]


def canonical_json(value: Any, ensure_ascii: bool = True) -> str:
    """``value`` as JSON with sorted keys (anything JSON lacks, such as paths, as its ``str``): equal values
    give equal text, whatever order their dicts were built in."""
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=ensure_ascii)


def json_sha256(value: Any, length: int = 64, ensure_ascii: bool = True) -> str:
    """:func:`sha256_hex` of :func:`canonical_json` of ``value``: the hash of settings, signatures and records."""
    return sha256_hex(canonical_json(value, ensure_ascii), length)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large files stay out of memory."""
    with open(path, "rb") as handle:
        return sha256_hex(iter(lambda: handle.read(_CHUNK), b""))


class SafetensorsHeader(NamedTuple):
    keys: list[str]  # the tensor names
    metadata: dict[str, str]  # the ``__metadata__`` strings (empty when the file has none)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """A ``.safetensors`` file's tensor names and metadata, without loading a tensor. An unreadable file raises
    safetensors' ``SafetensorError``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return SafetensorsHeader(list(handle.keys()), dict(handle.metadata() or {}))


def versions(versioned: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Every saved version of a Kedro versioned dataset, oldest first: ``<versioned>/<version>/<name>`` where it
    exists, ``name`` defaulting to the last part of ``versioned`` (Kedro's layout). Kedro's version ids are UTC
    timestamps (``2026-03-01T00.00.00.000Z``), so their names sort in time order."""
    versioned = Path(versioned).expanduser()
    name = name or versioned.name
    if not versioned.is_dir():
        return []
    return sorted((folder / name for folder in versioned.iterdir() if (folder / name).exists()),
                  key=lambda path: path.parent.name)


def newest_version(versioned: str | os.PathLike, name: str | None = None) -> Path | None:
    """The newest saved version (see :func:`versions`), or None when nothing was saved yet."""
    found = versions(versioned, name)
    return found[-1] if found else None


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
