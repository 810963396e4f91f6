"""The ``lora-pipeline`` commands: one click group whose commands print our errors as one message.

    lora-pipeline run [--env E] [--all] [--runner R]   train only the subjects whose data or parameters changed
                      [--subject S] [--no-generation]   (only S; without the generation stage afterwards)
    lora-pipeline ui [--env E] [--port 7860]            the local web workbench (captions, queue, library)
    lora-pipeline generate "PROMPT <lora:a:0.8>" ...   one prompt through the generation stage
    lora-pipeline import-kohya CONFIG.toml              a kohya / lora-scripts config becomes a subject
    lora-pipeline lineage FILE                          from a LoRA file back to its MLflow runs and data
    lora-pipeline train-launch --subject S              one subject's training under `accelerate launch`
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from lora_pipeline.core.errors import LoraPipelineError


def user_error(exc: BaseException) -> LoraPipelineError | None:
    """The :class:`LoraPipelineError` behind ``exc``, if any: Kedro's catalog and runners wrap what a node or a
    dataset raised, and the person needs our message, not the wrapper's traceback."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LoraPipelineError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def as_click_errors(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            found = user_error(exc)
            if found is None:
                raise
            raise click.ClickException(str(found)) from exc
    return wrapper


class UserErrorsGroup(click.Group):
    """A click group whose commands print a :class:`LoraPipelineError` as ``Error: <message>`` (exit code 1)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if cmd.callback is not None:
            cmd.callback = as_click_errors(cmd.callback)
        super().add_command(cmd, name)


@click.group(name="lora-pipeline", cls=UserErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Helpers around the Kedro project (run them from the project root)."""


@main.command("run")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local)")
@click.option("--all", "run_all", is_flag=True, help="run every subject, changed or not")
@click.option("--runner", default=None, help="SequentialRunner (default), ParallelRunner or ThreadRunner")
@click.option("--subject", "only", multiple=True, help="only this subject (repeatable; still skipped if unchanged)")
@click.option("--generation/--no-generation", default=True, show_default=True,
              help="run the generation stage over the library afterwards")
def run_subjects(env: str | None, run_all: bool, runner: str | None, only: tuple[str, ...],
                 generation: bool) -> None:
    """Run the image pipelines for the subjects whose raw data or parameters changed since they were last
    trained, then generation. ``kedro run`` runs every subject; this skips the ones with nothing new."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.runner import ParallelRunner, SequentialRunner, ThreadRunner

    from lora_pipeline.project.subjects import recorded_fingerprint, subject_fingerprint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bootstrap_project(Path.cwd())
    with KedroSession.create(env=env) as session:
        context = session.load_context()
        subjects = list(context.config_loader.subjects())
        unknown = [name for name in only if name not in subjects]
        if unknown:
            raise click.BadParameter(f"no subject {unknown[0]!r}; subjects.yml has {', '.join(subjects)}",
                                     param_hint="--subject")
        subjects = [name for name in subjects if not only or name in only]
        changed = []
        parameters = context.config_loader["parameters"]  # as written: context.params holds the models built from them
        for name in subjects:
            previous = recorded_fingerprint(context.catalog, name)
            if run_all or previous is None or \
                    previous.fingerprint != subject_fingerprint(context.catalog, parameters, name):
                changed.append(name)
            else:
                click.echo(f"Subject {name}: unchanged since it was trained at {previous.trained_at} "
                           f"(same images, captions and parameters); not retrained.")
    if not changed:
        click.echo("No subject changed: nothing to do. `lora-pipeline run --all` runs every subject anyway.")
        return
    click.echo(f"Running subject(s): {', '.join(changed)}")
    runners = {"SequentialRunner": SequentialRunner, "ParallelRunner": ParallelRunner, "ThreadRunner": ThreadRunner}
    if runner is not None and runner not in runners:
        raise click.BadParameter(f"one of {', '.join(runners)}", param_hint="--runner")
    make_runner = runners[runner or "SequentialRunner"]
    with KedroSession.create(env=env) as session:
        session.run(pipeline_names=["__default__"], namespaces=changed, runner=make_runner())
    if not generation:
        return
    with KedroSession.create(env=env) as session:
        session.run(pipeline_names=["generation"], runner=SequentialRunner())


@main.command("import-kohya")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--subject", default=None, help="subject name (default: the config's output_name)")
@click.option("--dry-run", is_flag=True, help="print the subjects.yml entry instead of writing it")
@click.option("--conf", "conf_dir", default="conf/local", show_default=True, help="where subjects.yml is written")
def import_kohya(config: str, subject: str | None, dry_run: bool, conf_dir: str) -> None:
    """Turn a kohya sd-scripts / lora-scripts training TOML (its dataset_config followed), a dataset config, or a
    lora-scripts YAML config into a subject here (merged into it if it exists), and list every key that has no
    equivalent, with the reason."""
    from lora_pipeline.prep.kohya_config import run_import

    click.echo(run_import(config, subject, conf_dir, dry_run))


@main.command("generate")
@click.argument("prompt")
@click.option("--negative", default=None, help="negative prompt")
@click.option("--seed", type=int, default=None)
@click.option("--steps", type=int, default=None, help="sampling steps")
@click.option("--count", type=int, default=None, help="images for this prompt (seed, seed+1, ...)")
@click.option("--guidance", type=float, default=None, help="CFG scale")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--clip-skip", type=click.IntRange(1, 2), default=None, help="WebUI's CLIP skip (default: the LoRA's)")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local)")
def generate_command(prompt: str, negative: str | None, seed: int | None, steps: int | None, count: int | None,
                     guidance: float | None, width: int | None, height: int | None, clip_skip: int | None,
                     env: str | None) -> None:
    """Render one WebUI-style PROMPT (commas and <lora:name:weight> tags welcome) with the generation stage;
    the images land in a new version folder of data/07_model_output/generated/."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    defaults = {key: value for key, value in {
        "negative_prompt": negative, "seed": seed, "steps": steps, "count": count, "guidance": guidance,
        "width": width, "height": height, "clip_skip": clip_skip}.items() if value is not None}
    # Passed as a nested dict: `kedro run --params` would split the prompt at its commas.
    runtime = {"generation": {"prompt": prompt, **({"defaults": defaults} if defaults else {})}}
    bootstrap_project(Path.cwd())
    with KedroSession.create(env=env, runtime_params=runtime) as session:
        session.run(pipeline_names=["generation"])
        catalog = session.load_context().catalog
    from lora_pipeline.core.files import newest_version

    filepath = catalog.config_resolver.resolve_pattern("generated_images").get("filepath")
    images = newest_version(filepath) if filepath else None  # Kedro versions live in <filepath>/<version>/<name>
    if images is not None:
        click.echo(f"Images: {images}")


@main.command("lineage")
@click.argument("path", type=click.Path())
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
def lineage_command(path: str, tracking_uri: str | None) -> None:
    """From an exported LoRA file (or an LLM adapter folder) back to the MLflow runs, dataset and git commit that
    made it; the run that wrote this version folder comes first."""
    from lora_pipeline.cli.lineage import print_lineage

    sys.exit(print_lineage(path, tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"))


@main.command("train-launch")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local)")
@click.option("--project", default=".", type=click.Path(file_okay=False), help="project root")
@click.option("--subject", default=None, help="the subject (subjects.yml) to train; optional with one subject")
def train_launch_command(env: str | None, project: str, subject: str | None) -> None:
    """The training stage of one subject, under ``accelerate launch`` (1 CPU, 1 GPU or N GPUs):
    ``accelerate launch -m lora_pipeline.cli train-launch --subject aki``."""
    from lora_pipeline.cli.train_launch import launch

    launch(env, Path(project), subject)


@main.command("ui")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (off this machine: --token)")
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--token", envvar="LORA_PIPELINE_UI_TOKEN", default=None,
              help="required with a --host other than localhost; every request must carry it (or "
                   "LORA_PIPELINE_UI_TOKEN)")
@click.option("--slots", default=1, show_default=True, type=click.IntRange(1, 64),
              help="runs at a time (one per GPU)")
def ui_command(env: str | None, host: str, port: int, token: str | None, slots: int) -> None:
    """The local web workbench over this project: review captions, queue subjects, watch runs, try the
    library in a prompt (pip install -e ".[ui]")."""
    try:
        import uvicorn

        from lora_pipeline.ui.app import TokenRequired, create_app
    except ImportError as exc:
        raise click.ClickException(f"the workbench needs the 'ui' extra ({exc.name} is missing): "
                                   f"pip install -e \".[ui]\"") from None
    try:
        app = create_app(Path.cwd(), env, host=host, token=token, slots=slots)
    except TokenRequired as exc:
        raise click.UsageError(str(exc)) from None
    address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    click.echo(f"Workbench: {address}{'?token=' + token if token else ''}  (Ctrl-C stops it; running jobs go on)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
