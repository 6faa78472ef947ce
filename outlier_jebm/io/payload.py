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

from outlier_jebm.data import (
    DataError,
    decode_image,
    describe_shapes,
    image_stack,
    match_channels,
    one_image_shapes,
    read_image,
    to_unit_range,
)
from outlier_jebm.schema import UNSCORED_LABEL, unscored_table


@dataclass
class Item:
    """One input: its pixels in [0, 1] as (S, S) or (S, S, 3) float32 (the model's kind), a feature
    vector (d,) for a vector model, or why it cannot be scored."""

    pixels: np.ndarray | None = None
    error: str | None = None


def item_from_json(
    obj: Any, image_size: int, index: int, max_image_bytes: int = 8 << 20, channels: int = 1, polarity: str = "keep"
) -> Item:
    """An instance of ``{"instances": [...]}``: a pixel array or ``{"b64": "<PNG/JPEG bytes>"}``.

    A pixel array is one image, gray (S*S or S x S) or RGB (S*S*3 or S x S x 3, channel last);
    it is converted to the model's ``channels`` (gray repeated, RGB to luminance).
    """
    name = f"instances[{index}]"
    if isinstance(obj, dict):
        if set(obj) != {"b64"} or not isinstance(obj["b64"], str):
            return Item(error=f'{name}: an object must be {{"b64": "<base64 image bytes>"}}, got keys {sorted(obj)}')
        if len(obj["b64"]) > max_image_bytes * 4 // 3 + 4:
            return Item(error=f"{name}: encoded image larger than {max_image_bytes} bytes")
        try:
            data = base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, ValueError):
            return Item(error=f"{name}: b64 is not valid base64")
        return item_from_bytes(data, image_size, name, channels, polarity)
    if not isinstance(obj, list):
        return Item(error=f'{name}: expected a pixel array (list) or {{"b64": ...}}, got {type(obj).__name__}')
    try:
        array = np.asarray(obj)
    except ValueError:
        return Item(error=f"{name}: ragged pixel array (rows of different lengths)")
    if array.dtype == object or array.dtype.kind not in "iuf":
        return Item(error=f"{name}: pixels must be numbers")
    return _one_image(array, image_size, name, channels, per="instance")


def item_from_bytes(data: bytes, image_size: int, name: str, channels: int = 1, polarity: str = "keep") -> Item:
    """One encoded image (PNG, JPEG, ...); ``polarity`` as in ``data.decode_image``."""
    try:
        return Item(pixels=decode_image(data, image_size, name, channels, polarity))
    except DataError as exc:
        return Item(error=str(exc))


def items_from_array(array: np.ndarray, image_size: int, name: str = "input", channels: int = 1) -> list[Item]:
    """A batch array, (N, S*S) or (N, S, S) gray or (N, S*S*3) or (N, S, S, 3) RGB (or one such
    image): the batch's shape must be right; values are checked per row, then converted to the
    model's ``channels``."""
    rows = image_stack(array, image_size, name, channels)  # (N, S, S) or (N, S, S, 3), as given
    if rows.dtype.kind not in "iuf":
        raise DataError(f"{name}: pixels must be numbers, got dtype {rows.dtype}")
    items = []
    axes = tuple(range(1, rows.ndim))
    integer = rows.dtype.kind in "iu"
    if integer:
        ok = (rows.min(axis=axes) >= 0) & (rows.max(axis=axes) <= 255)
        unit = rows.astype(np.float32) / np.float32(255.0)
    else:
        finite = np.isfinite(rows).all(axis=axes)
        safe = np.where(np.isfinite(rows), rows, 0.0)
        ok = finite & (safe.min(axis=axes) >= 0.0) & (safe.max(axis=axes) <= 1.0)
        unit = rows.astype(np.float32, copy=False)
    unit = match_channels(unit, channels)
    for i in range(len(rows)):
        if ok[i]:
            items.append(Item(pixels=unit[i]))
        else:
            try:  # the per-row validator words the reason
                to_unit_range(rows[i], image_size, f"{name}[{i}]", channels)
                items.append(Item(error=f"{name}[{i}]: invalid pixels"))
            except DataError as exc:
                items.append(Item(error=str(exc)))
    return items


PATHS_OFF = "reading image files by path is turned off here (JEBM_OD_READ_PATHS=0); send pixels or image bytes"


def items_from_frame(frame, image_size: int, channels: int = 1, read_paths: bool = True) -> list[Item]:
    """A pandas DataFrame: S*S (gray) or S*S*3 (RGB, in H, W, C order) numeric pixel columns, or
    one column ``pixels`` of arrays, or one column ``path`` of image files (a single unnamed
    column of strings is read as paths). With ``read_paths`` False no file is opened: each path
    row is an error (``PATHS_OFF``)."""
    cols = list(frame.columns)

    def from_paths(paths: list) -> list[Item]:
        if not read_paths:
            return [Item(error=f"input[{i}]: {PATHS_OFF}") for i in range(len(paths))]
        return [_item_from_path(p, image_size, channels) for p in paths]

    if "path" in cols:
        return from_paths(frame["path"].tolist())
    if "pixels" in cols or len(cols) == 1:
        cells = frame["pixels" if "pixels" in cols else cols[0]].tolist()
        given = [v for v in cells if not _is_missing(v)]
        if "pixels" not in cols and given and all(isinstance(v, str) for v in given):  # one unnamed column of paths
            return from_paths(cells)
        return items_from_cells(cells, image_size, channels=channels)
    return _items_from_pixel_columns(frame, image_size, channels)


def _items_from_pixel_columns(frame, image_size: int, channels: int) -> list[Item]:
    """S*S (or S*S*3) numeric columns. A cell that is missing or not a number costs its own row only; a column with
    no number in it at all is the wrong input, refused whole."""
    import pandas as pd

    cols = list(frame.columns)
    odd = [c for c in cols if frame[c].dtype.kind not in "iufb"]
    if odd:
        coerced = frame[odd].apply(pd.to_numeric, errors="coerce")
        hopeless = [c for c in odd if coerced[c].isna().all()]
        if hopeless:
            raise DataError(f"input columns must all be numeric pixel columns; not numeric: {hopeless[:5]}")
        frame = frame.copy()
        frame[odd] = coerced
    gaps = frame.isna().to_numpy()
    values = frame.to_numpy()  # integer columns (object-typed ones too, once converted) stay integers: 0-255
    if gaps.any() or values.dtype.kind not in "iuf":
        values = frame.to_numpy(dtype=np.float64)
    if not gaps.any():
        return items_from_array(values, image_size, "input", channels)
    # integer pixel columns with a gap arrive as floats: a full row of whole numbers above 1 is read as 0-255 again
    items = []
    for i, row in enumerate(values):
        name = f"input[{i}]"
        if gaps[i].any():
            where = [str(c) for c, gap in zip(cols, gaps[i]) if gap][:3]
            items.append(Item(error=f"{name}: missing or not a number in column(s) {', '.join(where)}"))
            continue
        if row.max() > 1 and (row == np.round(row)).all():
            row = row.astype(np.int64)
        items.append(_one_image(row, image_size, name, channels))
    return items


def items_from_cells(cells: list, image_size: int, name: str = "pixels", channels: int = 1) -> list[Item]:
    """One item per cell (so rows stay aligned with the input): each cell one image, as an array
    of S*S or S x S numbers (gray) or S*S*3 or S x S x 3 (RGB, channel last). Well-formed cells
    are checked together, in one array per dtype and size."""
    shapes = one_image_shapes(image_size, channels)
    out: list[Item | None] = [None] * len(cells)
    groups: dict[tuple[str, int], tuple[list[int], list[np.ndarray]]] = {}
    for i, value in enumerate(cells):
        if value is None:
            out[i] = Item(error=f"{name}[{i}]: missing")
            continue
        try:
            array = np.asarray(value)
        except ValueError:
            out[i] = Item(error=f"{name}[{i}]: ragged pixel array")
            continue
        if array.shape in shapes and array.dtype.kind in "iuf":
            idx, arrays = groups.setdefault((array.dtype.kind, array.size), ([], []))
            idx.append(i)
            arrays.append(array.reshape(-1))
        else:
            out[i] = _one_image(array, image_size, f"{name}[{i}]", channels)
    for idx, arrays in groups.values():
        for i, item in zip(idx, items_from_array(np.stack(arrays), image_size, name, channels)):
            # a bad cell is re-checked alone so that its message names its own row
            if item.error is not None:
                item = _one_image(arrays[idx.index(i)], image_size, f"{name}[{i}]", channels)
            out[i] = item
    return out


def _one_image(array: np.ndarray, image_size: int, name: str, channels: int = 1, per: str = "row") -> Item:
    shapes = one_image_shapes(image_size, channels)
    shape = array.shape[1:] if array.ndim > 1 and array.shape[0] == 1 and array.shape[1:] in shapes else array.shape
    if shape not in shapes:
        return Item(
            error=f"{name}: shape {array.shape} is not {describe_shapes(image_size, channels, batch=False)}: "
            f"one image per {per}"
        )
    try:
        return Item(pixels=to_unit_range(array.reshape(shape), image_size, name, channels)[0])
    except DataError as exc:
        return Item(error=str(exc))


def _item_from_path(path: Any, image_size: int, channels: int = 1) -> Item:
    if not isinstance(path, str) or not path:
        return Item(error=f"path {path!r}: not a file path")
    try:
        return Item(pixels=read_image(Path(path), image_size, channels))
    except DataError as exc:
        return Item(error=str(exc))


def items_from_vectors(rows: Any, dim: int, name: str = "instances") -> list[Item]:
    """Vector models: one item per row, each a list (or array row) of ``dim`` numbers.

    A batch that is a well-formed (N, dim) numeric array is checked in one go; otherwise every
    row is checked alone, so a row of the wrong length or holding NaN costs only its own item.
    """
    try:
        array = np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError):
        array = None
    if array is not None and array.ndim == 2 and array.shape[1] == dim:
        finite = np.isfinite(array).all(1)
        return [
            Item(pixels=array[i].astype(np.float32)) if finite[i] else Item(error=f"{name}[{i}]: NaN or infinite value")
            for i in range(len(array))
        ]
    if array is not None and array.ndim != 2 and not isinstance(rows, list):
        raise DataError(f"{name}: shape {array.shape} is not (N, {dim}) vectors")
    items = []
    for i, row in enumerate(rows):
        if row is None:
            items.append(Item(error=f"{name}[{i}]: missing"))
            continue
        try:
            vec = np.asarray(row, dtype=np.float64)
        except (ValueError, TypeError):
            items.append(Item(error=f"{name}[{i}]: expected a list of {dim} numbers"))
            continue
        if vec.shape != (dim,):
            items.append(
                Item(error=f"{name}[{i}]: {vec.size} values in shape {vec.shape}, expected a list of {dim} numbers")
            )
        elif not np.isfinite(vec).all():
            items.append(Item(error=f"{name}[{i}]: NaN or infinite value"))
        else:
            items.append(Item(pixels=vec.astype(np.float32)))
    return items


def score_items(scorer, items: list[Item]) -> dict[str, np.ndarray]:
    """Score the good items in one batch; a column table in item order with an ``error`` column.

    Rows that could not be scored read as ``schema`` says: NaN scores, label -1, top_component "".
    """
    names = scorer.component_names
    good = [i for i, it in enumerate(items) if it.error is None]
    table = unscored_table([it.error or "" for it in items], names)
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
            out.append({"label": UNSCORED_LABEL, "error": str(err)})
            continue
        out.append(
            {
                "score": score[i],
                "score_normalized": norm[i],
                "label": label[i],
                "top_component": str(top[i]),
                "components": {k: c[i] for k, c in zip(component_names, comps)},
            }
        )
    return out


def _is_missing(value) -> bool:
    """None, or a scalar NaN (pandas' missing value in a column of strings)."""
    return value is None or (isinstance(value, float) and value != value)
