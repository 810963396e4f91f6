"""Paths that come from the browser: resolved, then confined to the folders the workbench may read or write."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class PathRefused(ValueError):
    """A client path that leaves the allowed folders (``../``, an absolute path elsewhere, a symlink out)."""


def confined(client_path: str, roots: Iterable[Path]) -> Path:
    """``client_path`` (relative to the first root, or absolute) resolved with every symlink followed, if it lies
    inside one of ``roots`` (also resolved); else :class:`PathRefused`. Never joined unchecked: the check is on
    the resolved path, so ``a/../../x`` and a symlink pointing outside are both refused."""
    roots = [Path(root).resolve() for root in roots]
    if not roots or not client_path or "\x00" in client_path:
        raise PathRefused(f"path {client_path!r} refused")
    candidate = Path(client_path)
    resolved = (candidate if candidate.is_absolute() else roots[0] / candidate).resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise PathRefused(f"path {client_path!r} is outside the project's folders")
    return resolved
