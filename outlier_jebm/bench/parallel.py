"""The bench's cells in worker processes (``BenchSpec.jobs`` above 1).

A jebm fit is a stream of small matrix products that one torch thread runs nearly as fast as two:
on the 2-core machine of RESULTS.md one process trained at 917 images/s with one thread and 999
with two, while two one-thread processes side by side trained at 715 each (1 430 in all). So
cells run in up to ``jobs`` processes at once, started with ``spawn`` (no fork of a process that
holds torch's threads), each limited to ``job_threads`` threads (default: the usable cores over
``jobs``) for torch, OpenMP, BLAS and numba.

Each cell gets a process of its own: it prepares its split, runs ``runner.run_cell`` and sends back
the rows with the test scores and labels. Starting a process costs a few seconds against minutes
for a fit, and buys isolation: a process that dies (killed for memory, a crash in native code)
takes only its own cell down, which gets a failed row. The parent logs the rows to MLflow (one
writer for the store), writes the CSV as cells finish, and relays the workers' progress messages.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator

from .runner import BenchSpec, Cell, CellHook, CellOutcome, MessageHook, _base_row, run_cell

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
WORKER_DIED = "failed: its bench worker process died (exit code {code}; killed for memory?)"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(spec: BenchSpec) -> int:
    """``spec.job_threads``, or the usable cores shared out among the jobs (at least 1)."""
    return spec.job_threads or max(1, usable_cores() // spec.jobs)


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


def _worker(spec: BenchSpec, cell: Cell, deadline: float | None, threads: int, messages: Any, conn: Any) -> None:
    """A worker process: run one cell and send its outcome (or the exception a data error raised)."""
    import torch

    torch.set_num_threads(threads)
    try:
        outcome: Any = run_cell(spec, cell, deadline, messages.put, {})
    except BaseException as exc:  # e.g. DataError: the parent raises it, as a sequential run would
        outcome = exc
    try:
        conn.send(outcome)
    except Exception as exc:  # an exception that does not pickle
        conn.send(RuntimeError(f"{type(outcome).__name__}: {outcome}; and it could not be sent: {exc}"))
    conn.close()


def _relay(messages: Any, say: MessageHook, seen: set[str]) -> None:
    """Say what the workers said, once: the cells of one split each prepare it and say so."""
    while True:
        try:
            message = messages.get_nowait()
        except queue_module.Empty:
            return
        if message not in seen:
            seen.add(message)
            say(message)


def _died(cell: Cell, code: int | None) -> CellOutcome:
    from .detectors import JEBMVariant

    family = "jebm" if isinstance(cell.detector, JEBMVariant) else "pyod"
    row = _base_row(cell.detector.name, cell.detector.name, "score", family, cell.holdout, cell.seed)
    row["status"] = WORKER_DIED.format(code=code)
    return CellOutcome([(row, None, {}, {})], None)


def run_in_workers(
    spec: BenchSpec,
    cells: list[Cell],
    deadline: float | None,
    record: Callable[[int, CellOutcome], None],
    say: MessageHook,
    on_cell: CellHook | None,
) -> None:
    """Run ``cells`` in up to ``spec.jobs`` worker processes at once; ``record(index, outcome)`` as each finishes."""
    threads = threads_per_job(spec)
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    several = len({c.split for c in cells}) > 1
    jobs = min(spec.jobs, len(cells))
    say(f"{jobs} worker processes, {threads} thread(s) each")
    if on_cell is not None:
        on_cell(0, len(cells), f"{len(cells)} cells in {jobs} workers")
    waiting = list(range(len(cells)))
    running: dict[Any, tuple[int, Any]] = {}  # receiving end -> (cell index, process)
    finished = 0
    seen: set[str] = set()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker, args=(spec, cells[i], deadline, threads, messages, send), daemon=True
                )
                with _thread_environment(threads):
                    process.start()
                send.close()  # the child holds its own copy: EOF here once the child is gone
                running[receive] = (i, process)
            ready = wait(list(running), timeout=0.25)
            _relay(messages, say, seen)
            for receive in ready:
                i, process = running.pop(receive)
                try:
                    outcome = receive.recv()
                except EOFError:  # the process ended without sending: it died
                    process.join()
                    outcome = _died(cells[i], process.exitcode)
                process.join()
                receive.close()
                if isinstance(outcome, BaseException):
                    raise outcome
                record(i, outcome)
                finished += 1
                if on_cell is not None:
                    on_cell(finished, len(cells), f"{cells[i].label(several)} done, {len(running)} running")
    finally:
        for _, process in running.values():  # an error or an interrupt: a running fit may take many minutes
            process.terminate()
        for _, process in running.values():
            process.join()
        _relay(messages, say, seen)
