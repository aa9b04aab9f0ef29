"""The allocator: run search, placement policy and bitmap records, against a numpy model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backing import format as fmt
from backing.allocator import Allocator, runs_of

CHUNK = fmt.PAGES_PER_HUGE
MiB = 1 << 20


def make(used: np.ndarray, size: int = 16 * MiB) -> Allocator:
    """An allocator over a geometry of ``size`` bytes whose pool usage is ``used`` (from data_page)."""
    g = fmt.compute_geometry(size)
    full = np.zeros(g.bitmap_bytes * 8, bool)
    full[: g.data_page] = True
    full[g.data_page : g.data_page + used.size] = used
    return Allocator(np.packbits(full, bitorder="little"), g)


def pool_pages(size: int = 16 * MiB) -> int:
    g = fmt.compute_geometry(size)
    return g.npages - g.data_page


def check_runs(a: Allocator, runs: list[tuple[int, int]], want: int) -> None:
    """Runs are free, disjoint, in the pool, and total ``want``."""
    mask = np.zeros(a.geometry.npages, int)
    for p, n in runs:
        assert n > 0 and a.geometry.data_page <= p and p + n <= a.geometry.npages
        mask[p : p + n] += 1
    assert mask.max(initial=0) <= 1
    assert not (a.used & (mask > 0)).any()
    assert sum(n for _, n in runs) == want


# -------------------------------------------------------------------- runs_of


def test_runs_of_finds_starts_and_lengths() -> None:
    starts, lengths = runs_of(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], bool))
    assert starts.tolist() == [0, 3, 6] and lengths.tolist() == [2, 1, 3]


def test_runs_of_empty_and_all_false() -> None:
    for mask in (np.zeros(0, bool), np.zeros(5, bool)):
        starts, lengths = runs_of(mask)
        assert starts.size == 0 and lengths.size == 0


@given(st.lists(st.booleans(), max_size=200))
def test_runs_of_matches_a_python_scan(bits: list[bool]) -> None:
    want = []
    i = 0
    while i < len(bits):
        if bits[i]:
            j = i
            while j < len(bits) and bits[j]:
                j += 1
            want.append((i, j - i))
            i = j
        else:
            i += 1
    starts, lengths = runs_of(np.array(bits, bool))
    assert list(zip(starts.tolist(), lengths.tolist())) == want


# ------------------------------------------------------------------ placement


def test_whole_chunks_come_first_and_are_2mib_aligned() -> None:
    used = np.zeros(pool_pages(), bool)
    used[:10] = True  # first chunk partly used
    a = make(used)
    runs = a.find(2 * CHUNK)
    assert runs == [(a.geometry.data_page + CHUNK, 2 * CHUNK)]
    assert (a.geometry.base_phys + runs[0][0] * fmt.PAGE_SIZE) % fmt.HUGE_PAGE == 0


def test_best_fit_picks_the_smallest_run_of_chunks_that_fits() -> None:
    n = pool_pages()
    used = np.zeros(n, bool)
    # chunks: [free free free] used [free free] used [free ...]
    used[3 * CHUNK] = True
    used[6 * CHUNK] = True
    a = make(used)
    runs = a.find(2 * CHUNK)
    assert runs == [(a.geometry.data_page + 4 * CHUNK, 2 * CHUNK)]


def test_small_requests_use_partly_used_chunks_and_keep_free_chunks_whole() -> None:
    used = np.zeros(pool_pages(), bool)
    used[CHUNK : CHUNK + 100] = True  # chunk 1 partly used
    a = make(used)
    runs = a.find(7)
    assert runs == [(a.geometry.data_page + CHUNK + 100, 7)]


def test_remainder_past_whole_chunks_comes_from_a_partial_chunk() -> None:
    used = np.zeros(pool_pages(), bool)
    used[:CHUNK - 20] = True  # chunk 0 has 20 free pages at its end
    a = make(used)
    runs = a.find(CHUNK + 5)
    g = a.geometry
    assert runs[0] == (g.data_page + CHUNK, CHUNK)
    assert runs[1] == (g.data_page + CHUNK - 20, 5)


def test_fragments_when_no_single_run_fits() -> None:
    used = np.ones(pool_pages(), bool)
    used[10:14] = False
    used[40:43] = False
    used[100:102] = False
    a = make(used)
    runs = a.find(8)
    check_runs(a, runs, 8)
    assert [n for _, n in runs] == [4, 3, 1]  # longest first


def test_too_large_a_request_is_none() -> None:
    a = make(np.zeros(pool_pages(), bool))
    assert a.find(a.free_pages + 1) is None
    check_runs(a, a.find(a.free_pages), a.free_pages)


def test_free_pages_is_counted_from_the_bitmap() -> None:
    used = np.zeros(pool_pages(), bool)
    used[5:50] = True
    a = make(used)
    assert a.free_pages == pool_pages() - 45


def test_apply_mirrors_committed_changes() -> None:
    a = make(np.zeros(pool_pages(), bool))
    runs = a.find(CHUNK + 3)
    a.apply(runs, True)
    assert a.free_pages == pool_pages() - CHUNK - 3
    assert all(a.used[p : p + n].all() for p, n in runs)
    a.apply(runs, False)
    assert a.free_pages == pool_pages()


# ------------------------------------------------------ property: find vs model


@st.composite
def pool_state(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    n = pool_pages()
    used = np.zeros(n, bool)
    for _ in range(draw(st.integers(0, 12))):
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, 3 * CHUNK))
        used[start : start + length] = draw(st.booleans())
    free = int(n - used.sum())
    want = draw(st.integers(1, max(1, free)))
    return used, want


def model_free_chunks(used: np.ndarray) -> int:
    n = used.size // CHUNK
    return int((~used[: n * CHUNK].reshape(n, CHUNK).any(axis=1)).sum())


@settings(max_examples=200, deadline=None)
@given(pool_state())
def test_find_returns_free_disjoint_runs_of_the_requested_total(state: tuple[np.ndarray, int]) -> None:
    used, want = state
    a = make(used)
    runs = a.find(want)
    if want > a.free_pages:
        assert runs is None
        return
    assert runs is not None
    check_runs(a, runs, want)


@settings(max_examples=200, deadline=None)
@given(pool_state())
def test_find_uses_as_many_whole_chunks_as_the_request_and_pool_allow(state: tuple[np.ndarray, int]) -> None:
    used, want = state
    a = make(used)
    runs = a.find(want)
    if runs is None:
        return
    g = a.geometry
    taken = np.zeros(used.size, bool)
    for p, n in runs:
        taken[p - g.data_page : p - g.data_page + n] = True
    whole = taken & ~used
    nch = used.size // CHUNK
    chunks_taken = int(whole[: nch * CHUNK].reshape(nch, CHUNK).all(axis=1).sum())
    assert chunks_taken >= min(want // CHUNK, model_free_chunks(used))


@settings(max_examples=200, deadline=None)
@given(pool_state())
def test_small_request_never_breaks_a_whole_chunk_when_partial_space_suffices(state: tuple[np.ndarray, int]) -> None:
    used, want = state
    nch = used.size // CHUNK
    chunked = used[: nch * CHUNK].reshape(nch, CHUNK)
    partial_free = int((~chunked[chunked.any(axis=1)]).sum()) + int((~used[nch * CHUNK :]).sum())
    want = want % CHUNK or 1
    if want > partial_free:
        return
    a = make(used)
    runs = a.find(want)
    assert runs is not None
    assert model_free_chunks(used) == model_free_chunks(_with(used, runs, a.geometry.data_page))


def _with(used: np.ndarray, runs: list[tuple[int, int]], base: int) -> np.ndarray:
    out = used.copy()
    for p, n in runs:
        out[p - base : p - base + n] = True
    return out


def test_growth_from_an_unaligned_size_puts_chunks_at_2mib_file_offsets() -> None:
    used = np.zeros(pool_pages(), bool)
    used[: CHUNK - 100] = True  # chunk 0: 100 free pages at its end
    a = make(used)
    g = a.geometry
    runs = a.find(30 + 2 * CHUNK + 7, file_page=CHUNK - 30)
    assert runs[0] == (g.data_page + CHUNK - 100, 30)  # head: up to the file's 2 MiB boundary
    assert runs[1] == (g.data_page + CHUNK, 2 * CHUNK)  # chunks at file page 2 * CHUNK
    assert runs[2] == (g.data_page + CHUNK - 70, 7)  # tail


@settings(max_examples=200, deadline=None)
@given(pool_state(), st.integers(0, 4 * CHUNK))
def test_chunk_runs_start_at_2mib_file_offsets(state: tuple[np.ndarray, int], file_page: int) -> None:
    used, want = state
    a = make(used)
    runs = a.find(want, file_page)
    if runs is None:
        return
    check_runs(a, runs, want)
    fp = file_page
    chunks_needed = max(0, want - (-file_page % CHUNK)) // CHUNK
    aligned = 0
    for p, n in runs:
        phys_aligned = (p - a.geometry.data_page) % CHUNK == 0
        if phys_aligned and n % CHUNK == 0 and n >= CHUNK:
            assert fp % CHUNK == 0, "a whole chunk at an unaligned file offset"
            aligned += n // CHUNK
        fp += n
    assert aligned >= min(chunks_needed, model_free_chunks(used))


# ------------------------------------------------------------ bitmap_records


@settings(max_examples=200, deadline=None)
@given(pool_state(), st.booleans())
def test_bitmap_records_apply_exactly_the_runs(state: tuple[np.ndarray, int], value: bool) -> None:
    used, want = state
    a = make(used)
    if value:
        runs = a.find(want)
        if runs is None:
            return
    else:  # free some used runs
        starts, lengths = runs_of(a.used[a.geometry.data_page :])
        runs = [(int(s) + a.geometry.data_page, int(min(n, want))) for s, n in zip(starts, lengths)][:5]
    bitmap = a.bitmap.copy()
    spans = []
    for off, data in a.bitmap_records(runs, value):
        bitmap[off : off + data.size] = data
        spans.append((off, off + data.size))
    assert all(x[1] < y[0] for x, y in zip(spans, spans[1:]))  # merged: no shared byte written twice
    model = a.used.copy()
    for p, n in runs:
        model[p : p + n] = value
    got = np.unpackbits(bitmap, count=a.geometry.npages, bitorder="little").astype(bool)
    assert np.array_equal(got, model)


def test_bitmap_records_merge_runs_sharing_a_byte() -> None:
    a = make(np.zeros(pool_pages(), bool))
    p = a.geometry.data_page
    recs = a.bitmap_records([(p + 1, 2), (p + 5, 2)], True)
    assert len(recs) == 1
    off, data = recs[0]
    assert off == p // 8 and data.tolist() == [0b0110_0110]


@pytest.mark.parametrize("size", [16 * MiB, 64 * MiB + 4096])
def test_bits_past_npages_stay_zero(size: int) -> None:
    g = fmt.compute_geometry(size)
    a = make(np.zeros(g.npages - g.data_page, bool), size)
    runs = a.find(a.free_pages)
    bitmap = a.bitmap.copy()
    for off, data in a.bitmap_records(runs, True):
        bitmap[off : off + data.size] = data
    bits = np.unpackbits(bitmap, bitorder="little")
    assert bits[: g.npages].all() and not bits[g.npages :].any()
