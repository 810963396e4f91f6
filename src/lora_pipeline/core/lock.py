"""One training run per subject at a time: an OS file lock next to the subject's checkpoints.

The lock itself is ``filelock`` (``flock`` on Unix), which the kernel releases when its holder exits, however it
exits (kill -9 included), so a lock left by a dead process is never mistaken for a live one. Who holds it is
written to a small holder file beside it, for the message only: a clean release removes that file, so a holder
file found on acquiring means the previous holder died without releasing. Not for network filesystems where
flock is not shared between machines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from lora_pipeline.core.errors import LoraPipelineError

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
HOLDER_NAME = ".train.lock.holder"  # filelock truncates the lock file when it opens it: the holder lives apart
_HELD: dict[Path, int] = {}  # locks this process holds, so a hook, a node and the trainer it calls can all take one


class SubjectBusyError(LoraPipelineError):
    """Another process is training this subject right now."""


@contextlib.contextmanager
def subject_lock(folder: str | os.PathLike, subject: str) -> Iterator[None]:
    """Hold the subject's training lock for the block; fail at once, changing nothing, if another holds it.

    A process whose parent holds the lock (a ParallelRunner worker of the ``kedro run`` that took every
    subject's lock at start-up) runs under its parent's lock.
    """
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
    holder_file = folder / HOLDER_NAME
    lock = FileLock(folder / LOCK_NAME, is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read(holder_file)
        if holder.get("pid") == os.getppid():
            yield  # our parent process holds it for this run
            return
        raise SubjectBusyError(
            f"subject {subject} is being trained by PID {holder.get('pid', '?')} since "
            f"{holder.get('since', '?')} (lock {folder / LOCK_NAME}). Nothing was changed: wait for that run "
            f"to finish, or stop it and run again.") from None
    try:
        previous = _read(holder_file)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            logger.info("Taking over the lock of subject %s from PID %s, which stopped without releasing it",
                        subject, previous["pid"])
        holder_file.write_text(json.dumps({"pid": os.getpid(),
                                           "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}),
                               encoding="utf-8")
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            holder_file.unlink(missing_ok=True)  # a clean release: nobody to take over from next time
    finally:
        lock.release()


def _read(holder_file: Path) -> dict:
    try:
        return json.loads(holder_file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
