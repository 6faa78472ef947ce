"""Turning request payloads into images, one item at a time, and scores back into rows.

Shared by the HTTP server and the MLflow pyfunc model so both accept the same inputs and
give the same answers as ``jebm-od score``. A bad item becomes an error for that item
alone; only a payload that is wrong as a whole (wrong shape of the batch) raises.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from outlier_jebm.data import DataError, decode_image, read_image, to_unit_range


@dataclass
class Item:
    """One input: its pixels in [0, 1] as (S, S) float32, or why it cannot be scored."""

    pixels: np.ndarray | None = None
    error: str | None = None


def item_from_json(obj: Any, image_size: int, index: int, max_image_bytes: int = 8 << 20) -> Item:
    """An instance of ``{"instances": [...]}``: a pixel array or ``{"b64": "<PNG/JPEG bytes>"}``."""
    name = f"instances[{index}]"
    if isinstance(obj, dict):
        if set(obj) != {"b64"} or not isinstance(obj["b64"], str):
            return Item(error=f"{name}: an object must be {{\"b64\": \"<base64 image bytes>\"}}, got keys {sorted(obj)}")
        if len(obj["b64"]) > max_image_bytes * 4 // 3 + 4:
            return Item(error=f"{name}: encoded image larger than {max_image_bytes} bytes")
        try:
            data = base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, ValueError):
            return Item(error=f"{name}: b64 is not valid base64")
        return item_from_bytes(data, image_size, name)
    if not isinstance(obj, list):
        return Item(error=f"{name}: expected a pixel array (list) or {{\"b64\": ...}}, got {type(obj).__name__}")
    try:
        array = np.asarray(obj)
    except ValueError:
        return Item(error=f"{name}: ragged pixel array (rows of different lengths)")
    if array.dtype == object or array.dtype.kind not in "iuf":
        return Item(error=f"{name}: pixels must be numbers")
    try:
        return Item(pixels=to_unit_range(array, image_size, name)[0]) if array.ndim in (1, 2) else Item(
            error=f"{name}: shape {array.shape} is not ({image_size * image_size},) or ({image_size}, {image_size})")
    except DataError as exc:
        return Item(error=str(exc))


def item_from_bytes(data: bytes, image_size: int, name: str) -> Item:
    try:
        return Item(pixels=decode_image(data, image_size, name))
    except DataError as exc:
        return Item(error=str(exc))


def items_from_array(array: np.ndarray, image_size: int, name: str = "input") -> list[Item]:
    """A batch array (N, S*S) or (N, S, S): the batch's shape must be right; values are checked per row."""
    array = np.asarray(array)
    s, flat = image_size, image_size * image_size
    if array.ndim == 2 and array.shape[1] == flat or array.ndim == 3 and array.shape[1:] == (s, s):
        rows = array.reshape(len(array), s, s)
    elif array.shape in ((flat,), (s, s)):
        rows = array.reshape(1, s, s)
    else:
        raise DataError(f"{name}: shape {array.shape} is not (N, {flat}) or (N, {s}, {s})")
    if rows.dtype.kind not in "iuf":
        raise DataError(f"{name}: pixels must be numbers, got dtype {rows.dtype}")
    items = []
    integer = rows.dtype.kind in "iu"
    if integer:
        ok = (rows.min(axis=(1, 2)) >= 0) & (rows.max(axis=(1, 2)) <= 255)
        unit = rows.astype(np.float32) / np.float32(255.0)
    else:
        finite = np.isfinite(rows).all(axis=(1, 2))
        safe = np.where(np.isfinite(rows), rows, 0.0)
        ok = finite & (safe.min(axis=(1, 2)) >= 0.0) & (safe.max(axis=(1, 2)) <= 1.0)
        unit = rows.astype(np.float32, copy=False)
    for i in range(len(rows)):
        if ok[i]:
            items.append(Item(pixels=unit[i]))
        else:
            try:  # the per-row validator words the reason
                to_unit_range(rows[i], image_size, f"{name}[{i}]")
                items.append(Item(error=f"{name}[{i}]: invalid pixels"))
            except DataError as exc:
                items.append(Item(error=str(exc)))
    return items


def items_from_frame(frame, image_size: int) -> list[Item]:
    """A pandas DataFrame: S*S numeric pixel columns, or one column ``pixels`` of arrays,
    or one column ``path`` of image files (a single unnamed column of strings is read as paths)."""
    cols = list(frame.columns)
    if "path" in cols or len(cols) == 1 and frame[cols[0]].map(lambda v: isinstance(v, str)).any():
        return [_item_from_path(p, image_size) for p in frame["path" if "path" in cols else cols[0]].tolist()]
    if "pixels" in cols or len(cols) == 1:
        return items_from_cells(frame["pixels" if "pixels" in cols else cols[0]].tolist(), image_size)
    numeric = frame.select_dtypes(include="number")
    if numeric.shape[1] != len(cols):
        bad = [c for c in cols if c not in numeric.columns][:5]
        raise DataError(f"input columns must all be numeric pixel columns; not numeric: {bad}")
    return items_from_array(frame.to_numpy(), image_size, "input")


def items_from_cells(cells: list, image_size: int, name: str = "pixels") -> list[Item]:
    """One item per cell (so rows stay aligned with the input): each cell one image, as an array
    of S*S or S x S numbers. Well-formed cells are checked together, in one array per dtype."""
    s, flat = image_size, image_size * image_size
    out: list[Item | None] = [None] * len(cells)
    groups: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for i, value in enumerate(cells):
        if value is None:
            out[i] = Item(error=f"{name}[{i}]: missing")
            continue
        try:
            array = np.asarray(value)
        except ValueError:
            out[i] = Item(error=f"{name}[{i}]: ragged pixel array")
            continue
        if array.shape in ((flat,), (s, s)) and array.dtype.kind in "iuf":
            idx, arrays = groups.setdefault(array.dtype.kind, ([], []))
            idx.append(i)
            arrays.append(array.reshape(flat))
        else:
            out[i] = _one_image(array, image_size, f"{name}[{i}]")
    for idx, arrays in groups.values():
        for i, item in zip(idx, items_from_array(np.stack(arrays), image_size, name)):
            # a bad cell is re-checked alone so that its message names its own row
            out[i] = item if item.error is None else _one_image(arrays[idx.index(i)], image_size, f"{name}[{i}]")
    return out


def _one_image(array: np.ndarray, image_size: int, name: str) -> Item:
    s, flat = image_size, image_size * image_size
    if array.shape not in ((flat,), (s, s), (1, flat), (1, s, s)):
        return Item(error=f"{name}: shape {array.shape} is not ({flat},) or ({s}, {s}): one image per row")
    try:
        return Item(pixels=to_unit_range(array.reshape(s, s), image_size, name)[0])
    except DataError as exc:
        return Item(error=str(exc))


def _item_from_path(path: Any, image_size: int) -> Item:
    if not isinstance(path, str) or not path:
        return Item(error=f"path {path!r}: not a file path")
    try:
        return Item(pixels=read_image(Path(path), image_size))
    except DataError as exc:
        return Item(error=str(exc))


def score_items(scorer, items: list[Item]) -> dict[str, np.ndarray]:
    """Score the good items in one batch; a column table in item order with an ``error`` column.

    Rows that could not be scored have NaN scores, label -1 and top_component "".
    """
    names = scorer.component_names
    n = len(items)
    good = [i for i, it in enumerate(items) if it.error is None]
    table: dict[str, np.ndarray] = {
        "score": np.full(n, np.nan), "score_normalized": np.full(n, np.nan),
        "label": np.full(n, -1, dtype=np.int64), "top_component": np.full(n, "", dtype=object),
        "error": np.array([it.error or "" for it in items], dtype=object),
    }
    table.update({k: np.full(n, np.nan) for k in names})
    if good:
        scored = scorer.score(np.stack([items[i].pixels for i in good]))
        for key, values in scored.items():
            if key in table:
                table[key][good] = values
    return table


def table_to_predictions(table: dict[str, np.ndarray], component_names: list[str]) -> list[dict[str, Any]]:
    """Per item, in order: score, score_normalized, label, top_component, components; or an error."""
    # Columns become Python lists in one C call each; the rows are then zipped together.
    score, norm = table["score"].tolist(), table["score_normalized"].tolist()
    label, top = table["label"].tolist(), table["top_component"].tolist()
    errors = table["error"].tolist()
    comps = [table[k].tolist() for k in component_names]
    out = []
    for i, err in enumerate(errors):
        if err:
            out.append({"error": str(err)})
            continue
        out.append({
            "score": score[i],
            "score_normalized": norm[i],
            "label": label[i],
            "top_component": str(top[i]),
            "components": {k: c[i] for k, c in zip(component_names, comps)},
        })
    return out
