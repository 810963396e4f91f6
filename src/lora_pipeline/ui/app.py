"""The workbench's web app (FastAPI + Jinja2 templates + one hand-written script, all served from this package).

Pages: captions of one subject, subjects and runs, the library. The JSON API under ``/api`` is what the script
calls; every caption rule, fingerprint and command is the project's own (see :mod:`lora_pipeline.ui`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from lora_pipeline.core.errors import LoraPipelineError
from lora_pipeline.ui.captions import CaptionEdit, EditOp, apply_edit, tag_counts
from lora_pipeline.ui.library import generated_images, library_loras
from lora_pipeline.ui.mlflow_runs import run_link, stage_run
from lora_pipeline.ui.paths import PathRefused, confined
from lora_pipeline.ui.progress import parse_progress
from lora_pipeline.ui.project import ProjectView
from lora_pipeline.ui.runs import FINISHED, Job, RunQueue, caption_command, generate_command, train_command

HERE = Path(__file__).parent
TOKEN_COOKIE = "lora_pipeline_ui_token"
IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
QUEUE_FOLDER = Path("data") / "09_ui"  # queue.json and the jobs' logs, inside the project


class TokenRequired(ValueError):
    """Serving beyond this machine without a token."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise TokenRequired(f"--host {host} serves the workbench to other machines: give --token (or set "
                            f"LORA_PIPELINE_UI_TOKEN); every request must then carry it.")


# ----------------------------------------------------------------------------- request bodies

class EditBody(BaseModel):
    op: EditOp
    tag: str = ""
    replacement: str = ""
    text: str = ""
    names: list[str]  # the captions the edit applies to (the selection, or all)
    captions: dict[str, str]  # the page's current captions (edits not saved yet live in the page)


class TagsBody(BaseModel):
    captions: dict[str, str]


class SaveBody(BaseModel):
    edited: dict[str, str] = Field(description="file_name -> caption, the captions changed in the page")


class TrainBody(BaseModel):
    subjects: list[str]
    force: bool = False  # --all: retrain even when nothing changed


class GenerateBody(BaseModel):
    prompt: str
    seed: int | None = None
    count: int | None = Field(None, ge=1, le=16)


# ----------------------------------------------------------------------------- the app

def create_app(root: Path, env: str | None, host: str = "127.0.0.1", token: str | None = None, slots: int = 1,
               start_queue: bool = True) -> FastAPI:
    check_exposure(host, token)
    project = ProjectView(Path(root), env)
    queue = RunQueue(project.root / QUEUE_FOLDER, project.root, slots)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()  # running jobs go on when the server stops (their own sessions); the queue file keeps them
        yield
        queue.close()

    app = FastAPI(title="lora-pipeline workbench", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan if start_queue else None)
    app.state.project, app.state.queue = project, queue
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        """With a token, every request carries it: ``Authorization: Bearer``, the cookie the first page set, or
        ``?token=`` (the link printed at start-up)."""
        if token is None:
            return await call_next(request)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
            request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "a valid token is required"}, status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(LoraPipelineError)
    async def project_error(request: Request, exc: LoraPipelineError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(PathRefused)
    async def path_refused(request: Request, exc: PathRefused):
        return JSONResponse({"error": str(exc)}, status_code=403)

    def subject_or_404(subject: str) -> str:
        try:
            return project.require_subject(subject)
        except KeyError:
            raise HTTPException(404, f"no subject {subject!r} in subjects.yml") from None

    def page(request: Request, name: str, **values: Any):
        return templates.TemplateResponse(request, name, {"subjects": project.subjects(), "env": env or "local",
                                                          **values})

    # ------------------------------------------------------------------ pages

    @app.get("/")
    def home():
        return RedirectResponse("/subjects")

    @app.get("/captions/{subject}")
    def captions_page(request: Request, subject: str):
        return page(request, "captions.html", subject=subject_or_404(subject), page_name="captions")

    @app.get("/subjects")
    def subjects_page(request: Request):
        return page(request, "subjects.html", rows=project.subject_rows(), page_name="subjects")

    @app.get("/library")
    def library_page(request: Request):
        loras = library_loras(project.lora_dirs())
        return page(request, "library.html", loras=loras, page_name="library",
                    grid=_relative(project, project.dataset_path("comparison_grid")),
                    sheet=_relative(project, project.dataset_path("contact_sheet")))

    # ------------------------------------------------------------------ captions

    @app.get("/api/subjects/{subject}/captions")
    def captions(subject: str):
        found = project.captions(subject_or_404(subject))
        texts = {row.file_name: row.text for row in found.rows}
        return {"subject": subject, "trigger": found.trigger, "rows": [asdict(row) for row in found.rows],
                "reviewed_path": _relative(project, found.reviewed_path), "version": found.captioned_version,
                **_tags(texts)}

    @app.post("/api/subjects/{subject}/captions/edit")
    def edit_captions(subject: str, body: EditBody):
        trigger = project.params(f"{subject_or_404(subject)}.captioning").trigger
        edit = CaptionEdit(body.op, body.tag, body.replacement, body.text)
        changed = apply_edit(body.captions, body.names, edit, trigger)
        return {"changed": changed, **_tags({**body.captions, **changed})}

    @app.post("/api/subjects/{subject}/captions/tags")
    def caption_tags(subject: str, body: TagsBody):
        subject_or_404(subject)
        return _tags(body.captions)

    @app.post("/api/subjects/{subject}/captions/save")
    def save_captions(subject: str, body: SaveBody):
        path = project.save_reviews(subject_or_404(subject), body.edited)
        return {"saved": len(body.edited), "path": _relative(project, path)}

    @app.post("/api/subjects/{subject}/caption-run")
    def caption_run(subject: str):
        subject_or_404(subject)
        job = queue.submit("caption", subject, caption_command(env, subject), f"caption {subject}")
        return _job_view(project, queue, job)

    @app.get("/api/subjects/{subject}/image")
    def subject_image(subject: str, name: str):
        folder = project.image_folder(subject_or_404(subject))
        return _image_response(confined(name, [folder.root]))

    # ------------------------------------------------------------------ subjects and runs

    @app.get("/api/subjects")
    def subjects():
        return {"subjects": [asdict(row) for row in project.subject_rows()]}

    @app.post("/api/jobs")
    def train(body: TrainBody):
        for subject in body.subjects:
            subject_or_404(subject)
        return {"jobs": [_job_view(project, queue, queue.submit(
            "train", subject, train_command(env, subject, body.force), f"train {subject}"))
            for subject in body.subjects]}

    @app.get("/api/jobs")
    def jobs():
        return {"jobs": [_job_view(project, queue, job) for job in reversed(queue.jobs())]}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return _job_view(project, queue, _job_or_404(queue, job_id), log_lines=200)

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        if not queue.cancel(_job_or_404(queue, job_id).id):
            raise HTTPException(409, "only a queued job can be cancelled; stop a running one")
        return _job_view(project, queue, queue.get(job_id))

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str):
        if not queue.stop(_job_or_404(queue, job_id).id):
            raise HTTPException(409, "the job is not running")
        return _job_view(project, queue, queue.get(job_id))

    # ------------------------------------------------------------------ library

    @app.get("/api/loras")
    def loras():
        return {"loras": [{"name": lora.name, "versions": lora.versions, "header": lora.header}
                          for lora in library_loras(project.lora_dirs())]}

    @app.post("/api/generate")
    def generate(body: GenerateBody):
        if not body.prompt.strip():
            raise HTTPException(400, "write a prompt first")
        job = queue.submit("generate", None, generate_command(env, body.prompt, body.seed, body.count),
                           f"generate: {body.prompt[:60]}")
        return _job_view(project, queue, job)

    @app.get("/api/jobs/{job_id}/images")
    def job_images(job_id: str):
        found = _job_or_404(queue, job_id)
        folder = _images_folder(queue.log_text(found))
        if found.status != "done" or folder is None:
            return {"images": []}
        folder = confined(str(folder), [project.root])
        return {"images": [{"path": _relative(project, image.path), "parameters": image.parameters}
                           for image in generated_images(folder)]}

    @app.get("/file")
    def project_file(path: str):
        """An image inside the project or a subject's folders (samples, generated images, grids)."""
        return _image_response(confined(path, project.allowed_roots()))

    return app


# ----------------------------------------------------------------------------- helpers

def _tags(captions: dict[str, str]) -> dict[str, Any]:
    from lora_pipeline.prep.captions import split_tags

    return {"tags": {name: split_tags(text) for name, text in captions.items()}, "tag_counts": tag_counts(captions)}


def _relative(project: ProjectView, path: Path) -> str:
    path = Path(path)
    return path.relative_to(project.root).as_posix() if path.is_relative_to(project.root) else str(path)


def _image_response(path: Path) -> Response:
    if path.suffix.lower() not in IMAGE_TYPES:
        raise PathRefused(f"{path.name}: only images are served")
    if not path.is_file():
        raise HTTPException(404, "no such image")
    return FileResponse(path)


def _job_or_404(queue: RunQueue, job_id: str) -> Job:
    found = queue.get(job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    return found


_IMAGES_LINE = re.compile(r"^Images: (.+)$", re.M)


def _images_folder(log: str) -> Path | None:
    """Where ``lora-pipeline generate`` says it wrote the images (its last line)."""
    found = _IMAGES_LINE.findall(log)
    return Path(found[-1].strip()) if found else None


def _job_view(project: ProjectView, queue: RunQueue, job: Job, log_lines: int = 40) -> dict[str, Any]:
    text = queue.log_text(job)
    view = {**asdict(job), "progress": asdict(parse_progress(text)) if job.started else None,
            "log_tail": "\n".join(text.splitlines()[-log_lines:]), "finished": job.status in FINISHED,
            "samples": [], "mlflow_link": ""}
    view.pop("argv")
    if job.kind == "train" and job.subject and job.pid and (project.root / "mlflow.db").is_file():
        run = stage_run(project.tracking_uri(), job.subject, "training", job.pid)
        if run is not None:
            view["samples"] = [_relative(project, path) for path in run.samples]
            view["mlflow_link"] = run_link(run.experiment_id, run.run_id)
    return view
