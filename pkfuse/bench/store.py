"""``pkfuse bench`` area ``store``: mkfs, open + full validation, allocation.

Targets (issue 3): mkfs of a 16 GiB image under 1 s; open + full validation
of an image holding 16 GiB of guest files in 2 MiB extents under 50 ms, with
a cost that grows with the number of extents, not with bytes (measured again
with 1/8 of the extents in an image of the same size); allocating a 4 GiB
file (truncate up) under 50 ms.

"Open + full validation" is reported twice: ``fsck.check_image`` (map
privately, replay the journal, every metadata check) and ``Store.open``
read-only (the same validation plus the in-memory indexes a mount builds).
Each timing is the best of several runs (``best_of``): the machine is shared.
Scratch images live in ``args.dir`` or a temporary directory beside /tmp and
are deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from backing import format as fmt
from backing import fsck
from backing.mkfs import mkfs
from backing.store import Store

from . import Report, best_of, timer

GiB = 1 << 30


def _populate(path: str, nfiles: int) -> int:
    """``nfiles`` guest files of 2 MiB each (one extent each), 1000 per directory.

    Returns the live extent records, root-pgtables' included."""
    with Store.open(path) as store:
        guest = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        vm = guest
        for i in range(nfiles):
            if i % 1000 == 0:
                vm = store.mkdir(guest, b"vm%d" % (i // 1000), 0o755, 0, 0)
            ino = store.create(vm, b"ram%d" % i, 0o644, 0, 0)
            store.truncate(ino, fmt.HUGE_PAGE)
        live = store.extents_by_page()[0].size
    return live


def _time_validation(report: Report, path: str, label: str, repeat: int) -> tuple[float, float]:
    status, findings = fsck.check_image(path)
    if status != 0:
        raise RuntimeError(f"bench image {path} is not clean: {findings[:3]}")
    t_fsck = best_of(repeat, lambda: fsck.check_image(path))
    t_open = best_of(repeat, lambda: Store.open(path, read_only=True).close())
    report.add(f"fsck check_image, {label}", t_fsck * 1e3, "ms", below=50)
    report.add(f"Store.open ro (validate+index), {label}", t_open * 1e3, "ms", below=50)
    return t_fsck, t_open


def run(report: Report, args: argparse.Namespace) -> None:
    quick = bool(getattr(args, "quick", False))
    size = 2 * GiB if quick else 16 * GiB
    alloc = 256 << 20 if quick else 4 * GiB
    repeat = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="pkfuse-bench-store-", dir=getattr(args, "dir", None)) as tmp:
        path = os.path.join(tmp, "bench.img")

        # mkfs of a sparse image
        t = best_of(3, lambda: mkfs(path, size, force=True))
        used = os.stat(path).st_blocks * 512
        report.add(f"mkfs {size // GiB} GiB image", t, "s", below=1,
                   detail=f"{used / 2**20:.1f} MiB allocated on disk")

        # open + full validation: as many 2 MiB files as fit, then 1/8 of them
        g = fmt.compute_geometry(size)
        fit = (g.npages - g.data_page - fmt.ROOT_PGTABLES_PAGES) // fmt.PAGES_PER_HUGE
        eighth = os.path.join(tmp, "eighth.img")
        mkfs(eighth, size)
        n_eighth = _populate(eighth, fit // 8)
        n_full = _populate(path, fit)
        label = f"{size // GiB} GiB, {n_full} extents"
        t_full, o_full = _time_validation(report, path, label, repeat)
        label = f"{size // GiB} GiB, {n_eighth} extents"
        t_8, o_8 = _time_validation(report, eighth, label, repeat)
        report.add("check_image cost ratio, 8x the extents", t_full / t_8, "x",
                   detail="same image size; 1 = independent of extents, 8 = linear")
        report.add("Store.open cost ratio, 8x the extents", o_full / o_8, "x")
        os.unlink(eighth)

        # allocation: truncate a fresh file up to `alloc` bytes
        mkfs(path, size, force=True)
        with Store.open(path) as store:
            guest = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
            ino = store.create(guest, b"vm0", 0o644, 0, 0)
            best = float("inf")
            for _ in range(repeat):
                with timer() as elapsed:
                    store.truncate(ino, alloc)
                best = min(best, elapsed())
                nextents = len(store.extents(ino))
                store.truncate(ino, 0)
        report.add(f"allocate a {alloc // GiB if alloc >= GiB else alloc / GiB:g} GiB file (truncate up)",
                   best * 1e3, "ms", below=50, detail=f"{nextents} extent(s)")
