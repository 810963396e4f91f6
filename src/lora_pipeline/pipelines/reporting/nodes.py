"""The subjects report: one row per LoRA of the library, written after every run that trains subjects."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from lora_pipeline.core.spec import ImageTrainingSummary
from lora_pipeline.pipelines import tracking

logger = logging.getLogger(__name__)


def summarize_subjects(*summaries_and_figures: Any) -> tuple[pd.DataFrame, str]:
    """``(summary_1, figures_1, summary_2, figures_2, ...)`` -> a table and a markdown report."""
    pairs = zip(summaries_and_figures[::2], summaries_and_figures[1::2])
    rows = []
    for summary, figures in pairs:
        summary: ImageTrainingSummary
        rows.append({
            "subject": summary.output_name, "family": summary.family, "trained_at": summary.finished_at,
            "mlflow_run_id": summary.mlflow_run_id or "", "dataset_hash": summary.dataset_hash[:12],
            "images": summary.num_images, "steps": summary.steps, "rank": summary.spec.rank,
            "alpha": summary.spec.alpha, "final_loss": round(summary.final_loss or 0.0, 5),
            "train_loss_change_pct": round(figures.get("loss_train_change_pct", float("nan")), 2),
            "holdout_loss_change_pct": round(figures.get("loss_holdout_change_pct", float("nan")), 2),
        })
    table = pd.DataFrame(rows)
    lines = ["# LoRA library", "", "One row per subject (subjects.yml); loss changes are the LoRA's denoising loss "
             "against the base model at fixed noise (negative = better).", "",
             "| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    report = "\n".join(lines) + "\n"
    tracking.log_text(report, "subjects_report.md")
    logger.info("Subjects report: %s", ", ".join(f"{r['subject']} ({r['steps']} steps)" for r in rows))
    return table, report
