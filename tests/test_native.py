"""The fused kNN kernel against the torch search it replaces, and its build and fallback."""

import os
import shutil

import numpy as np
import pytest
import torch

from outlier_jebm import native
from outlier_jebm.knn import KNN_BLOCK, References, knn_points_and_directions, nearest_columns


def _cpu_has_avx2_and_fma() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags


# the same compiler the package uses; the CPU's own flags (torch's capability can be overridden)
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None and _cpu_has_avx2_and_fma()
needs_kernel = pytest.mark.skipif(not HAS_CC, reason="no C compiler or no AVX2 here: scoring uses the torch search")


@pytest.mark.skipif(not HAS_CC, reason="no C compiler or no AVX2 here")
def test_the_kernel_builds_and_loads_where_a_compiler_and_avx2_are_present():
    # so that CI, which has both, really runs the fused path everywhere below
    assert native.available(), native.status()
    assert native.status().startswith("fused kernel")


def _keys(queries, refs):
    """The full key matrices of both searches, as the torch search sees them."""
    product = torch.cat([queries @ w for w in refs.weights], 1)
    return product + refs.key_shift[0], product * refs.key_scale[1] + refs.key_shift[1]


@needs_kernel
@pytest.mark.parametrize("n_ref", [64, 200, 1500, 20000, 16570])  # one block; fewer blocks than m; many chunks
@pytest.mark.parametrize("batch", [1, 5, 7, 13, 200])  # tiles of 6 rows, full and partial
def test_the_kernel_finds_the_m_smallest_keys_of_both_searches_like_a_full_sort(n_ref, batch):
    gen = torch.Generator().manual_seed(n_ref + batch)
    ref = torch.randn(n_ref, 20, generator=gen) * torch.rand(n_ref, 1, generator=gen) * 4.0
    ref[30:50] = ref[3]  # equal rows: ties in both searches
    queries = torch.cat([ref[3:4], torch.randn(batch - 1, 20, generator=gen) * 2.0])
    refs = References(ref)
    packed, scale, shift = refs.fused
    m = min(6, n_ref)
    got = native.candidates(queries, packed, scale, shift, m, chunk=512)
    for t, keys in enumerate(_keys(queries, refs)):
        idx = got[:, t]
        assert int(idx.max()) < n_ref  # padding is never chosen
        assert all(len(set(row.tolist())) == m for row in idx)  # m different columns per row
        # the same key values as a full sort (the kernel sums in another order: a float32 tolerance)
        torch.testing.assert_close(keys.gather(1, idx).sort(1).values, keys.sort(1).values[:, :m], rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 65, 130])  # more candidates than one block holds
def test_the_kernel_agrees_with_the_torch_search_for_any_m(m):
    gen = torch.Generator().manual_seed(m)
    refs = References(torch.randn(3000, 12, generator=gen))
    queries = torch.randn(40, 12, generator=gen)
    packed, scale, shift = refs.fused
    got = native.candidates(queries, packed, scale, shift, m, chunk=1024)
    want = nearest_columns(queries, refs.weights, refs.points.chunk, m, [refs.point_keys, refs.direction_keys])
    for t in range(2):  # random data has no ties: the very same columns
        assert torch.equal(got[:, t].sort(1).values, want[t].sort(1).values)


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_count_the_chunk_or_the_rows_per_call(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    refs = References(torch.randn(5000, 16, generator=gen))
    queries = torch.randn(101, 16, generator=gen)
    packed, scale, shift = refs.fused
    first = native.candidates(queries, packed, scale, shift, 6, chunk=1024).sort(2).values
    monkeypatch.setattr(native, "MAX_ROWS", 12)  # several calls per batch, the last one partial
    assert torch.equal(native.candidates(queries, packed, scale, shift, 6, chunk=1024).sort(2).values, first)
    threads = torch.get_num_threads()
    try:
        for n, chunk in ((1, 64), (3, 4096), (2, 100)):
            torch.set_num_threads(n)
            assert torch.equal(native.candidates(queries, packed, scale, shift, 6, chunk=chunk).sort(2).values, first)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_scoring_gives_the_same_knn_components_with_and_without_the_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    ref = torch.randn(8000, 48, generator=gen) * 0.8
    queries = torch.cat([torch.randn(300, 48, generator=gen), ref[:7], ref[:3] * 1e-6])  # members; tiny norms
    refs = References(ref)
    fused = knn_points_and_directions(queries, refs)
    monkeypatch.setattr(native, "usable_for", lambda q: False)
    plain = knn_points_and_directions(queries, refs)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    assert (fused[0][300:307] > 0).all()  # a reference member skips itself in both paths


@needs_kernel
def test_bad_layouts_are_refused_with_a_reason():
    refs = References(torch.randn(300, 8))
    packed, scale, shift = refs.fused
    with pytest.raises(ValueError, match="do not fit queries of width 9"):
        native.candidates(torch.randn(4, 9), packed, scale, shift, 6, chunk=512)
    for bad in (
        torch.randn(4, 8, dtype=torch.float64),
        torch.randn(4, 8).half(),
        torch.randn(4, 8).int(),
        torch.randn(32),
    ):
        with pytest.raises(ValueError, match="queries must be a 2-d float32 CPU tensor"):
            native.candidates(bad, packed, scale, shift, 6, chunk=512)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.candidates(torch.randn(4, 8), packed, scale.double(), shift.double(), 6, chunk=512)
    assert native.candidates(torch.randn(0, 8), packed, scale, shift, 6, chunk=512).shape == (0, 2, 6)
    assert not native.usable_for(torch.randn(4, 8, dtype=torch.float64))
    assert not native.usable_for(torch.randn(4, 8, requires_grad=True))


def test_without_a_working_compiler_scoring_falls_back_to_the_torch_search_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("JEBM_OD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    lib, why = native._load()
    assert lib is None and why.startswith("torch search (the fused kernel did not build")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native._load() == (None, f"torch search (no C compiler: {tmp_path / 'no-such-cc'} not found)")
    monkeypatch.setenv("JEBM_OD_NATIVE", "0")
    assert native._load() == (None, "torch search (JEBM_OD_NATIVE=0)")
    assert not list(tmp_path.glob("*.so"))  # nothing half-built is left in the cache


@needs_kernel
def test_the_build_is_cached_under_a_name_from_source_flags_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("JEBM_OD_CACHE", str(tmp_path))
    lib, why = native._load()
    assert lib is not None, why
    built = sorted(tmp_path.glob("knn_blocks-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native._load()[0] is not None
    assert sorted(tmp_path.glob("*")) == built and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_padding_makes_the_reference_a_whole_number_of_blocks():
    refs = References(torch.randn(70, 5))
    packed, scale, shift = refs.fused
    assert packed.shape == (128 // 16, 5, 16) and scale.shape == shift.shape == (2, 128)
    assert 128 % KNN_BLOCK == 0
    assert torch.isinf(shift[:, 70:]).all() and torch.isfinite(shift[:, :70]).all()


@needs_kernel
def test_a_build_without_openmp_splits_rows_between_python_threads_with_the_same_result(monkeypatch, tmp_path):
    gen = torch.Generator().manual_seed(6)
    refs = References(torch.randn(3000, 16, generator=gen))
    queries = torch.randn(77, 16, generator=gen)
    packed, scale, shift = refs.fused
    want = native.candidates(queries, packed, scale, shift, 6, chunk=1024).sort(2).values
    monkeypatch.setenv("JEBM_OD_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP", [])  # e.g. a clang without libomp
    lib, why = native._load()
    assert lib is not None and not lib.jebm_knn_openmp() and why.endswith("Python threads)")
    monkeypatch.setattr(native, "_state", {"lib": lib, "status": why})
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            assert torch.equal(native.candidates(queries, packed, scale, shift, 6, chunk=1024).sort(2).values, want)
    finally:
        torch.set_num_threads(threads)
