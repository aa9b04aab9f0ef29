"""The Store against a pure-Python model: every result, errno, tree and byte.

A hypothesis state machine drives a small image (16 MiB, 14 inodes, 24
extent records) so that every kind of ENOSPC happens. After each step the
tree and every file's bytes must equal the model, statfs must equal the
model's page and inode counts, no page a file keeps may move, and a refused
operation must leave the metadata byte-identical. From time to time the store is closed, the image
checked with fsck, and reopened (orphans are freed then).
"""

from __future__ import annotations

import errno
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from backing import format as fmt
from backing.errors import StoreError
from backing.fsck import check_image
from backing.mkfs import mkfs
from backing.store import Store

PS = fmt.PAGE_SIZE
INODES = 14
EXTENTS = 24
FIXED_INODES = 5  # record 0, /, /guest_mem, /iommu, /iommu/root-pgtables

# few names, mostly shallow: operations must collide to be interesting
paths = st.sampled_from([("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("a", "b", "c")])
sizes = st.one_of(
    st.integers(0, 3 * PS + 100),
    st.integers(0, 40).map(lambda n: n * PS),
    st.integers(1700, 2600).map(lambda n: n * PS - 7),  # two of these do not fit
)


class Refused(Exception):
    def __init__(self, code: int) -> None:
        self.errno = code


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(_tmpdir) / f"model-{id(self)}.img"
        self.store: Store | None = None

    # ------------------------------------------------------------- set-up

    @initialize()
    def make_image(self) -> None:
        mkfs(self.tmp, 16 << 20, inode_count=INODES, extent_count=EXTENTS, force=True)
        self.store = Store.open(self.tmp)
        self.tree: dict[tuple[str, ...], bytearray | None] = {}  # None = directory
        self.orphans: dict[int, bytearray] = {}
        self.pool_free = self.store.statfs().free_pages
        self.reopens = 0
        self.layouts: dict[tuple[int, int], np.ndarray] = {}  #: (ino, igen) -> image page of each file page

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        self.tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------- model

    def free_pages(self) -> int:
        return self.pool_free - sum(_pages(len(f)) for f in self.files()) - sum(
            _pages(len(f)) for f in self.orphans.values()
        )

    def files(self) -> list[bytearray]:
        return [v for v in self.tree.values() if v is not None]

    def used_inodes(self) -> int:
        return len(self.tree) + len(self.orphans)

    def parent_errno(self, path: tuple[str, ...]) -> int:
        for i in range(1, len(path)):
            node = self.tree.get(path[:i], "missing")
            if node == "missing":
                return errno.ENOENT
            if node is not None:
                return errno.ENOTDIR
        return 0

    def pick(self, data: st.DataObject, want: str = "any") -> tuple[str, ...]:
        """A path: usually an existing file (``want="file"``) or directory, sometimes any path."""
        have = sorted(p for p, v in self.tree.items()
                      if want == "any" or (want == "file") == (v is not None))
        if have and data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(have))
        return data.draw(paths)

    def children(self, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        return [p for p in self.tree if len(p) == len(path) + 1 and p[: len(path)] == path]

    # ------------------------------------------------------------- real

    def resolve(self, path: tuple[str, ...]) -> tuple[int, bytes]:
        s = self.store
        parent = s.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
        for part in path[:-1]:
            parent = s.lookup(parent, part.encode())
        return parent, path[-1].encode()

    def ino(self, path: tuple[str, ...]) -> int:
        parent, name = self.resolve(path)
        return self.store.lookup(parent, name)

    def metadata(self) -> bytes:
        return self.store.image[: self.store.geometry.data_page * PS].tobytes()

    def attempt(self, fn, want: int, may_enospc: bool = False) -> int:
        """Run ``fn``; its errno must be ``want`` (ENOSPC is also accepted if ``may_enospc``).

        A refusal must leave metadata and statfs exactly as they were.
        """
        before, fs = self.metadata(), self.store.statfs()
        try:
            fn()
            got = 0
        except StoreError as exc:
            got = exc.errno
        if got == errno.ENOSPC and may_enospc and want == 0:
            want = errno.ENOSPC
        assert got == want, f"store gave {errno.errorcode.get(got, got)}, model wants {errno.errorcode.get(want, want)}"
        if got:
            assert self.metadata() == before, "a refused operation changed metadata"
            assert self.store.statfs() == fs
        return got

    def extent_records_free(self) -> int:
        return int((self.store.extents_table["npages"] == 0).sum())

    # ------------------------------------------------------------- rules

    @rule(data=st.data())
    def create_file(self, data: st.DataObject) -> None:
        self.create(self.pick_new(data), False)

    @rule(data=st.data())
    def create_file_again(self, data: st.DataObject) -> None:  # files are what most rules need
        self.create(self.pick_new(data), False)

    @rule(data=st.data())
    def make_dir(self, data: st.DataObject) -> None:
        self.create(self.pick_new(data), True)

    def pick_new(self, data: st.DataObject) -> tuple[str, ...]:
        """Usually a name in an existing directory, sometimes any path."""
        dirs = [()] + sorted(p for p, v in self.tree.items() if v is None and len(p) < 3)
        if data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(dirs)) + (data.draw(st.sampled_from("abc")),)
        return data.draw(paths)

    def create(self, path: tuple[str, ...], is_dir: bool) -> None:
        want = self.parent_errno(path)
        if not want and path in self.tree:
            want = errno.EEXIST
        if not want and self.used_inodes() >= INODES - FIXED_INODES:
            want = errno.ENOSPC

        def do() -> None:
            parent, name = self.resolve(path)
            if is_dir:
                self.store.mkdir(parent, name, 0o755, 0, 0)
            else:
                self.store.create(parent, name, 0o600, 0, 0)

        if not self.attempt(do, want):
            self.tree[path] = None if is_dir else bytearray()

    @rule(data=st.data(), keep_open=st.booleans())
    def unlink(self, data: st.DataObject, keep_open: bool) -> None:
        path = self.pick(data, "file")
        want = self.parent_errno(path)
        node = self.tree.get(path, "missing")
        if not want:
            want = errno.ENOENT if node == "missing" else errno.EISDIR if node is None else 0
        got: list[int] = []

        def do() -> None:
            parent, name = self.resolve(path)
            got.append(self.store.unlink(parent, name, keep_open=keep_open))

        if not self.attempt(do, want):
            data = self.tree.pop(path)
            if keep_open:
                self.orphans[got[0]] = data

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.pick(data, "dir")
        want = self.parent_errno(path)
        node = self.tree.get(path, "missing")
        if not want:
            if node == "missing":
                want = errno.ENOENT
            elif node is not None:
                want = errno.ENOTDIR
            elif self.children(path):
                want = errno.ENOTEMPTY

        def do() -> None:
            parent, name = self.resolve(path)
            self.store.rmdir(parent, name)

        if not self.attempt(do, want):
            del self.tree[path]

    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        src, dst = self.pick(data), data.draw(paths)
        want = self.parent_errno(src)
        node = self.tree.get(src, "missing")
        if not want and node == "missing":
            want = errno.ENOENT
        if not want:
            want = self.parent_errno(dst)
        target = self.tree.get(dst, "missing")
        if not want and src != dst:
            is_dir = node is None
            if is_dir and dst[: len(src)] == src:
                want = errno.EINVAL
            elif target != "missing":
                if is_dir and target is not None:
                    want = errno.ENOTDIR
                elif not is_dir and target is None:
                    want = errno.EISDIR
                elif target is None and self.children(dst):
                    want = errno.ENOTEMPTY

        def do() -> None:
            parent, name = self.resolve(src)
            self.store.lookup(parent, name)
            new_parent, new_name = self.resolve(dst)
            self.store.rename(parent, name, new_parent, new_name)

        if not self.attempt(do, want) and src != dst:
            moved = {p: v for p, v in self.tree.items() if p[: len(src)] == src}
            for p in list(self.tree):
                if p[: len(dst)] == dst or p in moved:
                    del self.tree[p]
            for p, v in moved.items():
                self.tree[dst + p[len(src) :]] = v

    def _resize_errno(self, path: tuple[str, ...], new_pages: int) -> tuple[int, bool]:
        """(errno the model demands, whether ENOSPC from a full extent table is possible)."""
        want = self.parent_errno(path)
        node = self.tree.get(path, "missing")
        if not want:
            want = errno.ENOENT if node == "missing" else errno.EISDIR if node is None else 0
        if want:
            return want, False
        grow = new_pages - _pages(len(node))
        if grow > self.free_pages():
            return errno.ENOSPC, False
        # each new run may need a record of its own; fewer free records than
        # new pages means the allocator's layout decides
        return 0, grow > 0 and self.extent_records_free() < grow

    @rule(data=st.data(), size=sizes)
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = self.pick(data, "file")
        want, may = self._resize_errno(path, _pages(size))
        if not self.attempt(lambda: self.store.truncate(self.ino(path), size), want, may):
            f = self.tree[path]
            del f[size:]
            f.extend(bytes(size - len(f)))

    @rule(draw=st.data(), offset=st.integers(0, 8 * PS), data=st.binary(min_size=1, max_size=2 * PS + 3))
    def write(self, draw: st.DataObject, offset: int, data: bytes) -> None:
        path = self.pick(draw, "file")
        node = self.tree.get(path)
        end = offset + len(data)
        new_pages = max(_pages(end), _pages(len(node))) if isinstance(node, bytearray) else 0
        want, may = self._resize_errno(path, new_pages)
        if not self.attempt(lambda: self.store.write(self.ino(path), offset, data), want, may):
            f = self.tree[path]
            if end > len(f):
                f.extend(bytes(end - len(f)))
            f[offset:end] = data

    @rule(data=st.data(), offset=st.integers(0, 10 * PS), length=st.integers(0, 3 * PS))
    def read(self, data: st.DataObject, offset: int, length: int) -> None:
        path = self.pick(data, "file")
        node = self.tree.get(path)
        if not isinstance(node, bytearray):
            return
        assert self.store.read(self.ino(path), offset, length) == bytes(node[offset : offset + length])

    @precondition(lambda self: self.orphans)
    @rule(data=st.data())
    def release_orphan(self, data: st.DataObject) -> None:
        ino = data.draw(st.sampled_from(sorted(self.orphans)))
        assert self.store.read(ino, 0, len(self.orphans[ino])) == bytes(self.orphans[ino])
        self.store.release_orphan(ino)
        del self.orphans[ino]

    @rule()
    def reopen(self) -> None:
        gen = self.store.generation
        self.store.close()
        status, findings = check_image(self.tmp)
        assert status == 0, [str(f) for f in findings]
        self.store = Store.open(self.tmp)
        assert self.store.generation == gen + 1
        self.orphans.clear()  # freed by the open
        self.reopens += 1

    # ------------------------------------------------------------- invariants

    @invariant()
    def tree_and_bytes_match(self) -> None:
        if self.store is None:
            return
        found: dict[tuple[str, ...], bytes | None] = {}

        def walk(ino: int, prefix: tuple[str, ...]) -> None:
            for name, child in self.store.children(ino):
                p = prefix + (name.decode(),)
                a = self.store.getattr(child)
                if a.kind == fmt.KIND_DIR:
                    found[p] = None
                    walk(child, p)
                else:
                    assert a.npages == _pages(a.size)
                    found[p] = self.store.read(child, 0, a.size)

        walk(self.store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), ())
        want = {p: (None if v is None else bytes(v)) for p, v in self.tree.items()}
        assert found.keys() == want.keys()
        for p in want:
            assert found[p] == want[p], f"contents of {'/'.join(p)} differ"

    @invariant()
    def layouts_never_move(self) -> None:
        """Every page a file keeps stays at its physical page (a VMM and devices map it)."""
        if self.store is None:
            return
        now: dict[tuple[int, int], np.ndarray] = {}
        for ino in np.flatnonzero(self.store.inodes["kind"] == fmt.KIND_GUEST).tolist():
            ext = self.store.extents(ino)
            pages = [np.arange(e.page, e.page + e.length // PS) for e in ext]
            layout = np.concatenate(pages) if pages else np.zeros(0, np.int64)
            assert layout.size == self.store.getattr(ino).npages
            key = (ino, self.store.getattr(ino).igen)
            old = self.layouts.get(key)
            if old is not None:
                n = min(old.size, layout.size)
                assert np.array_equal(old[:n], layout[:n]), f"inode {ino} moved"
            now[key] = layout
        self.layouts = now

    @invariant()
    def statfs_matches(self) -> None:
        if self.store is None:
            return
        fs = self.store.statfs()
        assert fs.free_pages == self.free_pages()
        assert fs.free_inodes == INODES - 1 - (FIXED_INODES - 1) - self.used_inodes()


def _pages(nbytes: int) -> int:
    return -(-nbytes // PS)


_tmpdir = ""


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> None:
    global _tmpdir
    _tmpdir = str(tmp_path)


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreAgainstModel = StoreMachine.TestCase
