"""The run queue: each job is one of the project's own commands (``lora-pipeline run --subject S``, a captioning
``kedro run``, ``lora-pipeline generate``) in its own process, so a crash never takes the workbench down and the
per-subject training lock holds against runs started from a shell.

The queue lives in one JSON file, rewritten atomically on every change, so it survives a restart: a job that was
running when the workbench stopped keeps running (its own session) and is watched again by its PID. Jobs start in
order, ``slots`` at a time (one per GPU), never two of one subject at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lora_pipeline.core.files import atomic_write_text
from lora_pipeline.ui.progress import error_message, read_tail

JobKind = Literal["train", "caption", "generate"]
JobStatus = Literal["queued", "running", "done", "failed", "stopped", "cancelled"]
FINISHED = ("done", "failed", "stopped", "cancelled")


# ----------------------------------------------------------------------------- the commands a job runs

def train_command(env: str | None, subject: str, force: bool = False) -> list[str]:
    """``lora-pipeline run`` for one subject: it retrains only if its data or parameters changed (``force``:
    ``--all``), takes the subject's lock, and resumes from its checkpoint (the trainer's ``resume: auto``)."""
    return [sys.executable, "-m", "lora_pipeline.cli", "run", *_env(env), "--subject", subject, "--no-generation",
            *(["--all"] if force else [])]


def caption_command(env: str | None, subject: str) -> list[str]:
    """The subject's captioning stage: auto captions only for images that have none cached (reviewed rows win)."""
    return [sys.executable, "-m", "kedro", "run", *_env(env), "--namespaces", subject, "--pipelines", "captioning"]


def generate_command(env: str | None, prompt: str, seed: int | None = None, count: int | None = None) -> list[str]:
    return [sys.executable, "-m", "lora_pipeline.cli", "generate", prompt, *_env(env),
            *(["--seed", str(seed)] if seed is not None else []), *(["--count", str(count)] if count else [])]


def _env(env: str | None) -> list[str]:
    return ["--env", env] if env else []


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    id: str
    kind: JobKind
    subject: str | None  # None: a job over the whole library (generation)
    argv: list[str]
    label: str
    status: JobStatus = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    returncode: int | None = None
    log: str = ""  # the log file, relative to the queue folder
    error: str = ""  # the run's own one-line message when it failed
    slot: int | None = None
    stop_requested: bool = False


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


class RunQueue:
    """Jobs in ``folder/queue.json`` with their logs beside it; a background thread starts and watches them."""

    def __init__(self, folder: Path, cwd: Path, slots: int = 1, poll_seconds: float = 0.3):
        self.folder, self.cwd, self.slots, self.poll = Path(folder), Path(cwd), max(1, slots), poll_seconds
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._processes: dict[str, subprocess.Popen] = {}
        self._jobs: list[Job] = self._read()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ persistence

    @property
    def state_file(self) -> Path:
        return self.folder / "queue.json"

    def _read(self) -> list[Job]:
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [Job(**item) for item in raw.get("jobs", [])]

    def _write(self) -> None:
        atomic_write_text(self.state_file, json.dumps({"jobs": [asdict(job) for job in self._jobs]}, indent=1))

    # ------------------------------------------------------------------ what the page does

    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job(**asdict(job)) for job in self._jobs]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((Job(**asdict(job)) for job in self._jobs if job.id == job_id), None)

    def submit(self, kind: JobKind, subject: str | None, argv: Sequence[str], label: str) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, subject=subject, argv=list(argv), label=label)
        job.log = f"logs/{job.id}.log"
        with self._lock:
            self._jobs.append(job)
            self._write()
        return Job(**asdict(job))

    def cancel(self, job_id: str) -> bool:
        """A queued job never starts. False when it already started (stop it instead) or is unknown."""
        with self._lock:
            job = self._find(job_id)
            if job is None or job.status != "queued":
                return False
            job.status, job.ended = "cancelled", time.time()
            self._write()
            return True

    def stop(self, job_id: str) -> bool:
        """SIGTERM to a running job's process group: the trainer ends its MLflow runs and keeps its last
        checkpoint, which the next run of that subject resumes from."""
        with self._lock:
            job = self._find(job_id)
            if job is None or job.status != "running" or not job.pid:
                return False
            job.stop_requested = True
            self._write()
            try:
                os.killpg(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            return True

    def log_path(self, job: Job) -> Path:
        return self.folder / job.log

    def log_text(self, job: Job, limit: int = 64_000) -> str:
        return read_tail(self.log_path(job), limit)

    # ------------------------------------------------------------------ the worker

    def start(self) -> "RunQueue":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lora-pipeline-ui-queue", daemon=True)
            self._thread.start()
        return self

    def close(self, stop_running: bool = False) -> None:
        """Stop watching; running jobs go on (their own sessions) unless ``stop_running``."""
        if stop_running:
            for job in self.jobs():
                if job.status == "running":
                    self.stop(job.id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if stop_running:
            for process in list(self._processes.values()):
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
            self.tick()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.poll)

    def tick(self) -> None:
        """One round: finish the jobs whose process ended, then start queued ones into free slots."""
        with self._lock:
            changed = False
            for job in self._jobs:
                if job.status == "running" and self._ended(job):
                    self._finish(job)
                    changed = True
            running = [job for job in self._jobs if job.status == "running"]
            free = [slot for slot in range(self.slots) if slot not in {job.slot for job in running}]
            busy = {job.subject for job in running if job.subject}
            for job in self._jobs:
                if not free:
                    break
                if job.status == "queued" and (job.subject is None or job.subject not in busy):
                    self._launch(job, free.pop(0))
                    busy.add(job.subject)
                    changed = True
            if changed:
                self._write()

    def _find(self, job_id: str) -> Job | None:
        return next((job for job in self._jobs if job.id == job_id), None)

    def _ended(self, job: Job) -> bool:
        process = self._processes.get(job.id)
        if process is not None:
            return process.poll() is not None
        return not _alive(job.pid)  # started by an earlier workbench: watched by its PID

    def _launch(self, job: Job, slot: int) -> None:
        log = self.log_path(job)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "KEDRO_DISABLE_TELEMETRY": "true"}
        if self.slots > 1:  # one job per GPU
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        with open(log, "ab") as handle:
            try:
                # Its own session: a stop signals the whole group, and a restart of the workbench leaves it running.
                process = subprocess.Popen(job.argv, cwd=self.cwd, stdout=handle, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as exc:
                job.status, job.error, job.ended = "failed", f"could not start {job.argv[0]}: {exc}", time.time()
                return
        self._processes[job.id] = process
        job.status, job.started, job.pid, job.slot = "running", time.time(), process.pid, slot

    def _finish(self, job: Job) -> None:
        process = self._processes.pop(job.id, None)
        text = self.log_text(job)
        job.ended = time.time()
        if process is not None:
            job.returncode = process.returncode
            ok = process.returncode == 0
        else:  # not our child: its exit code is gone; the run's own output says how it ended
            ok = "Error:" not in text and "Traceback" not in text
        if job.stop_requested:
            job.status = "stopped"
        elif ok:
            job.status = "done"
        else:
            job.status, job.error = "failed", error_message(text) or f"exit code {job.returncode}"
