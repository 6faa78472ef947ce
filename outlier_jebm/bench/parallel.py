"""The bench's cells in worker processes (``BenchSpec.jobs`` above 1).

A jebm fit is a stream of small matrix products that a second torch thread speeds up little (6 %
for the MLP default on an idle 2-core machine; RESULTS.md). So cells run in up to ``jobs``
processes at once, started with ``spawn`` (no fork of a process that holds torch's threads), each
limited to ``job_threads`` threads (default: the usable cores over the workers that run) for
torch, OpenMP, BLAS and numba. On 2 cores, two jebm cells with ``jobs=2`` took 0.68x the wall
time of ``jobs=1``, measured interleaved.

Each cell gets a process of its own: it prepares its split, runs ``runner.run_cell`` and sends back
the rows with the test scores and labels. Starting a process costs a few seconds against minutes
for a fit, and buys isolation: a process that dies (killed for memory, a crash in native code)
takes only its own cell down, which gets a failed row. The parent logs the rows to MLflow (one
writer for the store), writes the CSV as cells finish, and relays the workers' progress messages.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator

from .runner import BenchSpec, Cell, CellHook, CellOutcome, MessageHook, _status_row, run_cell

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(spec: BenchSpec, workers: int) -> int:
    """``spec.job_threads``, or the usable cores shared out among the workers that run (at least 1)."""
    return spec.job_threads or max(1, usable_cores() // max(1, workers))


@contextmanager
def _thread_environment(threads: int) -> Iterator[None]:
    """Thread-count variables for the workers spawned meanwhile (read by the libraries when imported)."""
    before = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _orphan_watch(parent: int) -> None:
    """End this worker when the parent is gone (killed without running its clean-up)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker(spec: BenchSpec, cell: Cell, deadline: float | None, threads: int, parent: int, conn: Any) -> None:
    """A worker process: run one cell, sending ("say", text) messages, then ("done", outcome) or ("raise", exc)."""
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    try:
        result: tuple[str, Any] = ("done", run_cell(spec, cell, deadline, lambda m: conn.send(("say", m)), {}))
    except BaseException as exc:  # e.g. DataError: the parent raises it, as a sequential run would
        result = ("raise", _sendable(exc))
    try:
        conn.send(result)
    except Exception as exc:  # an outcome that does not pickle: the cell fails, the run goes on
        conn.send(("done", _failed(cell, f"failed: its result could not be sent from the worker: {exc}")))
    conn.close()


def _failed(cell: Cell, status: str) -> CellOutcome:
    return CellOutcome([(_status_row(cell.detector, cell.holdout, cell.seed, status), None, {}, {})], None)


def run_in_workers(
    spec: BenchSpec,
    cells: list[Cell],
    deadline: float | None,
    record: Callable[[int, CellOutcome], None],
    say: MessageHook,
    on_cell: CellHook | None,
) -> int:
    """Run ``cells`` in up to ``spec.jobs`` worker processes at once; ``record(index, outcome)`` as each finishes.

    Returns the threads each worker ran with. Cells past the deadline are skipped here, without a
    process.
    """
    jobs = min(spec.jobs, len(cells))
    threads = threads_per_job(spec, jobs)
    context = multiprocessing.get_context("spawn")
    several = len({c.split for c in cells}) > 1
    say(f"{jobs} worker processes, {threads} thread(s) each")
    if on_cell is not None:
        on_cell(0, len(cells), f"{len(cells)} cells in {jobs} workers")
    waiting = list(range(len(cells)))
    running: dict[Any, tuple[int, Any]] = {}  # receiving end -> (cell index, process)
    finished = 0
    seen: set[str] = set()  # the cells of one split each prepare it and say so: say it once

    def finish(i: int, outcome: CellOutcome) -> None:
        nonlocal finished
        record(i, outcome)
        finished += 1
        if on_cell is not None:
            on_cell(finished, len(cells), f"{cells[i].label(several)} done, {len(running)} running")

    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                if deadline is not None and time.monotonic() >= deadline:
                    finish(i, run_cell(spec, cells[i], deadline, say, {}))  # a skipped row, at once
                    continue
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker, args=(spec, cells[i], deadline, threads, os.getpid(), send), daemon=True
                )
                with _thread_environment(threads):
                    process.start()
                send.close()  # the child holds its own copy: EOF here once the child is gone
                running[receive] = (i, process)
            for receive in wait(list(running), timeout=0.25):
                i, process = running[receive]
                try:
                    kind, payload = receive.recv()
                except (EOFError, OSError, pickle.UnpicklingError, TypeError, AttributeError) as exc:
                    # the process ended without a whole result: it died (or sent what cannot be read)
                    process.join()
                    why = (
                        f"its bench worker process died (exit code {process.exitcode}; killed for memory?)"
                        if isinstance(exc, EOFError)
                        else f"its result from the worker could not be read ({type(exc).__name__}: {exc})"
                    )
                    kind, payload = "done", _failed(cells[i], f"failed: {why}")
                if kind == "say":
                    if payload not in seen:
                        seen.add(payload)
                        say(payload)
                    continue
                del running[receive]
                process.join()
                receive.close()
                if kind == "raise":
                    raise payload
                finish(i, payload)
    finally:
        for _, process in running.values():  # an error or an interrupt: a running fit may take many minutes
            process.terminate()
        for _, process in running.values():
            process.join()
    return threads
