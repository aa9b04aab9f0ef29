"""Kill-point testing of the store: SIGKILL a writer at random instants.

One *round*: a forked child opens the image and runs a seeded sequence of
random operations, writing the index and outcome of each one that returned
to a pipe. The parent kills it with SIGKILL after a random delay, reopens the
image (journal recovery), validates it, and compares what it finds with a
model that ran the same operations: every operation the child reported must
be there, and the one in flight must be wholly there or wholly absent. The
image carries over to the next round, so recovery runs on states that
earlier recoveries produced.

Data writes are memory stores, not transactions: an in-flight write may
leave any mix of old and new bytes inside the file, and the comparison
allows exactly that, byte by byte, for that one operation.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import struct
import time
from collections.abc import Iterator

from . import format as fmt
from .errors import StoreError
from .store import Store, mkfs

PS = fmt.PAGE_SIZE
_DIRS = ("a", "b")
_FILES = ("f0", "f1", "f2", "f3")
_MAX_PAGES = 24


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    path: str
    arg: int = 0
    path2: str = ""
    data: bytes = b""


def _random_path(rng: random.Random) -> str:
    d = rng.choice(("",) + _DIRS)
    return f"{d}/{rng.choice(_FILES)}" if d else rng.choice(_FILES)


def generate_ops(seed: int, count: int) -> list[Op]:
    """A reproducible list of operations over a small namespace, so that they collide."""
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        kind = rng.choices(
            ("create", "mkdir", "rmdir", "unlink", "truncate", "write", "rename", "chmod"),
            weights=(4, 1, 1, 2, 4, 4, 2, 1),
        )[0]
        if kind in ("mkdir", "rmdir"):
            ops.append(Op(kind, rng.choice(_DIRS)))
        elif kind == "truncate":
            ops.append(Op(kind, _random_path(rng), rng.randrange(0, _MAX_PAGES * PS + 1, rng.choice((1, PS)))))
        elif kind == "write":
            off = rng.randrange(0, _MAX_PAGES * PS)
            n = rng.randrange(1, 3 * PS)
            ops.append(Op(kind, _random_path(rng), off, data=rng.randbytes(n)))
        elif kind == "rename":
            src = rng.choice((_random_path(rng), rng.choice(_DIRS)))
            ops.append(Op(kind, src, path2=_random_path(rng) if "/" in src or src in _FILES else rng.choice(_DIRS)))
        elif kind == "chmod":
            ops.append(Op(kind, _random_path(rng), rng.randrange(0o1000)))
        else:
            ops.append(Op(kind, _random_path(rng)))
    return ops


# ---------------------------------------------------------------- the model


@dataclasses.dataclass
class Model:
    """Expected contents of /guest_mem: directories and files with their bytes and mode."""

    dirs: set[str] = dataclasses.field(default_factory=set)
    files: dict[str, bytearray] = dataclasses.field(default_factory=dict)
    modes: dict[str, int] = dataclasses.field(default_factory=dict)

    def copy(self) -> Model:
        return Model(set(self.dirs), {k: bytearray(v) for k, v in self.files.items()}, dict(self.modes))

    def _parent_ok(self, path: str) -> bool:
        return "/" not in path or path.split("/")[0] in self.dirs

    def apply(self, op: Op) -> int:
        """Perform ``op``; return the errno the store must give (0 for success)."""
        p = op.path
        if op.name == "mkdir":
            if p in self.dirs or p in self.files:
                return errno.EEXIST
            self.dirs.add(p)
            return 0
        if op.name == "rmdir":
            if p in self.files:
                return errno.ENOTDIR
            if p not in self.dirs:
                return errno.ENOENT
            if any(f.startswith(p + "/") for f in self.files):
                return errno.ENOTEMPTY
            self.dirs.remove(p)
            return 0
        if not self._parent_ok(p):
            return errno.ENOENT
        if op.name == "create":
            if p in self.files or p in self.dirs:
                return errno.EEXIST
            self.files[p] = bytearray()
            self.modes[p] = 0o644
            return 0
        if op.name == "rename":
            return self._rename(p, op.path2)
        if p not in self.files:
            return errno.ENOENT
        if op.name == "unlink":
            del self.files[p], self.modes[p]
        elif op.name == "truncate":
            f = self.files[p]
            f[:] = f[: op.arg] + bytes(max(0, op.arg - len(f)))
        elif op.name == "write":
            f = self.files[p]
            end = op.arg + len(op.data)
            if end > len(f):
                f.extend(bytes(end - len(f)))
            f[op.arg : end] = op.data
        elif op.name == "chmod":
            self.modes[p] = op.arg
        return 0

    def _rename(self, src: str, dst: str) -> int:
        is_dir = src in self.dirs
        if not is_dir and src not in self.files:
            return errno.ENOENT
        if not self._parent_ok(dst):
            return errno.ENOENT
        if src == dst:
            return 0
        if is_dir:
            if dst in self.files:
                return errno.ENOTDIR
            if dst in self.dirs and any(f.startswith(dst + "/") for f in self.files):
                return errno.ENOTEMPTY
            self.dirs.discard(dst)
            self.dirs.remove(src)
            self.dirs.add(dst)
            for f in [f for f in self.files if f.startswith(src + "/")]:
                new = dst + f[len(src) :]
                self.files[new] = self.files.pop(f)
                self.modes[new] = self.modes.pop(f)
            return 0
        if dst in self.dirs:
            return errno.EISDIR
        self.files[dst] = self.files.pop(src)
        self.modes[dst] = self.modes.pop(src)
        return 0


# ------------------------------------------------------------ the real thing


def _resolve(store: Store, path: str) -> tuple[int, bytes]:
    parent = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    parts = path.split("/")
    for part in parts[:-1]:
        parent = store.lookup(parent, part.encode())
    return parent, parts[-1].encode()


def perform(store: Store, op: Op) -> int:
    """Run ``op`` against the store; return 0 or the errno it refused with."""
    try:
        if op.name in ("mkdir", "rmdir", "create", "unlink", "rename"):
            parent, name = _resolve(store, op.path)
            if op.name == "mkdir":
                store.mkdir(parent, name, 0o755, 0, 0)
            elif op.name == "rmdir":
                store.rmdir(parent, name)
            elif op.name == "create":
                store.create(parent, name, 0o644, 0, 0)
            elif op.name == "unlink":
                store.unlink(parent, name)
            else:
                store.lookup(parent, name)  # source first, as rename(2) reports it
                new_parent, new_name = _resolve(store, op.path2)
                store.rename(parent, name, new_parent, new_name)
            return 0
        parent, name = _resolve(store, op.path)
        ino = store.lookup(parent, name)
        if op.name == "truncate":
            store.truncate(ino, op.arg)
        elif op.name == "write":
            store.write(ino, op.arg, op.data)
        elif op.name == "chmod":
            store.setattr(ino, mode=op.arg)
        return 0
    except StoreError as exc:
        return exc.errno


def snapshot(store: Store) -> Model:
    """What the store holds under /guest_mem, in the model's terms."""
    m = Model()
    root = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)

    def walk(ino: int, prefix: str) -> None:
        for name, child in store.children(ino):
            path = prefix + name.decode()
            attr = store.getattr(child)
            if attr.kind == fmt.KIND_DIR:
                m.dirs.add(path)
                walk(child, path + "/")
            else:
                m.files[path] = bytearray(store.read(child, 0, attr.size))
                m.modes[path] = attr.mode & 0o7777

    walk(root, "")
    return m


def _matches(found: Model, want: Model, torn: tuple[str, Model, Model] | None = None) -> bool:
    """``found`` equals ``want``, except that file ``torn[0]`` may mix bytes of two states.

    A data write is memory stores, not a transaction: while it is in flight
    each byte of the file is the byte before it or the byte it writes.
    """
    if found.dirs != want.dirs or found.modes != want.modes or found.files.keys() != want.files.keys():
        return False
    for path, data in want.files.items():
        got = found.files[path]
        if got == data:
            continue
        if torn is None or path != torn[0] or len(got) != len(data):
            return False
        before, after = torn[1].files.get(path, b""), torn[2].files.get(path, b"")
        for i, g in enumerate(got):  # small files: per-byte is fine here
            if g != (before[i] if i < len(before) else 0) and g != (after[i] if i < len(after) else 0):
                return False
    return True


@dataclasses.dataclass
class Stats:
    rounds: int = 0
    ops_completed: int = 0
    in_flight_present: int = 0
    in_flight_absent: int = 0
    recoveries: int = 0  #: rounds whose open replayed a committed transaction
    seconds: float = 0.0


class CrashCheckFailed(AssertionError):
    pass


def run_rounds(image: str, rounds: int, seed: int = 0, ops_per_round: int = 60,
               max_delay: float = 0.004) -> Stats:
    """Run ``rounds`` kill points against a fresh image at ``image``; raise on any violation."""
    from . import fsck

    mkfs(image, 16 << 20, force=True)
    rng = random.Random(seed)
    model = Model()
    stats = Stats()
    t0 = time.perf_counter()
    for r in range(rounds):
        ops = generate_ops(rng.randrange(1 << 30), ops_per_round)
        done = list(_run_child(image, ops, rng.uniform(0, max_delay)))
        for i, (idx, result) in enumerate(done):
            want = model.apply(ops[idx]) if idx == i else -1
            if want != result:
                raise CrashCheckFailed(f"round {r}: op {idx} {ops[idx]} gave {result}, model says {want}")
        status, findings = fsck.check_image(image)
        if status != 0:
            raise CrashCheckFailed(f"round {r}: fsck after kill: " + "; ".join(map(str, findings[:5])))
        with Store.open(image) as store:
            stats.recoveries += store.journal_recovered
            found = snapshot(store)
        k = len(done)
        if k < len(ops):
            after = model.copy()
            after.apply(ops[k])
            torn = (ops[k].path, model, after) if ops[k].name == "write" else None
            if _matches(found, model, torn):
                stats.in_flight_absent += 1
            elif _matches(found, after, torn):
                stats.in_flight_present += 1
                model = after
            else:
                raise CrashCheckFailed(f"round {r}: state after kill during op {k} {ops[k].name} "
                                       f"{ops[k].path!r} matches neither before nor after")
            if torn and ops[k].path in found.files:  # the mix of bytes is now the truth
                model.files[ops[k].path] = found.files[ops[k].path]
        elif not _matches(found, model):
            raise CrashCheckFailed(f"round {r}: completed round does not match the model")
        stats.rounds += 1
        stats.ops_completed += k
    stats.seconds = time.perf_counter() - t0
    return stats


def _run_child(image: str, ops: list[Op], delay: float) -> Iterator[tuple[int, int]]:
    """Fork a writer, SIGKILL it after ``delay`` seconds, yield (op index, errno) it reported."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's stack
        code = 0
        try:
            os.close(rfd)
            store = Store.open(image)
            os.write(wfd, b"R")
            for i, op in enumerate(ops):
                os.write(wfd, struct.pack("<HH", i, perform(store, op)))
            store.close()
        except BaseException:
            code = 1
        os._exit(code)
    os.close(wfd)
    try:
        if os.read(rfd, 1) != b"R":  # wait until the child holds the image
            raise CrashCheckFailed("child failed to open the image")
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        buf = b""
        while chunk := os.read(rfd, 65536):
            buf += chunk
    finally:
        os.close(rfd)
    for off in range(0, len(buf) - len(buf) % 4, 4):
        yield struct.unpack_from("<HH", buf, off)
