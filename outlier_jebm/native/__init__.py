"""The fused kNN kernel (``knn_blocks.c``): built on first use, loaded with ctypes, optional.

The latent kNN search (``knn.knn_points_and_directions``) is a matrix product followed by
a selection. In torch the product is written out and read back by the selection; the kernel
computes the keys tile by tile in registers and keeps only each row's m best 64-column
blocks, so the product never leaves L1. It returns the same candidate columns as the torch
search (up to ties); the exact distances are then computed in torch as before.

The kernel is plain C with AVX2/FMA intrinsics (no torch headers, so it builds in about a
second). It is compiled by the system C compiler (``$CC``, else ``cc``) into the user's
cache (``$JEBM_OD_CACHE``, else ``$XDG_CACHE_HOME/jebm-od``, else ``~/.cache/jebm-od``),
under a name derived from the source, the flags and the compiler, and written atomically
so that concurrent processes (torchrun ranks, Spark tasks) cannot load half a file.

Where it cannot run (no compiler, a CPU without AVX2/FMA, a CUDA tensor, ``JEBM_OD_NATIVE=0``),
scoring uses the torch search (same results, slower) and logs why once per process: a warning,
or a debug line when it was switched off on purpose. ``status()`` says which search is in use;
``benchmarks/speed.py`` records it with its figures.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..fileio import atomic_path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("knn_blocks.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-std=gnu11", "-shared", "-fPIC"]
# with OpenMP the kernel runs on the runtime torch has loaded (libgomp.so.1); without it the
# rows are split between Python threads, which races torch's spinning workers for the cores
OPENMP = ["-fopenmp"]
ABI = 4
BUILD_FAILED = "torch search (the fused kernel did not build"  # the start of the status when it did not
TILE = 6  # query rows per register tile: the row split between threads is a multiple of it
MAX_ROWS = 4096  # query rows per kernel call: bounds its working memory (about 12 MB at m = 6)

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    if os.environ.get("JEBM_OD_CACHE"):
        return Path(os.environ["JEBM_OD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jebm-od"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build(cc: str, flags: list[str]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"knn_blocks-{digest}.so"
    if target.exists():
        return target
    # mode 0755: mkstemp's 0600 would keep other users of a shared cache out
    with atomic_path(target, mode=0o755) as tmp:
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
    return target


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("JEBM_OD_NATIVE", "1") == "0":
        return None, "torch search (JEBM_OD_NATIVE=0)"
    cc = _compiler()
    if cc is None:
        return None, f"torch search (no C compiler: {os.environ.get('CC', 'cc')} not found)"
    errors = []
    lib = None
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            lib = ctypes.CDLL(str(_build(cc, flags)))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    if lib is None:
        return None, f"{BUILD_FAILED}: {errors[-1]})"
    if lib.jebm_knn_abi() != ABI:
        return None, "torch search (the fused kernel's build is stale)"
    if not lib.jebm_knn_supported():
        return None, "torch search (this CPU has no AVX2/FMA)"
    f = lib.jebm_knn_candidates
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    f.argtypes = [fp, i64, i64, fp, i64, fp, fp, i64, i64, i64, i64, i64, fp]
    f.restype = ctypes.c_int
    return lib, "fused kernel (AVX2/FMA, " + ("OpenMP" if lib.jebm_knn_openmp() else "Python threads") + ")"


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["status"] = _load()
            quiet = _state["lib"] is not None or os.environ.get("JEBM_OD_NATIVE") == "0"
            (log.debug if quiet else log.warning)("latent kNN: %s", _state["status"])
        return _state["lib"]


def available() -> bool:
    """Whether the fused kernel is built and usable on this machine (builds it on first call)."""
    return _library() is not None


def status() -> str:
    """Which kNN search scoring uses here, and why (builds the kernel on first call)."""
    _library()
    return _state["status"]


def public_status() -> str:
    """``status`` for an answer to someone else: a build error's text, which names paths on this machine, is left
    out (the warning logged at the build has it)."""
    said = status()
    return f"{BUILD_FAILED}; the reason is in the log)" if said.startswith(BUILD_FAILED) else said


def usable_for(queries: torch.Tensor) -> bool:
    return queries.device.type == "cpu" and queries.dtype == torch.float32 and not queries.requires_grad and available()


def _pool(n: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state.get("pool")
        if pool is None or pool._max_workers < n:
            # a smaller pool is replaced, not shut down: another thread may be about to use it
            # (its idle workers exit once it is garbage collected)
            pool = _state["pool"] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jebm-knn")
        return pool


# a forked child has none of the parent's pool threads: it starts its own
os.register_at_fork(after_in_child=lambda: _state.pop("pool", None))


def candidates(
    queries: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, m: int, chunk: int
) -> torch.Tensor:
    """Column indices (B, T, m) of the m smallest keys per row and search, unordered.

    ``packed`` is the reference matrix W (Z, R') as (R'/16, Z, 16); ``scale`` and ``shift``
    are (T, R'), and search t looks at (queries @ W) * scale[t] + shift[t]. R' must be a
    multiple of 64 and m at most the number of real (finite-key) columns. Rows are split
    between ``torch.get_num_threads()`` threads; ctypes releases the GIL during each call.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the fused kNN kernel is not available: {_state['status']}")
    if not (queries.dtype == torch.float32 and queries.device.type == "cpu" and queries.dim() == 2):
        raise ValueError(
            f"queries must be a 2-d float32 CPU tensor, got {queries.dtype} {tuple(queries.shape)} on {queries.device}"
        )
    q = queries.detach().contiguous()
    B, Z = q.shape
    n_cols, T = scale.shape[1], scale.shape[0]
    if packed.shape != (n_cols // 16, Z, 16) or shift.shape != scale.shape:
        raise ValueError(
            f"packed {tuple(packed.shape)}, scale {tuple(scale.shape)} and shift "
            f"{tuple(shift.shape)} do not fit queries of width {Z}"
        )
    for t in (packed, scale, shift):
        if not (t.is_contiguous() and t.dtype == torch.float32 and t.device.type == "cpu"):
            raise ValueError("packed, scale and shift must be contiguous float32 CPU tensors")
    out = torch.empty(B, T, m, dtype=torch.int64)
    if B == 0:
        return out
    threads = torch.get_num_threads()
    unit = sum(1 << t for t in range(T) if bool((scale[t] == 1).all()))  # searches that only add a shift

    def run(s: int, e: int, threads: int) -> int:
        return lib.jebm_knn_candidates(
            q.data_ptr() + s * Z * 4,
            e - s,
            Z,
            packed.data_ptr(),
            n_cols,
            scale.data_ptr(),
            shift.data_ptr(),
            T,
            unit,
            m,
            chunk,
            threads,
            out.data_ptr() + s * T * m * 8,
        )

    codes = []
    for start in range(0, B, MAX_ROWS):  # the kept blocks take m x 64 floats per row and search
        stop = min(B, start + MAX_ROWS)
        if lib.jebm_knn_openmp() or threads == 1:
            codes.append(run(start, stop, threads))
        else:
            tiles = -(-(stop - start) // TILE)
            per = -(-tiles // min(threads, tiles)) * TILE
            spans = [(s, min(stop, s + per)) for s in range(start, stop, per)]
            codes += list(_pool(len(spans)).map(lambda span: run(*span, 1), spans))
    if any(codes):
        raise RuntimeError(f"fused kNN kernel failed with code {max(codes)} (1: bad arguments, 2: out of memory)")
    return out
