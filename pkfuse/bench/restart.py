"""``pkfuse bench --only restart``: the blackout of a live update, issue 13's numbers, in one run.

Each row is a whole restart test (``pkfuse.harness.run.run`` of a ``Config``): an image, its
daemon, a VM on KVM (Unicorn where ``/dev/kvm`` does not open) with 2 vCPUs, and its DMA device
(``pkfuse device --records`` at 2,000 DMA/s through the IOMMU), then ``--restart-cycles`` (5) live
updates, every one checked as ``pkfuse restart-test`` checks it, then the end checks (fsck). Rows,
for each design (persistent: pkernfs, the domains in the image; ephemeral: the review's, the
domains in host RAM and a saved copy made at the freeze):

- **2 MiB maps, successors pre-started** -- guest RAM in the device's IOAS with superpages
  wherever it is aligned for them (the VMM's default), the new daemon and VMM started before the
  prepare as cpr-transfer does. Target: blackout < 100 ms;
- **2 MiB maps, cold** -- the successors started after the jump: their interpreters' start is in
  the blackout. A figure;
- **4 KiB maps, successors pre-started** -- ``pkfuse vmm run --iommu-pgsize 4K``: the IOAS's huge
  pages off (IOMMU_OPTION_HUGE_PAGES 0, before guest RAM is mapped), so the domain holds one leaf
  per 4 KiB page (4M of them for 16 GiB; checked by walking the tables after every cycle,
  ``tables.device_leaves``). Target: blackout < 1 s.

Per row: the blackout's median (from the handover's ``saved_ns`` to the successor's resume) and
its parts' medians (freeze, jump, mount, wait, retrieve, remap, VM create, vCPU restore); the
harness's own copy of guest RAM before the jump (``snapshot``, where the harness has one) is not
a kexec's and is left out of the value, given in the detail; the DMA the device made inside each
blackout (target: some in every one); its faults from prepare to finish (target 0); every
check held.

The Python start-up floor, measured in the same run before the rows: a bare interpreter
(``python -c pass``), the same with the modules the successor VMM and the daemon import before
their first useful instruction, and the FUSE mount call alone (``pyfuse3.init`` of an empty file
system). Each row says how much of its blackout is that floor -- what an in-kernel version would
not pay: cold, both successors' starts and the mount call; pre-started, the mount call.

Sizes: ``--restart-guest-size`` (default 16G; 256M with ``--quick``); the guest dirties
``--restart-dirty-share`` of its RAM (default: 0.5 up to 1 GiB, then 1 GiB's worth, so that a
16 GiB guest keeps 1 GiB of page cache dirty, not 8; the row says which). Each row's work
directory is removed after it: a 16 GiB guest's image is a sparse ~18 GiB file.

This area is not in ``pkfuse bench``'s default run (a 16 GiB row set takes minutes and starts
VMs): ``--only restart`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import Report

MiB = 1 << 20
GiB = 1 << 30
DESIGNS = ("persistent", "ephemeral")
DEVICE_SID = (0 << 8) | (3 << 3) | 0  #: 00:03.0, the VMM's device
FLOOR_ROUNDS = 5
#: the blackout's parts the harness reports, in order, that a kexec pays (``snapshot`` is the harness's own)
PARTS = ("freeze", "jump", "mount", "wait", "retrieve", "remap", "vm_create", "vcpu_restore")
PART_NAMES = {"vm_create": "VM create", "vcpu_restore": "vCPU restore"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a design: the IOAS's leaves, when the successors start, the blackout's target (ms)."""

    key: str
    label: str
    pgsize: str  #: ``--iommu-pgsize``
    successors: str  #: ``Successors``' value
    target_ms: float | None


VARIANTS = (
    Variant("2m-pre", "2 MiB maps, pre-started", "2M", "prestarted", 100.0),
    Variant("2m-cold", "2 MiB maps, cold", "2M", "cold", None),
    Variant("4k-pre", "4 KiB maps, pre-started", "4K", "prestarted", 1000.0),
)


# ------------------------------------------------------------------ the Python start-up floor


@dataclasses.dataclass
class Floor:
    """Seconds, best of a few: interpreter start, + the successor VMM's imports, + the daemon's, the mount call."""

    interpreter: float
    vmm_imports: float
    daemon_imports: float
    fuse_mount: float

    def in_blackout(self, successors: str) -> float:
        """The part of a blackout that is the floor: cold, both successors start (one after the other,
        as the harness starts them) and the daemon mounts; pre-started, the mount call alone."""
        if successors == "cold":
            return self.vmm_imports + self.daemon_imports + self.fuse_mount
        return self.fuse_mount


#: what each successor imports before its first useful instruction (``python -m pkfuse ...``)
VMM_IMPORTS = "import pkfuse.cli.entry, pkfuse.cli.vmm, pkfuse.vmm.vmm, pkfuse.vmm.vm, pkfuse.vmm.cpustate"
DAEMON_IMPORTS = ("import pkfuse.cli.entry, pkfuse.cli.mount, pkfuse.daemon.serve, pkfuse.daemon.fs, "
                  "pkfuse.daemon.control, pyfuse3, trio, numpy, backing.store, backing.iommu")
_MOUNT_CALL = """
import sys, time, pyfuse3
ops = pyfuse3.Operations()
t = time.perf_counter()
pyfuse3.init(ops, sys.argv[1], {"fsname=pkfuse-floor", "default_permissions"})
print(time.perf_counter() - t, flush=True)
pyfuse3.close(unmount=True)
"""


def _run_seconds(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t


def _mount_call_seconds(mnt: str) -> float:
    r = subprocess.run([sys.executable, "-c", _MOUNT_CALL, mnt], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        subprocess.run(["fusermount3", "-u", "-z", "-q", mnt], capture_output=True, check=False)
        raise RuntimeError(f"pyfuse3.init of an empty file system failed: {r.stderr.strip().splitlines()[-1:]}")
    return float(r.stdout.split()[0])


def measure_floor(tmp: str, rounds: int = FLOOR_ROUNDS) -> Floor:
    """The floor's parts, each the best of ``rounds``, alternating (a slow spell hits all of them)."""
    mnt = os.path.join(tmp, "floor-mnt")
    os.makedirs(mnt, exist_ok=True)
    best = [float("inf")] * 4
    for _ in range(rounds):
        for i, fn in enumerate((lambda: _run_seconds("pass"), lambda: _run_seconds(VMM_IMPORTS),
                                lambda: _run_seconds(DAEMON_IMPORTS), lambda: _mount_call_seconds(mnt))):
            best[i] = min(best[i], fn())
    os.rmdir(mnt)
    return Floor(*best)


def floor_rows(report: Report, floor: Floor) -> None:
    report.add("Python floor: interpreter start (python -c pass)", floor.interpreter * 1e3, "ms",
               detail=f"{sys.executable}, best of {FLOOR_ROUNDS}")
    report.add("  successor VMM to its first instruction (imports)", floor.vmm_imports * 1e3, "ms",
               detail=f"a fresh interpreter: {VMM_IMPORTS.removeprefix('import ')}; best of {FLOOR_ROUNDS}")
    report.add("  daemon to its first instruction (imports)", floor.daemon_imports * 1e3, "ms",
               detail=f"a fresh interpreter: pyfuse3, trio, numpy, the daemon and backing; best of {FLOOR_ROUNDS}")
    report.add("  the FUSE mount call alone (pyfuse3.init)", floor.fuse_mount * 1e3, "ms",
               detail=f"an empty file system: fuse_session_new + mount; best of {FLOOR_ROUNDS}")


# ------------------------------------------------------------------ a row from a harness report


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def leaf_summary(sizes: list[np.ndarray]) -> tuple[float, str]:
    """(share of the walked IOVAs ending at a 4 KiB leaf, "N x 4 KiB, M x 2 MiB" of the last walk)."""
    if not sizes:
        return 0.0, "no walk"
    allof = np.concatenate(sizes)
    share = float((allof == 4096).sum()) / max(1, allof.size)
    last = sizes[-1]
    names = {4096: "4 KiB", 2 * MiB: "2 MiB", GiB: "1 GiB", 0: "faulted"}
    kinds = ", ".join(f"{int((last == k).sum())} x {names.get(int(k), str(k))}" for k in np.unique(last))
    return share, kinds


def row_results(hr: Any, design: str, variant: Variant, *, floor: Floor | None, what: str,
                leaves: list[np.ndarray] | None = None,
                mount: dict[str, float] | None = None) -> list[tuple[str, float, str, dict[str, Any]]]:
    """The bench's results for one harness report (``pkfuse.harness.report.Report``) of one design:
    (name, value, unit, ``Report.add``'s keywords) each."""
    cycles = [c for c in hr.cycles if c.flow == design]
    blackouts = [c.blackout() for c in cycles if c.blackout()]
    n = len(cycles)
    out: list[tuple[str, float, str, dict[str, Any]]] = []
    head = f"{design}, {variant.label}"
    error = hr.first_error()
    if not blackouts:
        out.append((f"blackout, {head}", 0.0, "ms", dict(
            below=variant.target_ms if variant.target_ms is not None else float("inf"),
            detail=f"no blackout measured: {error or 'no cycle ran'}")))
        out.append((f"  checks held, {head}", sum(c.ok for c in cycles), "cycles", dict(
            at_least=max(1, n), detail=error or "")))
        return out
    snap = [b.get("snapshot", 0.0) for b in blackouts]
    value = [b["total"] - b.get("snapshot", 0.0) for b in blackouts]
    # the parts' medians as the harness's report totals them (each part's own median over the cycles)
    per = hr.totals().get(design, {}).get("blackout_s", {})
    med = {p: (per[p]["median"] if p in per else _median([b.get(p, 0.0) for b in blackouts])) * 1e3 for p in PARTS}
    parts = ", ".join(f"{PART_NAMES.get(p, p)} {med[p]:.0f}" for p in PARTS)
    if mount:
        parts += " (mount: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in mount.items()) + ")"
    snap_note = (f"; the harness's snapshot {_median(snap) * 1e3:.0f} ms left out (with it "
                 f"{_median([b['total'] for b in blackouts]) * 1e3:.0f})" if any(snap) else "")
    kw: dict[str, Any] = dict(detail=f"median of {len(value)} ({min(value) * 1e3:.0f}-{max(value) * 1e3:.0f} ms): "
                                     f"{parts} ms{snap_note}; {what}")
    if variant.target_ms is not None:
        kw["below"] = variant.target_ms
    v_ms = _median(value) * 1e3
    out.append((f"blackout, {head}", v_ms, "ms", kw))
    if floor is not None:
        f_ms = floor.in_blackout(variant.successors) * 1e3
        which = ("both successors' starts (daemon, VMM: interpreter + imports) + the mount call"
                 if variant.successors == "cold" else "the FUSE mount call (the successors started before)")
        out.append((f"  of which the Python start-up floor, {head}", min(f_ms, v_ms), "ms", dict(
            detail=f"{which}: what an in-kernel version would not pay; the rest {max(0.0, v_ms - f_ms):.0f} ms")))
    in_b = [int(c.dma["in_blackout"]) for c in cycles if "in_blackout" in c.dma]
    recs = [int(c.dma.get("records_in_blackout", 0)) for c in cycles if "in_blackout" in c.dma]
    out.append((f"  DMAs served in each blackout, {head}", float(min(in_b)) if in_b else 0.0, "DMAs", dict(
        at_least=1, detail=(f"the fewest of {len(in_b)} blackouts; median {_median([float(x) for x in in_b]):.0f}, "
                            f"records stamped {sum(recs)}" if in_b else "no device log read: " + (error or "?")))))
    faults = sum(int(c.dma.get("faults", 0)) for c in cycles)
    dmas = sum(int(c.dma.get("dmas", 0)) for c in cycles)
    out.append((f"  DMA faults, prepare to finish, {head}", float(faults), "faults", dict(
        below=1, detail=f"in {dmas} DMAs over {n} live updates")))
    if leaves is not None:
        share, kinds = leaf_summary(leaves)
        if variant.pgsize == "4K":
            out.append((f"  IOVAs on 4 KiB leaves after each rebuild, {head}", share, "share", dict(
                at_least=1, detail=f"the device's tables walked after every cycle; last: {kinds}")))
        else:
            kw_note = f"; leaves after the last rebuild: {kinds}"
            out[0][3]["detail"] += kw_note
    out.append((f"  checks held, {head}", float(sum(c.ok for c in cycles)), "cycles", dict(
        at_least=max(1, n), detail=error or "every check of every cycle, and the end's (fsck)")))
    return out


# ------------------------------------------------------------------ the mount part, from the daemon's log

#: the daemon's log lines that mark the steps of a restore, in order (``pkfuse.daemon.serve``, ``backing.store``)
MOUNT_MARKS = (("opened", "state recovered"), ("restored", "live update: boot"), ("served", "control socket"))
MOUNT_STEPS = ("image opened", "IOMMU + sessions restored", "FUSE mount + socket", "seen")


def _log_times(text: str) -> list[tuple[int, str]]:
    """(CLOCK_REALTIME ns, message) of each line of a daemon log (``logs.py``'s format, local time, ms)."""
    out = []
    for line in text.splitlines():
        try:
            stamp, msecs = line[:23].split(",")
            t = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
            out.append((int(t * 1e9) + int(msecs) * 1_000_000, line[24:]))
        except ValueError:
            continue
    return out


def mount_steps(log_text: str, cycles: list[Any]) -> dict[str, float]:
    """The mount part of each cycle's blackout split at the new daemon's log lines, medians in seconds:
    until the image is opened (the lock noticed, fork, Store.open's replay; cold, also the interpreter's
    start), the IOMMU's tables and the sessions restored, the FUSE mount call and the control socket, and
    the rest (the ``pkfuse mount`` parent seeing the mount answer, the harness seeing it return). Lines are
    stamped to the millisecond: each step is +-1 ms."""
    lines = _log_times(log_text)
    per: dict[str, list[float]] = {k: [] for k in MOUNT_STEPS}
    for c in cycles:
        e = c.edges
        if "jump_end" not in e or not c.blackout():
            continue
        start = e["jump_end"]
        end = start + int(c.blackout()["mount"] * 1e9)
        at: dict[str, int] = {}
        for key, text in MOUNT_MARKS:
            hit = next((t for t, msg in lines if start - 1_000_000 <= t <= end + 1_000_000 and text in msg
                        and t >= at.get("opened", 0)), None)
            if hit is None:
                break
            at[key] = hit
        if len(at) != len(MOUNT_MARKS):
            continue
        edges = [start, at["opened"], at["restored"], at["served"], max(end, at["served"])]
        for k, a, b in zip(MOUNT_STEPS, edges, edges[1:]):
            per[k].append(max(0, b - a) / 1e9)
    return {k: _median(v) for k, v in per.items() if v}


# ------------------------------------------------------------------ running a row


def default_dirty_share(guest: int) -> float:
    """0.5, or 1 GiB's worth of a bigger guest (its dirty pages stay in the page cache, shared)."""
    return min(0.5, GiB / guest)


def iova_sample(guest: int) -> np.ndarray:
    """An IOVA in every 2 MiB of guest RAM, at a page inside it: the walk a leaf check makes."""
    base = np.arange(0, guest, 2 * MiB, dtype=np.uint64)
    return base + np.uint64(0x3000)


def run_row(report: Report, tmp: str, design: str, variant: Variant, *, guest: int, cycles: int,
            dirty_share: float, floor: Floor | None,
            progress: Callable[[str], None] | None = None) -> None:
    """One design's row: a restart test of ``cycles`` cycles, its results added to ``report``."""
    from pkfuse.harness import run as harness
    from pkfuse.harness.cycle import Cycle
    from pkfuse.harness.report import ms
    from pkfuse.harness.tables import device_leaves
    from pkfuse.vmm.engine import EngineError

    work = Path(tmp) / f"{design}-{variant.key}"
    config = harness.Config(work, cycles=cycles, flows=(design,), guest_size=guest, vcpus=2, engine="auto",
                            successors=variant.successors, iommu_pgsize=variant.pgsize, dirty_share=dirty_share)
    engine = "KVM" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "Unicorn"
    what = (f"{_size(guest)} guest, 2 vCPUs on {engine}, dirty share {dirty_share:g} "
            f"({_size(int(guest * dirty_share))} kept dirty), device at 2000 DMA/s")
    leaves: list[np.ndarray] = []
    sample = iova_sample(guest)
    image = work / design / "host.img"

    def after_cycle(cycle: Cycle) -> None:
        if progress is not None:
            verdict = "ok" if cycle.ok else f"FAILED: {cycle.failed()[0].name}"
            progress(f"cycle {cycle.index} {cycle.flow}: blackout {ms(cycle.blackout().get('total'))} ms, {verdict}")
        try:
            size, _fault = device_leaves(image, DEVICE_SID, sample)
            leaves.append(size)
        except (OSError, ValueError) as exc:  # a cast that is gone: the row's checks say why
            if progress is not None:
                progress(f"leaf walk: {exc}")

    try:
        hr = harness.run(config, progress=after_cycle)
        try:
            mount = mount_steps((work / design / "daemon.log").read_text(errors="replace"), hr.cycles)
        except OSError:
            mount = {}
    except (EngineError, RuntimeError) as exc:
        report.add(f"blackout, {design}, {variant.label}", 0.0, "ms", below=0.0, detail=f"did not run: {exc}")
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, value, unit, kw in row_results(hr, design, variant, floor=floor, what=what, leaves=leaves,
                                             mount=mount):
        report.add(name, value, unit, **kw)


def _size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def _parse_size(text: str) -> int:
    from backing.mkfs import parse_size

    return parse_size(text)


def run(report: Report, args: argparse.Namespace) -> None:
    from pkfuse.harness.run import device_available

    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        print("restart: skipped (no FUSE on this machine)", file=sys.stderr)
        return
    quick = bool(getattr(args, "quick", False))
    size_arg = getattr(args, "restart_guest_size", None)
    guest = _parse_size(size_arg) if size_arg else (256 * MiB if quick else 16 * GiB)
    cycles = getattr(args, "restart_cycles", None) or (1 if quick else 5)
    share = getattr(args, "restart_dirty_share", None)
    dirty = share if share is not None else default_dirty_share(guest)
    if not device_available():
        print("restart: no pkfuse device in this pkfuse: the rows have no DMA", file=sys.stderr)

    def progress(line: str) -> None:
        print(f"restart: {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="pkfuse-bench-restart-", dir=getattr(args, "dir", None)) as tmp:
        floor = measure_floor(tmp)
        floor_rows(report, floor)
        for variant in VARIANTS:
            for design in DESIGNS:
                run_row(report, tmp, design, variant, guest=guest, cycles=cycles, dirty_share=dirty, floor=floor,
                        progress=progress)
