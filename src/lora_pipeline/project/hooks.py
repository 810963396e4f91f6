"""Project hooks."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from kedro.framework.hooks import hook_impl

from lora_pipeline.core.config import validate_all
from lora_pipeline.core.errors import ConfigError
from lora_pipeline.pipelines import tracking

logger = logging.getLogger(__name__)


def _flatten(values, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class ValidateParametersHook:
    """Everything that can stop a run is checked before its first node, so a typo or a busy subject costs seconds,
    not a GPU hour: every parameter group is validated when the context is created; before the pipeline runs, the
    files and folders its groups name are checked (base models, captioning models, init LoRAs, LoRA folders) and
    the training lock of every subject it trains is taken, held until the run ends.

    Nodes never parse parameters: each node function annotates its ``params:<group>`` argument with the group's
    model (``p: TrainingParams``), and Kedro (1.7's parameter validation, when the session builds its catalog)
    hands it that model. The raw files are validated here first, for errors that name the file and key."""

    def __init__(self):
        self._validated: dict = {}
        self._locks = contextlib.ExitStack()

    @hook_impl
    def after_context_created(self, context) -> None:
        from lora_pipeline.project.quiet import install

        install()  # again: Kedro's logging setup resets child loggers' levels after settings.py ran
        subjects = context.config_loader.subjects() if hasattr(context.config_loader, "subjects") else {}
        try:
            # The raw parameters (runtime --params included), not context.params: that property would build the
            # models first and fail with Kedro's message, which names neither the file nor the known keys.
            self._validated = validate_all(context.config_loader["parameters"], subjects)
        except ConfigError as exc:
            runtime = getattr(context.config_loader, "runtime_params", None) or {}
            if not runtime:
                raise
            given = ", ".join(f"{key}={value}" for key, value in _flatten(runtime))
            raise ConfigError(f"{exc.message}\nNote: --params on the command line set {given}; a value given there "
                              f"wins over the files, so check it first.") from None
        logger.info("Parameters valid: %s", ", ".join(sorted(self._validated)) or "none to check")

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.project.preflight import check_inputs

        used = {name.removeprefix("params:") for name in pipeline.inputs() if name.startswith("params:")}
        try:
            check_inputs({group: p for group, p in self._validated.items() if group in used},
                         lambda subject: _images_needing_a_captioner(catalog, subject, self._validated))
            self._take_locks({node.name for node in pipeline.nodes})
        except Exception:
            self._release()
            tracking.end_run("FAILED")  # a run stopped before its first node is FAILED (kedro-mlflow opened it)
            raise

    def _take_locks(self, node_names: set[str]) -> None:
        from accelerate import PartialState

        from lora_pipeline.core.lock import subject_lock

        if not PartialState().is_main_process:  # under `accelerate launch` the main process holds it
            return
        for group, p in self._validated.items():
            subject, _, name = group.rpartition(".")
            if name == "training" and f"{subject}.train_lora" in node_names:
                self._locks.enter_context(subject_lock(Path(p.checkpoint_dir) / p.output_name, p.output_name))

    def _release(self) -> None:
        self._locks.close()
        self._locks = contextlib.ExitStack()

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self, error, run_params, pipeline, catalog) -> None:
        self._release()


def _images_needing_a_captioner(catalog, subject: str, validated: dict) -> list[str]:
    """The raw images of ``subject`` that no person captioned (no reviewed row, sidecar or metadata.csv row)."""
    from lora_pipeline.prep.captions import has_human_caption, metadata_captions
    from lora_pipeline.prep.images import read_sidecar_detected

    p = validated[f"{subject}.captioning"]
    images = catalog.load(f"{subject}.raw_images")
    reviewed = set(catalog.load(f"{subject}.reviewed_captions").file_name)
    listed = metadata_captions(p.metadata_csv, images.root) if p.metadata_csv else {}

    def has_sidecar(name: str) -> bool:
        try:
            return name in listed or read_sidecar_detected(images.path(name), p.caption_extension) is not None
        except ValueError:  # unreadable: that image gets an auto caption
            return False

    return [name for name in images.names if not has_human_caption(name in reviewed, has_sidecar(name), p)]


class SubjectFingerprintHook:
    """Remembers what each subject was trained on, so ``lora-pipeline run`` can skip unchanged subjects.

    The fingerprint is taken before the run starts and written (catalog entry ``<subject>.subject_inputs``) only
    when the run finishes without error and trained and exported that subject.
    """

    def __init__(self):
        self._context = None
        self._pending: dict[str, str] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        self._context = context

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.project.subjects import subject_fingerprint

        loader = self._context.config_loader if self._context else None
        if loader is None or not hasattr(loader, "subjects"):
            return
        names = {node.name for node in pipeline.nodes}
        parameters = loader["parameters"]  # as written (context.params holds the models built from them)
        self._pending = {subject: subject_fingerprint(catalog, parameters, subject)
                         for subject in loader.subjects()
                         if {f"{subject}.train_lora", f"{subject}.export_kohya"} <= names}

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.project.subjects import record_fingerprint

        for subject, fingerprint in self._pending.items():
            record_fingerprint(catalog, subject, fingerprint)
        self._pending = {}


def runner_name(runner) -> str:
    """``SequentialRunner`` for a runner object, its repr (``<kedro.runner...SequentialRunner object at 0x..>``)
    or its name."""
    if runner is None or runner in ("", "None"):  # Kedro's default when no runner is given
        return "SequentialRunner"
    if not isinstance(runner, str):
        return type(runner).__name__
    return runner.strip("<>").split()[0].rsplit(".", 1)[-1]


class SubjectStageRunsHook:
    """One MLflow run per subject and stage (``demo_lora.training``), nested under kedro-mlflow's run of the
    ``kedro run`` and tagged ``subject`` / ``stage``: what a node logs, and the metric datasets it saves, go there.

    A stage's run is opened before its first node and closed when the node's last output is saved (Kedro calls
    ``after_node_run`` before saving). ParallelRunner workers find a stage run another worker opened by its tags.

    It also logs what datasets mark for the record (:class:`~lora_pipeline.datasets.files.TrackedArtifact`: the
    exported LoRA, the LLM adapter folder) into the run that is active when they are saved, before that run closes.
    """

    def __init__(self):
        self._open: dict[str, set[str]] = {}  # node name -> outputs not saved yet
        self._catalog = None  # the catalog the nodes save through (in this process: ParallelRunner workers too)

    @staticmethod
    def _stage_of(node) -> tuple[str, str] | None:
        from lora_pipeline.pipelines.stages import stage_of_node

        if not node.namespace:
            return None
        stage = stage_of_node(node.name.rsplit(".", 1)[-1])
        return (node.namespace.split(".")[0], stage) if stage else None

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        self._runner, self._runner_tagged = runner_name(run_params.get("runner")), False

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async, run_id) -> None:
        self._catalog = catalog
        if getattr(self, "_runner", None) and not getattr(self, "_runner_tagged", False):
            closed = tracking.tag_kedro_run(self._runner)
            if closed is not None:
                self._runner_tagged = True
                for run in closed:
                    logger.warning("MLflow run %s was left RUNNING by a process that no longer exists (killed?); "
                                   "marked KILLED.", run)
        tracking.log_parameter_groups(inputs)  # into the `kedro run`'s run, beside kedro-mlflow's (so before:)
        where = self._stage_of(node)
        if where is not None and tracking.start_stage_run(*where):
            self._open[node.name] = set(node.outputs)

    @hook_impl
    def after_dataset_saved(self, dataset_name, data, node) -> None:
        self._log_tracked(dataset_name)
        pending = self._open.get(node.name)
        if pending is None:
            return
        pending.discard(dataset_name)
        if not pending:
            del self._open[node.name]
            tracking.end_run()

    def _log_tracked(self, dataset_name: str) -> None:
        dataset = self._catalog.get(dataset_name) if self._catalog is not None else None
        artifact = getattr(dataset, "tracked", None)
        if artifact is None:
            return
        dataset.tracked = None
        if artifact.path.is_dir():
            tracking.log_artifacts(artifact.path, artifact.artifact_path)
        else:
            tracking.log_artifact(artifact.path, artifact.artifact_path)
        tracking.set_tags(artifact.tags)

    @hook_impl
    def on_node_error(self, error, node, catalog, inputs, is_async, run_id) -> None:
        if self._open.pop(node.name, None) is not None:
            tracking.end_run("FAILED")
