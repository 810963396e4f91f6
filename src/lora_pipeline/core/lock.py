"""One training run per subject at a time: an OS file lock next to the subject's checkpoints.

``fcntl.flock`` is released by the kernel when its holder exits, however it exits (kill -9 included), so a
lock file left by a dead process is never mistaken for a live one; its PID and start time only serve the
message. Not for network filesystems where flock is not shared between machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from lora_pipeline.errors import LoraPipelineError

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
_HELD: dict[Path, int] = {}  # locks this process holds, so a node and the trainer it calls can both take one


class SubjectBusyError(LoraPipelineError):
    """Another process is training this subject right now."""


@contextlib.contextmanager
def subject_lock(folder: str | os.PathLike, subject: str) -> Iterator[None]:
    """Hold the subject's training lock for the block; fail at once, changing nothing, if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = (folder / LOCK_NAME).resolve()
    if key in _HELD:  # re-entry from the same process: already ours
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    handle = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            raise SubjectBusyError(
                f"subject {subject} is being trained by PID {holder.get('pid', '?')} since "
                f"{holder.get('since', '?')} (lock {folder / LOCK_NAME}). Nothing was changed: wait for that run "
                f"to finish, or stop it and run again.") from None
        previous = _read(handle)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.info("Taking over the lock of subject %s from PID %s, which is no longer running",
                        subject, previous["pid"])
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(),
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        handle.flush()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        handle.close()  # releases the flock


def _read(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}
