"""Scoring files and folders in bounded memory, and writing the results table (csv, json, parquet)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .data import ImageError, check_polarity, image_files, light_background, read_image
from .schema import RESULT_COLUMNS, unscored_row
from .scoring import Scorer
from .viz import anomaly_overlay

BASE_COLUMNS = ["path", *RESULT_COLUMNS]
OUTPUT_FORMATS = (".csv", ".json", ".parquet")


def score_files(
    scorer: Scorer,
    paths: Iterable[str | Path],
    *,
    maps_dir: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    polarity: str = "keep",
    light: list[str] | None = None,
) -> Iterator[dict]:
    """Score image files: one row per input, in input order, and a row with ``error`` for each unusable file.

    Images are read as the model's inputs (grayscale, or RGB for a colour model) and scored
    ``score.batch_size`` at a time, so a folder of any size never sits in memory at once. A bad
    file costs only its own row.

    Parameters
    ----------
    scorer : Scorer
        A calibrated model's scorer.
    paths : iterable of str or Path
        Image files.
    maps_dir : Path, optional
        Where to write each image's anomaly map: ``NNNNNN-<file name>.png``, ``NNNNNN`` the
        image's row in the output (from 0), so that no two inputs share a map.
    on_progress : callable, optional
        Called with (done, total) after each batch.
    polarity : str, default "keep"
        ``"auto"`` inverts gray dark-on-light images before scoring (``data.decode_image``);
        ``"keep"`` scores them as they are.
    light : list, optional
        The path of each gray dark-on-light image is appended here either way, so that the
        caller can say how many there were.

    Yields
    ------
    dict
        ``path``, then the columns of ``schema.output_columns``.
    """
    check_polarity(polarity)
    files, problems = image_files(paths)
    bad = {str(p): reason for p, reason in problems}
    total = len(files) + len(problems)
    done = 0
    for path, reason in problems:
        done += 1
        yield _error_row(path, reason)
    batch_size = scorer.score_cfg.batch_size
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, ok_paths = [], []
        for path in chunk:
            try:
                pixels = read_image(path, scorer.image_size, scorer.channels)
                if scorer.channels == 1 and light_background(pixels):
                    if light is not None:
                        light.append(str(path))
                    if polarity == "auto":
                        pixels = 1.0 - pixels  # what read_image(..., polarity="auto") returns
                images.append(pixels)
                ok_paths.append(path)
            except ImageError as exc:
                bad[str(path)] = exc.reason
        scored = {}
        if images:
            batch = np.stack(images)
            bs = scorer.components_of(batch)
            table = scorer.present(bs)
            for i, path in enumerate(ok_paths):
                scored[str(path)] = {k: table[k][i] for k in table}
                if maps_dir is not None:
                    maps_dir.mkdir(parents=True, exist_ok=True)
                    row_index = done + chunk.index(path)  # the row's place in the output
                    anomaly_overlay(batch[i], bs.pixel_error[i]).save(maps_dir / _map_name(row_index, path))
        for path in chunk:
            key = str(path)
            yield _row(key, scored[key]) if key in scored else _error_row(path, bad[key])
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, total)


def score_tables(
    scorer: Scorer,
    paths: Iterable[str | Path],
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[dict]:
    """Vector models: one row per table row (``path`` is ``FILE:ROW``, rows counted from 0).

    Each file is a table (``tables.load_table``: .csv, .parquet, .npy, .npz) with the model's
    number of features; a .csv / .parquet table's columns are picked by the names the model was
    fitted on, where it recorded them (other columns, such as an index, are left out). A file that cannot be read, or has the wrong width, is one error row;
    a row holding NaN or an infinite value is an error row of its own and the rest are scored.
    """
    from .data import DataError
    from .tables import load_table

    paths = [Path(p) for p in paths]
    dim = scorer.config.model.vector_dim
    names = scorer.feature_names  # a table's columns are matched by name where the model recorded them
    for n, path in enumerate(paths):
        try:
            features, _ = load_table(path, allow_nonfinite=True, columns=names)
            if features.shape[1] != dim:
                raise DataError(f"{path}: {features.shape[1]} features, but the model was fitted on {dim}")
        except DataError as exc:
            yield _error_row(path, str(exc).removeprefix(f"{path}: "))
            continue
        finite = np.isfinite(features).all(1)
        good = np.flatnonzero(finite)
        table = scorer.score(features[good]) if len(good) else {}
        position = {int(row): i for i, row in enumerate(good)}
        for row in range(len(features)):
            name = f"{path}:{row}"
            if row in position:
                yield _row(name, {k: v[position[row]] for k, v in table.items()})
            else:
                yield _error_row(name, "NaN or infinite value")
        if on_progress is not None:
            on_progress(n + 1, len(paths))


def _map_name(index: int, path: Path) -> str:
    """The overlay's file name: the input's position in the output (so no two inputs share one, whatever their
    folders or suffixes) and its name, with nothing but letters, digits, ``-`` and ``_`` in it (``a.png``: ``a_png``)."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "_", path.name).strip("_") or "image"
    return f"{index:06d}-{stem}.png"


def _row(path: str, values: dict) -> dict:
    row = {"path": path, "error": ""}
    for key, value in values.items():
        row[key] = value.item() if isinstance(value, np.generic) else value
    return row


def _error_row(path: Path | str, reason: str) -> dict:
    return {"path": str(path), **unscored_row(reason)}


def partial_path(path: Path) -> Path:
    """Where ``ResultWriter`` writes the rows for ``path`` until it closes: ``<stem>.partial<suffix>`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class ResultWriter:
    """Streams rows to csv, json (one array) or parquet, chosen by the file's extension.

    Rows go to ``<stem>.partial<suffix>`` beside ``path``, which replaces ``path`` when the writer
    closes: an existing file is never left half written. Used as a context manager and left by an
    exception (an interrupt), the partial file is closed as a valid file and kept, with the rows
    written so far, and ``path`` is untouched.
    """

    def __init__(self, path: Path, component_columns: list[str]):
        self.path = Path(path)
        self.format = self.path.suffix.lower()
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"{self.path}: output must end in .csv, .json or .parquet")
        self.columns = BASE_COLUMNS + component_columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
        self._rows: list[dict] = []
        self._count = 0
        self._file = None
        self._parquet = None
        if self.format == ".csv":
            self._file = self.partial.open("w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
            self._csv.writeheader()
        elif self.format == ".json":
            self._file = self.partial.open("w")
            self._file.write("[")

    def write(self, row: dict) -> None:
        clean = {c: _plain(row.get(c)) for c in self.columns}
        if self.format == ".csv":
            self._csv.writerow({k: "" if v is None else v for k, v in clean.items()})
        elif self.format == ".json":
            self._file.write(("," if self._count else "") + "\n" + json.dumps(clean))
        else:
            self._rows.append(clean)
            if len(self._rows) >= 5000:
                self._flush_parquet()
        self._count += 1

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        fields = [
            pa.field("path", pa.string()),
            pa.field("score", pa.float64()),
            pa.field("score_normalized", pa.float64()),
            pa.field("label", pa.int64()),
            pa.field("top_component", pa.string()),
            pa.field("error", pa.string()),
        ]
        fields += [pa.field(c, pa.float64()) for c in self.columns[len(BASE_COLUMNS) :]]
        schema = pa.schema(fields)
        table = pa.Table.from_pylist(self._rows, schema=schema)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self.partial), schema)
        self._parquet.write_table(table)
        self._rows = []

    def close(self, complete: bool = True) -> None:
        """Finish the file; ``complete``: move it to ``path`` (else it stays at ``partial``)."""
        if self.format == ".json":
            self._file.write("\n]\n")
        if self.format == ".parquet":
            self._flush_parquet()
            if self._parquet is not None:
                self._parquet.close()
        if self._file is not None:
            self._file.close()
        if complete and self.partial.exists():
            os.replace(self.partial, self.path)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(complete=exc_type is None)


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
