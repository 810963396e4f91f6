"""The human-reviewed captions file: read-only for the pipeline, so a re-run can never overwrite an edit."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from lora_pipeline.core.errors import DataError

COLUMNS = ["file_name", "text"]


class ReviewedCaptionsDataset(AbstractDataset[None, pd.DataFrame]):
    """CSV with ``file_name,text``. A missing file means "nothing reviewed yet" (an empty table).

    kedro-datasets' CSVDataset fails on a missing file and can also save; this one never writes,
    which is what guarantees that human edits survive every pipeline run.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        if not self._filepath.exists():
            return pd.DataFrame(columns=COLUMNS)
        rows = []
        with open(self._filepath, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return pd.DataFrame(columns=COLUMNS)
            header = [column.strip() for column in header]
            if header[:2] != COLUMNS:
                raise DataError(
                    f"{self._filepath}, line 1: the header must be 'file_name,text' (got {','.join(header)!r}). "
                    f"Fix the header and re-run."
                )
            for line_number, row in enumerate(reader, start=2):
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) != 2:
                    raise DataError(
                        f"{self._filepath}, line {line_number}: expected 2 columns (file_name,text), got "
                        f"{len(row)}. Quote captions that contain commas, e.g. \"sks, red dress\"."
                    )
                rows.append((row[0].strip(), row[1].strip()))
        table = pd.DataFrame(rows, columns=COLUMNS)
        duplicated = table[table.file_name.duplicated()].file_name.tolist()
        if duplicated:
            raise DataError(f"{self._filepath}: {duplicated[0]!r} is listed twice. Keep one row per image.")
        return table

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is edited by people only; the pipeline never writes it.")

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
