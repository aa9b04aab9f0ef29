"""Free-space search over the allocation bitmap, vectorized with numpy.

The bitmap in the image is the truth; ``Allocator.used`` is a bool copy of it
(one byte per page) rebuilt at open, because run searches over bytes are a
few numpy passes while searches over packed bits are not. ``used`` changes
only through ``apply`` after the journal committed the matching bitmap
records, so it never runs ahead of the image.

Placement policy, in order:

1. Whole free 2 MiB chunks (512 pages, 2 MiB aligned in physical address
   space because ``data_page`` and ``base_phys`` are) for the part of a
   request that covers whole 2 MiB ranges *of the file*: one best-fit run
   of chunks if one is long enough, else the longest runs first. This is
   what lets a guest be mapped with few extents and VT-d 2 MiB leaves.
2. The rest -- the head up to the file's next 2 MiB boundary and the tail
   past the last one (or a small request) -- from free pages inside chunks
   that are already partly used, best fit, so whole free chunks stay whole.
3. Anything still missing from any free pages, best fit, longest first.

Runs come back in file order: head, chunks, tail. So a file grown from a
size that is not a multiple of 2 MiB still has file offset and physical
address congruent modulo 2 MiB over every chunk (a superpage needs both
aligned).
"""

from __future__ import annotations

import numpy as np

from . import format as fmt

Run = tuple[int, int]  #: (first image page, number of pages)


def runs_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of True in a 1-D bool array.

    One comparison pass and a search over the few positions where the value
    changes (a 17 GiB image's bitmap is 4 M bytes: ~3 ms, where a padded
    ``np.diff`` took ~50 ms)."""
    if mask.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bounds = np.concatenate(([0], np.flatnonzero(mask[1:] != mask[:-1]) + 1, [mask.size]))
    firsts = bounds[:-1]
    true = mask[firsts]
    return firsts[true], (bounds[1:] - firsts)[true]


def _take(starts: np.ndarray, lengths: np.ndarray, want: int) -> list[Run]:
    """Choose runs covering ``want`` units: one best fit, else longest first."""
    if want <= 0 or starts.size == 0:
        return []
    fits = np.flatnonzero(lengths >= want)
    if fits.size:
        best = fits[np.argmin(lengths[fits])]
        return [(int(starts[best]), want)]
    taken: list[Run] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(min(lengths[i], want))
        taken.append((int(starts[i]), n))
        want -= n
        if want == 0:
            break
    return taken


def _split(runs: list[Run], npages: int) -> tuple[list[Run], list[Run]]:
    """``runs`` cut after their first ``npages`` pages: (first part, rest)."""
    first: list[Run] = []
    rest: list[Run] = []
    for p, n in runs:
        take = min(n, npages)
        if take:
            first.append((p, take))
        if n > take:
            rest.append((p + take, n - take))
        npages -= take
    return first, rest


class Allocator:
    """Finds free page runs and produces the bitmap bytes that record them."""

    def __init__(self, bitmap: np.ndarray, geometry: fmt.Geometry) -> None:
        self.geometry = geometry
        self.bitmap = bitmap
        # unpackbits gives 0/1 bytes: a bool view, not a second npages-byte copy (this runs at every open)
        self.used = np.unpackbits(bitmap, count=geometry.npages, bitorder="little").view(bool)
        self.free_pages = int(geometry.npages - np.count_nonzero(self.used))

    def find(self, npages: int, file_page: int = 0) -> list[Run] | None:
        """Runs of free pages totalling ``npages``, in file order, or None if there are not enough.

        ``file_page`` is the file page the first run will hold (the file's
        current size in pages when it grows): chunks go where the file's
        2 MiB ranges start.
        """
        if npages > self.free_pages:
            return None
        g = self.geometry
        data = self.used[g.data_page :]
        nchunks = data.size // fmt.PAGES_PER_HUGE
        chunk_used = data[: nchunks * fmt.PAGES_PER_HUGE].reshape(nchunks, fmt.PAGES_PER_HUGE)
        chunk_free = ~chunk_used.any(axis=1)
        head = min(npages, -file_page % fmt.PAGES_PER_HUGE)  # pages up to the file's next 2 MiB boundary
        chunk_runs: list[Run] = []
        want = npages
        # 1. whole 2 MiB chunks
        if want - head >= fmt.PAGES_PER_HUGE and chunk_free.any():
            starts, lengths = runs_of(chunk_free)
            for c, n in _take(starts, lengths, (want - head) // fmt.PAGES_PER_HUGE):
                chunk_runs.append((g.data_page + c * fmt.PAGES_PER_HUGE, n * fmt.PAGES_PER_HUGE))
                chunk_free[c : c + n] = False  # taken: not a candidate below
                want -= n * fmt.PAGES_PER_HUGE
        if want == 0:
            return chunk_runs
        if not chunk_runs and want < fmt.PAGES_PER_HUGE:
            fit = self._fit_in_partial_chunk(chunk_used, chunk_free, want)
            if fit is not None:
                return [(g.data_page + fit, want)]
        free = ~data
        for c0, n in chunk_runs:  # pages just chosen are not free for the small search
            lo = c0 - g.data_page
            free[lo : lo + n] = False
        # 2. partly used chunks first, keeping whole free chunks whole
        small: list[Run] = []
        partial = free.copy()
        partial[: nchunks * fmt.PAGES_PER_HUGE].reshape(nchunks, fmt.PAGES_PER_HUGE)[chunk_free] = False
        for pool in (partial, free):
            starts, lengths = runs_of(pool)
            for p, n in _take(starts, lengths, want):
                small.append((g.data_page + p, n))
                free[p : p + n] = False
                want -= n
            if want == 0:
                head_runs, tail_runs = _split(small, head)
                return head_runs + chunk_runs + tail_runs
        return None  # unreachable while free_pages is exact; kept as a guard

    @staticmethod
    def _fit_in_partial_chunk(chunk_used: np.ndarray, chunk_free: np.ndarray, want: int) -> int | None:
        """Data page of the best-fitting free run of ``want`` pages inside one partly used
        chunk, or None. A small request's usual answer, found in the partly used chunks'
        pages only (no pass over the whole data region's free map, which is 4 M bytes for a
        17 GiB image). The best fit among runs that do not cross a chunk boundary: where
        one that does would fit better, the general search below is not asked."""
        part = np.flatnonzero(~chunk_free & ~chunk_used.all(axis=1))
        if not part.size:
            return None
        rows = np.zeros((part.size, fmt.PAGES_PER_HUGE + 1), bool)  # a used page after each row: runs stay inside
        rows[:, :-1] = ~chunk_used[part]
        starts, lengths = runs_of(rows.ravel())
        fits = np.flatnonzero(lengths >= want)
        if not fits.size:
            return None
        best = int(starts[fits[np.argmin(lengths[fits])]])
        row, col = divmod(best, fmt.PAGES_PER_HUGE + 1)
        return int(part[row]) * fmt.PAGES_PER_HUGE + col

    def bitmap_records(self, runs: list[Run], value: bool) -> list[tuple[int, np.ndarray]]:
        """New bitmap bytes, as (byte offset in the bitmap, bytes), with ``runs`` set to ``value``.

        Byte ranges of nearby runs are merged so that a byte shared by two
        runs is written once with both changes.
        """
        spans = sorted((p // 8, (p + n + 7) // 8) for p, n in runs)
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out = []
        for lo, hi in merged:
            seg = np.zeros((hi - lo) * 8, dtype=bool)
            have = self.used[lo * 8 : hi * 8]
            seg[: have.size] = have
            for p, n in runs:
                a, b = max(p, lo * 8), min(p + n, hi * 8)
                if a < b:
                    seg[a - lo * 8 : b - lo * 8] = value
            out.append((lo, np.packbits(seg, bitorder="little")))
        return out

    def apply(self, runs: list[Run], value: bool) -> None:
        """Mirror committed bitmap changes into ``used``."""
        for p, n in runs:
            self.used[p : p + n] = value
        delta = sum(n for _, n in runs)
        self.free_pages += -delta if value else delta


def expand_runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Every page of the runs (starts[i], counts[i]) in order: arange(s, s + c) for each, vectorized."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return offs + np.arange(total, dtype=np.int64)
