"""One output schema for every surface (CLI files, the HTTP server, the MLflow pyfunc, Spark).

A scored input is a row of ``RESULT_COLUMNS`` followed by one column per score component.
An input that could not be scored has ``label`` ``UNSCORED_LABEL`` (-1) and ``error`` saying
why, everywhere. In tables (the CLI's files, the pyfunc, Spark) its ``top_component`` is empty
and its score and component columns are missing: NaN in the pyfunc's and Spark's frames, null
in the CLI's JSON and parquet, an empty CSV cell. The HTTP server answers such an item with
just ``{"label": -1, "error": ...}``.
"""

from __future__ import annotations

import numpy as np

RESULT_COLUMNS = ("score", "score_normalized", "label", "top_component", "error")
UNSCORED_LABEL = -1
# column types, for typed tables (parquet, the MLflow signature); components are float64
RESULT_TYPES = {
    "score": "float64",
    "score_normalized": "float64",
    "label": "int64",
    "top_component": "string",
    "error": "string",
}


def output_columns(component_names: list[str]) -> list[str]:
    """The columns of a result table, in order."""
    return [*RESULT_COLUMNS, *component_names]


def unscored_table(errors: list[str], component_names: list[str]) -> dict[str, np.ndarray]:
    """A typed column table of len(errors) unscored rows (an empty reason: a row to be filled in)."""
    n = len(errors)
    table: dict[str, np.ndarray] = {
        "score": np.full(n, np.nan),
        "score_normalized": np.full(n, np.nan),
        "label": np.full(n, UNSCORED_LABEL, dtype=np.int64),
        "top_component": np.full(n, "", dtype=object),
        "error": np.array(errors, dtype=object),
    }
    table.update({k: np.full(n, np.nan) for k in component_names})
    return table


def unscored_row(reason: str) -> dict:
    """One unscored row as plain values (None where a typed table holds NaN)."""
    return {"score": None, "score_normalized": None, "label": UNSCORED_LABEL, "top_component": "", "error": reason}
