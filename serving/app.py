"""The batch scoring HTTP server: FastAPI on uvicorn, Prometheus metrics, hard limits.

Routes
------
``POST /v1/score``   a batch, answered item by item in order:
    - ``application/json``: ``{"instances": [...]}``, an instance being a pixel array
      (S x S or S*S gray, S x S x 3 or S*S*3 RGB in H, W, C order; floats in [0, 1] or
      integers 0-255) or ``{"b64": "<PNG/JPEG bytes>"}``;
    - ``multipart/form-data``: image files (any field name), in upload order;
    - ``application/x-npy``: one ``.npy`` array (N, S*S) or (N, S, S), or (N, S*S*3) or
      (N, S, S, 3), the fast path for large batches (parsed with ``allow_pickle=False``).
    Every input becomes the model's kind: a grayscale model (``model.channels: 1``) takes
    colour as luminance, a colour model (3) repeats a gray image's channel.
    Answer: ``{"predictions": [{"score", "score_normalized", "label", "top_component",
    "components"} | {"error": "..."}], "model": ..., "n_scored": ..., "n_errors": ...}``.
``GET /health``      ``{"status": "ok"}`` once the model is loaded.
``GET /v1/model``    config, calibration, version, training data of the model, the kNN search in use.
``GET /metrics``     Prometheus text format.

Limits, each answered with a JSON ``{"error": ...}``: body size (413), items per request
(413), a multipart text field over 1 MB (413), malformed request (400 / 415 / 422), scoring
timeout or a full queue (503).
Scoring runs on one worker thread (torch uses the cores inside it), never on the event
loop, so health checks and metrics answer while a batch is scored.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from outlier_jebm.checkpoint import LoadedModel
from outlier_jebm.data import DataError, check_polarity, one_image_shapes
from outlier_jebm.io.payload import (
    Item,
    item_from_bytes,
    item_from_json,
    items_from_array,
    items_from_vectors,
    score_items,
    table_to_predictions,
)


@dataclass
class Limits:
    max_items: int = 1024
    max_body_bytes: int = 32 << 20
    max_text_field_bytes: int = 1 << 20  # a multipart field that is not a file upload (images come as files)
    timeout_s: float = 30.0
    max_queue: int = 8  # requests waiting for the scoring thread before new ones get 503


class JSONBytes(Response):
    """A JSON response rendered by orjson (several times faster than the standard library for
    a batch of predictions; a non-finite float becomes null instead of an invalid document)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jebm_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "jebm_request_latency_seconds",
            "Request latency by route",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.items = Counter("jebm_items", "Items received by /v1/score, by outcome", ["outcome"], registry=r)
        self.anomalies = Counter("jebm_anomalies", "Items labelled anomalous", registry=r)
        self.batch_size = Histogram(
            "jebm_batch_size",
            "Items per /v1/score request",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
        )
        self.scoring_seconds = Histogram(
            "jebm_scoring_seconds",
            "Time spent scoring a batch (model only)",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.in_flight = Gauge("jebm_requests_in_flight", "Requests being handled", registry=r)
        self.model_load = Gauge("jebm_model_load_seconds", "Seconds it took to load the model", registry=r)
        self.model_info = Gauge("jebm_model_info", "The model served (value 1)", ["model", "version"], registry=r)


ROUTES = {"/v1/score", "/health", "/v1/model", "/metrics"}


class ObserveMiddleware:
    """Requests, latency and in-flight gauge for every HTTP request (a plain ASGI middleware:
    it sees the status when the response starts and never buffers the body)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # unless a response starts: an unhandled error becomes a 500 further out
        m = self.metrics

        async def send_and_observe(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m.in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            m.in_flight.dec()
            m.latency.labels(route=route).observe(time.perf_counter() - t0)
            method = scope["method"] if scope["method"] in ("GET", "POST", "HEAD") else "other"  # bounded labels
            m.requests.labels(route=route, method=method, status=str(status)).inc()


class ServerState:
    def __init__(
        self,
        loaded: LoadedModel,
        model_ref: str,
        load_seconds: float,
        limits: Limits,
        steps: int | None,
        polarity: str = "keep",
    ):
        from outlier_jebm import __version__, native
        from outlier_jebm.scoring import Scorer

        self.loaded = loaded
        self.model_ref = model_ref
        self.limits = limits
        self.scorer = Scorer(loaded, steps=steps)
        self.components = self.scorer.component_names
        self.size = self.scorer.image_size
        self.channels = self.scorer.channels
        self.polarity = check_polarity(polarity)  # how encoded images (PNG, JPEG) are read
        self.vector_dim = loaded.config.model.vector_dim if loaded.config.model.is_vector else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jebm-score")
        self.waiting = 0
        self.metrics = Metrics()
        self.metrics.model_load.set(load_seconds)
        self.metrics.model_info.labels(model=model_ref, version=__version__).set(1)
        self.version = __version__
        # which latent kNN search scores here (builds the fused kernel now, not on the first request)
        self.knn_search = native.public_status() if self.scorer.reference is not None else None


def create_app(
    loaded: LoadedModel,
    *,
    model_ref: str = "",
    load_seconds: float = 0.0,
    limits: Limits | None = None,
    steps: int | None = None,
    polarity: str = "keep",
) -> FastAPI:
    """An app serving one loaded model (load it once, before, with ``load_for_serving``)."""
    if loaded.calibration is None:
        raise ValueError(f"{loaded.path}: the model has no calibration.json; refit or `jebm-od calibrate` it")
    # answers name the model, never a path on this server's disk
    state = ServerState(
        loaded,
        model_ref or (loaded.path.name if loaded.path else "model"),
        load_seconds,
        limits or Limits(),
        steps,
        polarity,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="jebm-od", version=state.version, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.jebm = state

    app.add_middleware(ObserveMiddleware, metrics=state.metrics)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_ref}

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        loaded = state.loaded
        return {
            "model": state.model_ref,
            "jebm_od_version": state.version,
            "data_kind": loaded.config.model.data_kind,
            "input_shape": list(loaded.config.model.data_shape),
            "image_size": state.size,
            "channels": state.channels,
            "polarity": state.polarity,
            "score_steps": state.scorer.score_cfg.steps,
            "components": state.components,
            "knn_search": state.knn_search,
            "config": loaded.config.to_dict(),
            "calibration": loaded.calibration,
            "training": loaded.meta,
            "limits": {
                "max_items": state.limits.max_items,
                "max_body_bytes": state.limits.max_body_bytes,
                "max_text_field_bytes": state.limits.max_text_field_bytes,
                "timeout_s": state.limits.timeout_s,
            },
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        body = await _read_body(request, state.limits.max_body_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        # parsing and decoding run off the event loop, so that /health and /metrics answer meanwhile
        if ctype == "application/json":
            items = await asyncio.to_thread(_items_from_json, body, state)
        elif ctype == "multipart/form-data":
            if state.vector_dim is not None:
                raise RequestError(
                    415,
                    'this is a vector model: send application/json {"instances": [[...numbers...]]} '
                    "or an application/x-npy (N, d) array",
                )
            items = await _items_from_multipart(request, state)
        elif ctype in ("application/x-npy", "application/octet-stream"):
            items = await asyncio.to_thread(_items_from_npy, body, state)
        else:
            raise RequestError(
                415,
                f"unsupported content type {ctype or '(none)'!r}: send application/json, "
                "multipart/form-data or application/x-npy",
            )
        m = state.metrics
        m.batch_size.observe(len(items))
        table = await _score_in_worker(state, items)
        preds = table_to_predictions(table, state.components)
        n_err = int(sum(1 for it in items if it.error is not None))
        m.items.labels(outcome="scored").inc(len(items) - n_err)
        m.items.labels(outcome="error").inc(n_err)
        m.anomalies.inc(int((table["label"] == 1).sum()))
        return JSONBytes(
            {"predictions": preds, "model": state.model_ref, "n_scored": len(items) - n_err, "n_errors": n_err}
        )

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette reads the form from the cached body
    return body


def _check_count(n: int, state: ServerState) -> None:
    if n == 0:
        raise RequestError(422, "the batch is empty")
    if n > state.limits.max_items:
        raise RequestError(413, f"{n} items in one request is over the limit of {state.limits.max_items}")


def _items_from_json(body: bytes, state: ServerState) -> list[Item]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise RequestError(422, 'expected a JSON object {"instances": [...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise RequestError(422, '"instances" must be a list')
    _check_count(len(instances), state)
    if state.vector_dim is not None:
        return items_from_vectors(instances, state.vector_dim)
    try:  # the common case, a well-formed numeric batch, is checked in one go
        array = np.asarray(instances)
        if array.dtype.kind in "iuf" and array.ndim in (2, 3, 4):
            items = items_from_array(array, state.size, "instances", state.channels)
            if len(items) == len(instances) and all(it.error is None for it in items):
                return items
    except (ValueError, DataError):
        pass
    return [
        item_from_json(obj, state.size, i, channels=state.channels, polarity=state.polarity)
        for i, obj in enumerate(instances)
    ]


async def _items_from_multipart(request: Request, state: ServerState) -> list[Item]:
    limit = state.limits.max_items
    try:
        form = await request.form(
            max_files=limit + 1, max_fields=limit + 1, max_part_size=state.limits.max_text_field_bytes
        )
    except Exception as exc:  # the multipart parser's own errors: too many or too large parts, or a malformed body
        reason = str(getattr(exc, "detail", None) or exc)
        if reason.startswith(("Too many files", "Too many fields")):
            raise RequestError(413, f"more than {limit} uploads in one request is over the limit of {limit}") from None
        if "exceeded maximum size" in reason:
            field_limit = state.limits.max_text_field_bytes
            raise RequestError(
                413,
                f"a form field that is not a file upload is over the limit of {field_limit} bytes "
                "(send images as file uploads)",
            ) from None
        raise RequestError(400, f"malformed multipart body ({reason})") from None
    uploads = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
    _check_count(len(uploads), state)
    files = [(upload.filename or key, await upload.read()) for key, upload in uploads]
    await form.close()

    def decode() -> list[Item]:
        return [item_from_bytes(data, state.size, name, state.channels, state.polarity) for name, data in files]

    return await asyncio.to_thread(decode)


def _items_from_npy(body: bytes, state: ServerState) -> list[Item]:
    _check_npy_size(body)
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(400, f"body is not a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise RequestError(400, "body is not a single .npy array")
    if state.vector_dim is not None:
        _check_count(len(array) if array.ndim == 2 else 1, state)
        try:
            return items_from_vectors(array if array.ndim == 2 else array.reshape(1, -1), state.vector_dim, "array")
        except DataError as exc:
            raise RequestError(422, str(exc)) from None
    _check_count(len(array) if array.ndim >= 2 and array.shape not in one_image_shapes(state.size) else 1, state)
    try:
        return items_from_array(array, state.size, "array", state.channels)
    except DataError as exc:
        raise RequestError(422, str(exc)) from None


async def _score_in_worker(state: ServerState, items: list[Item]) -> dict[str, np.ndarray]:
    if state.waiting >= state.limits.max_queue:
        raise RequestError(503, f"server busy: {state.waiting} batches already waiting; retry later")
    loop = asyncio.get_running_loop()

    def work() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        table = score_items(state.scorer, items)
        state.metrics.scoring_seconds.observe(time.perf_counter() - t0)
        return table

    # a batch counts against the queue until its scoring ends, even when its request has timed out: the worker
    # thread cannot be stopped, and new requests wait behind it
    state.waiting += 1
    future = loop.run_in_executor(state.executor, work)
    future.add_done_callback(lambda _: setattr(state, "waiting", state.waiting - 1))
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=state.limits.timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(
            503, f"no answer within the {state.limits.timeout_s:g} s timeout (waiting and scoring)"
        ) from None


def load_for_serving(model: str | Path | None) -> tuple[LoadedModel, str, float]:
    """Resolve ``model`` (directory, MLflow URI or the last fitted model) and load it once.

    Returns the model, the name the server answers with (the MLflow URI as given, else the model
    directory's own name: never a path on the server's disk) and the load time.
    """
    from outlier_jebm.checkpoint import load_model
    from outlier_jebm.modeldirs import resolve_model_dir
    from outlier_jebm.registry import is_model_uri

    t0 = time.perf_counter()
    loaded = load_model(resolve_model_dir(model))
    name = str(model) if is_model_uri(model) else Path(loaded.path).name
    return loaded, name, time.perf_counter() - t0


def _check_npy_size(body: bytes) -> None:
    """Refuse a ``.npy`` whose header declares more data than the body holds, before numpy allocates it (a 128-byte
    body may declare shape (10**10,))."""
    from numpy.lib import format as npy

    buf = io.BytesIO(body)
    try:
        version = npy.read_magic(buf)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(buf)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(400, f"body is not a .npy array ({exc})") from None
    declared = math.prod(int(n) for n in shape) * dtype.itemsize  # Python ints: no overflow
    if declared > len(body) - buf.tell():
        raise RequestError(
            400, f"body is not a .npy array: its header declares {declared} bytes of data, more than it holds"
        )
