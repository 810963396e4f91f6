"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

from lora_pipeline.config import validate_all

logger = logging.getLogger(__name__)


class ValidateParametersHook:
    """Validate every parameter group before the first node runs, so a typo costs seconds, not a GPU hour."""

    @hook_impl
    def after_context_created(self, context) -> None:
        subjects = context.config_loader.subjects() if hasattr(context.config_loader, "subjects") else {}
        validated = validate_all(context.params, subjects)
        logger.info("Parameters valid: %s", ", ".join(sorted(validated)) or "none to check")


class SubjectFingerprintHook:
    """Remembers what each subject was trained on, so ``lora-pipeline run`` can skip unchanged subjects.

    The fingerprint is taken before the run starts and written only when the run finishes without error and
    trained and exported that subject.
    """

    def __init__(self):
        self._context = None
        self._pending: dict[str, str] = {}

    @hook_impl
    def after_context_created(self, context) -> None:
        self._context = context

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.subjects import subject_fingerprint

        loader = self._context.config_loader if self._context else None
        if loader is None or not hasattr(loader, "subjects"):
            return
        names = {node.name for node in pipeline.nodes}
        self._pending = {subject: subject_fingerprint(catalog, self._context.params, subject)
                         for subject in loader.subjects()
                         if {f"{subject}.train_lora", f"{subject}.export_kohya"} <= names}

    @hook_impl
    def after_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from lora_pipeline.subjects import record_fingerprint

        for subject, fingerprint in self._pending.items():
            record_fingerprint(subject, fingerprint)
        self._pending = {}


class SubjectStageRunsHook:
    """One MLflow run per subject and stage (``demo_lora.training``), nested under kedro-mlflow's run of the
    ``kedro run`` and tagged ``subject`` / ``stage``: what a node logs, and the metric datasets it saves, go there.

    A stage's run is opened before its first node and closed when the node's last output is saved (Kedro calls
    ``after_node_run`` before saving). ParallelRunner workers find a stage run another worker opened by its tags.
    """

    def __init__(self):
        self._open: dict[str, set[str]] = {}  # node name -> outputs not saved yet

    @staticmethod
    def _stage_of(node) -> tuple[str, str] | None:
        from lora_pipeline.pipeline_registry import stage_of_node

        if not node.namespace:
            return None
        stage = stage_of_node(node.name.rsplit(".", 1)[-1])
        return (node.namespace.split(".")[0], stage) if stage else None

    @hook_impl
    def before_node_run(self, node, catalog, inputs, is_async, run_id) -> None:
        import mlflow

        where = self._stage_of(node)
        parent = mlflow.active_run()
        if where is None or parent is None:
            return
        subject, stage = where
        client = mlflow.tracking.MlflowClient()
        found = client.search_runs(
            [parent.info.experiment_id], max_results=1,
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.subject = '{subject}' "
                          f"and tags.stage = '{stage}'")
        if found:
            mlflow.start_run(run_id=found[0].info.run_id, nested=True)
        else:
            mlflow.start_run(run_name=f"{subject}.{stage}", nested=True, tags={"subject": subject, "stage": stage})
        self._open[node.name] = set(node.outputs)

    @hook_impl
    def after_dataset_saved(self, dataset_name, data, node) -> None:
        import mlflow

        pending = self._open.get(node.name)
        if pending is None:
            return
        pending.discard(dataset_name)
        if not pending:
            del self._open[node.name]
            mlflow.end_run()

    @hook_impl
    def on_node_error(self, error, node, catalog, inputs, is_async, run_id) -> None:
        import mlflow

        if self._open.pop(node.name, None) is not None:
            mlflow.end_run(status="FAILED")
