"""Kill-point testing of the store: SIGKILL a writer at random instants.

One *round*: a forked child opens the image and runs a seeded sequence of
random operations, writing the index and outcome of each one that returned
to a pipe. The parent kills it with SIGKILL after a random delay, reopens the
image (journal recovery), validates it, and compares what it finds with a
model that ran the same operations: every operation the child reported must
be there, and the one in flight must be wholly there or wholly absent. The
image carries over to the next round, so recovery runs on states that
earlier recoveries produced.

Two ways to choose the instant, mixed in one run (``step_fraction``):

* *timed*: the parent sleeps a random delay, then kills. Lands anywhere,
  also inside data stores, but mostly between transactions (a commit is a
  few microseconds of a round's milliseconds).
* *at a protocol step*: the child counts the journal's protocol steps
  (``Journal.step_hook``) and, at a randomly chosen one, stops itself with
  SIGSTOP; the parent sees it stopped and kills it with SIGKILL right there.
  Still a real SIGKILL of a real process, at an instant chosen to fall
  between "body written" and "applied" -- where replays happen.

Data writes are memory stores, not transactions: an in-flight write may
leave any mix of old and new bytes inside the file, and the comparison
allows exactly that, byte by byte, for that one operation.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import random
import signal
import struct
import time
import traceback
from collections.abc import Callable, Iterator

import numpy as np

from . import format as fmt
from .errors import StoreError
from .journal import Journal
from .store import Store, mkfs

PS = fmt.PAGE_SIZE
_DIRS = ("a", "b")
_FILES = ("f0", "f1", "f2", "f3")
_MAX_PAGES = 24
_BIG_PAGES = 2048  #: 8 MiB: a few such truncates fill the 16 MiB image (ENOSPC, 2 MiB chunks, many extents)
_IMAGE_SIZE = 16 << 20


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
            ("create", "mkdir", "rmdir", "unlink", "unlink_open", "truncate", "write", "rename", "chmod"),
            weights=(4, 1, 1, 2, 1, 4, 4, 2, 1),
        )[0]
        if kind in ("mkdir", "rmdir"):
            ops.append(Op(kind, rng.choice(_DIRS)))
        elif kind == "truncate":
            top = _BIG_PAGES if rng.random() < 0.25 else _MAX_PAGES
            ops.append(Op(kind, _random_path(rng), rng.randrange(0, top * PS + 1, rng.choice((1, PS)))))
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
    """Expected contents of /guest_mem: directories and files with their bytes and mode.

    ``free_pages`` is the pool's free pages, so that ENOSPC is predicted
    exactly; pages of files unlinked while open (``orphan_pages``) are not
    free until the next open frees them (``next_open``).
    """

    dirs: set[str] = dataclasses.field(default_factory=set)
    files: dict[str, bytearray] = dataclasses.field(default_factory=dict)
    modes: dict[str, int] = dataclasses.field(default_factory=dict)
    free_pages: int = 0
    orphan_pages: int = 0

    def copy(self) -> Model:
        return Model(set(self.dirs), {k: bytearray(v) for k, v in self.files.items()}, dict(self.modes),
                     self.free_pages, self.orphan_pages)

    def next_open(self) -> None:
        """A writer's open completed: the orphans are freed."""
        self.free_pages += self.orphan_pages
        self.orphan_pages = 0

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
        if op.name in ("unlink", "unlink_open"):  # an open file's pages linger until the next open
            if op.name == "unlink":
                self.free_pages += _pages(len(self.files[p]))
            else:
                self.orphan_pages += _pages(len(self.files[p]))
            del self.files[p], self.modes[p]
        elif op.name == "truncate":
            f = self.files[p]
            need = _pages(op.arg) - _pages(len(f))
            if need > self.free_pages:
                return errno.ENOSPC
            self.free_pages -= need
            del f[op.arg :]
            f.extend(bytes(op.arg - len(f)))
        elif op.name == "write":
            f = self.files[p]
            end = op.arg + len(op.data)
            if end > len(f):
                need = _pages(end) - _pages(len(f))
                if need > self.free_pages:
                    return errno.ENOSPC
                self.free_pages -= need
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
        if dst in self.files:  # replaced: freed
            self.free_pages += _pages(len(self.files[dst]))
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
        if op.name in ("mkdir", "rmdir", "create", "unlink", "unlink_open", "rename"):
            parent, name = _resolve(store, op.path)
            if op.name == "mkdir":
                store.mkdir(parent, name, 0o755, 0, 0)
            elif op.name == "rmdir":
                store.rmdir(parent, name)
            elif op.name == "create":
                store.create(parent, name, 0o644, 0, 0)
            elif op.name == "unlink":
                store.unlink(parent, name)
            elif op.name == "unlink_open":
                store.unlink(parent, name, keep_open=True)  # an orphan, freed at the next open
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
        g = np.frombuffer(got, np.uint8)
        before, after = (_padded(m.files.get(path, b""), g.size) for m in torn[1:])
        if not ((g == before) | (g == after)).all():
            return False
    return True


def _padded(data: bytes | bytearray, n: int) -> np.ndarray:
    out = np.zeros(n, np.uint8)
    m = min(n, len(data))
    out[:m] = np.frombuffer(data, np.uint8, m)
    return out


def _pages(nbytes: int) -> int:
    return -(-nbytes // PS)


@dataclasses.dataclass
class Stats:
    rounds: int = 0
    ops_completed: int = 0
    in_flight_present: int = 0
    in_flight_absent: int = 0
    recoveries: int = 0  #: rounds whose open replayed a committed transaction
    enospc: int = 0  #: completed operations refused with ENOSPC (as the model predicted)
    step_kills: int = 0  #: rounds killed at a chosen journal protocol step
    #: of those, how many stopped after each step kind (STEP_KINDS); the rest
    #: ran out of steps and finished
    kills_at: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0


class CrashCheckFailed(AssertionError):
    pass


def run_rounds(image: str, rounds: int, seed: int = 0, ops_per_round: int = 60,
               max_delay: float = 0.004, step_fraction: float = 0.5) -> Stats:
    """Run ``rounds`` kill points against a fresh image at ``image``; raise on any violation.

    A ``step_fraction`` of the rounds kill at a journal protocol step, the
    rest after a random delay of up to ``max_delay`` seconds.
    """
    from . import fsck

    g = mkfs(image, _IMAGE_SIZE, force=True)
    rng = random.Random(seed)
    model = Model(free_pages=g.npages - g.data_page - fmt.ROOT_PGTABLES_PAGES)
    stats = Stats()
    pending = False  #: the image holds a committed, unapplied transaction
    t0 = time.perf_counter()
    for r in range(rounds):
        ops = generate_ops(rng.randrange(1 << 30), ops_per_round)
        if rng.random() < step_fraction:
            # a step among the first ~5 per op: body, commit, apply:0.., applied;
            # if the last kill left a transaction to replay, often one of the
            # open's own steps (replay, then orphan freeing)
            stop_at = rng.randrange(8 if pending and rng.random() < 0.5 else 5 * ops_per_round)
            stats.step_kills += 1
        else:
            stop_at = -1
        done = list(_run_child(image, ops, rng.uniform(0, max_delay), stop_at, stats.kills_at))
        model.next_open()  # if the child's open was cut short, no op ran and the next open frees them
        for i, (idx, result) in enumerate(done):
            want = model.apply(ops[idx]) if idx == i else -1
            if want != result:
                raise CrashCheckFailed(f"round {r}: op {idx} {ops[idx]} gave {result}, model says {want}")
            stats.enospc += result == errno.ENOSPC
        status, findings = fsck.check_image(image)
        if status != 0:
            raise CrashCheckFailed(f"round {r}: fsck after kill: " + "; ".join(map(str, findings[:5])))
        # read-only: recovery in private memory, so the next child's open
        # replays for real (and can be killed while it does)
        with Store.open(image, read_only=True) as store:
            pending = store.journal_recovered
            stats.recoveries += pending
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


STEP_KINDS = ("body", "commit", "apply", "applied", "recover", "recovered")  #: Stats.kills_at keys
_STEP_MARK = 0xFFFF  #: op index of the pipe record that names the step a child stopped at


def _stop_at_step(n: int, wfd: int) -> Callable[[str], None]:
    """A journal step hook that stops this process (SIGSTOP) at its ``n``-th protocol step."""
    count = 0

    def hook(step: str) -> None:
        nonlocal count
        if count == n:
            os.write(wfd, struct.pack("<HH", _STEP_MARK, STEP_KINDS.index(step.split(":")[0])))
            os.kill(os.getpid(), signal.SIGSTOP)  # the parent SIGKILLs us here
        count += 1

    return hook


def _run_child(image: str, ops: list[Op], delay: float, stop_at: int = -1,
               kills_at: collections.Counter[str] | None = None) -> Iterator[tuple[int, int]]:
    """Fork a writer, SIGKILL it, yield (op index, errno) of each op it reported done.

    The kill comes after ``delay`` seconds, or, if ``stop_at >= 0``, when the
    child stops itself at that journal protocol step (or exits first); the
    step's kind is counted in ``kills_at``.
    """
    if kills_at is None:
        kills_at = collections.Counter()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's stack
        code = 0
        try:
            os.close(rfd)
            if stop_at >= 0:
                # count from the open on: its journal replay and orphan freeing are kill points too
                Journal.step_hook = staticmethod(_stop_at_step(stop_at, wfd))  # type: ignore[assignment]
                os.write(wfd, b"R")
            store = Store.open(image)
            if stop_at < 0:
                os.write(wfd, b"R")
            for i, op in enumerate(ops):
                os.write(wfd, struct.pack("<HH", i, perform(store, op)))
            store.close()
        except BaseException:
            traceback.print_exc()  # the parent sees the exit status and fails the run
            code = 1
        os._exit(code)
    os.close(wfd)
    reaped = False
    try:
        if os.read(rfd, 1) != b"R":  # wait until the child holds the image
            raise CrashCheckFailed("child failed to open the image (traceback on stderr)")
        if stop_at >= 0:
            _, status = os.waitpid(pid, os.WUNTRACED)  # stopped at the step, or exited
            if os.WIFSTOPPED(status):
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
        else:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        reaped = True
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            raise CrashCheckFailed(f"writer child failed with status {os.WEXITSTATUS(status)} (traceback on stderr)")
        buf = b""
        while chunk := os.read(rfd, 65536):
            buf += chunk
    finally:
        os.close(rfd)
        if not reaped:  # never leave a writer running (or a zombie) behind a failure
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    for off in range(0, len(buf) - len(buf) % 4, 4):
        idx, result = struct.unpack_from("<HH", buf, off)
        if idx == _STEP_MARK:
            kills_at[STEP_KINDS[result]] += 1
        else:
            yield idx, result
