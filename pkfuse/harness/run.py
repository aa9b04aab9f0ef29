"""A whole restart test: per design, the cast up, N cycles, the end checks, the cast down.

For each flow (``persistent``, ``ephemeral`` or both, one after the other, each in its own
``workdir/FLOW``): mkfs, mount, the VMM, the device (when ``pkfuse device`` exists); the guest
runs a moment; then ``cycles`` restart cycles (``cycle.run_cycle``); then the end: the last VMM
stopped through its monitor (paused, saved), the guest verified once more and judged as the
last cycle's "after", the device stopped and its log read (the DMA of each live update, its
faults, the records stamped inside each blackout), a clean unmount, fsck. Whatever happens --
a check fails, a process does not do its part, Ctrl-C -- ``Cast.close`` ends every process the
test started and clears its mountpoint, and the report says what was reached.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backing.errors import PkfuseError
from pkfuse.uapi.client import parse_rid

from . import checks, kill
from .cast import RID, Cast, HarnessError
from .cycle import Cycle, Hooks, Successors, run_cycle
from .report import Report

MiB = 1 << 20


@dataclasses.dataclass
class Config:
    workdir: Path
    cycles: int = 2
    flows: tuple[str, ...] = ("persistent",)
    guest_size: int = 64 * MiB
    vcpus: int = 1
    engine: str = "auto"
    successors: str = Successors.PRESTARTED.value
    cancel_every: int = 0
    device: bool = True  #: run ``pkfuse device`` beside the VM (when it exists)
    settle: float = 0.5  #: seconds pre-started successors get before the freeze
    run_between: float = 0.2  #: seconds the guest runs between finish and the next prepare
    verify_ram: bool = True  #: after each finish, verify all of guest RAM at a pause (off the blackout)
    kill: str | None = None  #: ``--kill``: a phase of ``kill.KILL_PHASES`` or "random" (the jump lands there)
    seed: int | None = None  #: of the kills' instants (None: drawn, and recorded in the report)
    iommu_pgsize: str = "2M"  #: the VMMs' ``--iommu-pgsize``: "4K" maps guest RAM with 4 KiB leaves only
    dirty_share: float | None = None  #: the VMM's ``--dirty-share`` (None: its default)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["workdir"] = str(self.workdir)
        return d


def device_available() -> bool:
    """Whether this pkfuse has ``pkfuse device`` (``pkfuse.cli.device``)."""
    return importlib.util.find_spec("pkfuse.cli.device") is not None


def run(config: Config, *, hooks: Hooks | None = None, progress: Callable[[Cycle], None] | None = None) -> Report:
    """Every flow of ``config``; the report (``report.ok``: every check held). ``progress`` is called with
    each cycle once it is over (its checks made; its DMA counts come at the end of its flow)."""
    if config.kill is not None and config.seed is None:
        config.seed = random.SystemRandom().randrange(1 << 32)
    report = Report(config.as_dict())
    for flow in config.flows:
        cast = Cast(Path(config.workdir) / flow, domains=flow, guest_size=config.guest_size, vcpus=config.vcpus,
                    engine=config.engine, device=config.device and device_available(),
                    iommu_pgsize=config.iommu_pgsize, dirty_share=config.dirty_share)
        if config.device and not cast.device:
            report.device[flow] = {"skipped": "pkfuse device is not in this pkfuse: the cast runs without it"}
        elif not config.device:
            report.device[flow] = {"skipped": "no device asked for"}
        try:
            _run_flow(cast, config, report, flow, hooks, progress)
        except (HarnessError, PkfuseError, OSError) as exc:
            from pkfuse.cli.report import one_line

            where = f"cycle {report.cycles[-1].index} ({flow})" if report.cycles and \
                report.cycles[-1].flow == flow else f"{flow} run"
            report.aborted = f"{where}: {one_line(exc)}"
            if not isinstance(exc, HarnessError):  # not the cast's own words: say where it came from
                import traceback

                tb = traceback.extract_tb(exc.__traceback__)[-1]
                report.aborted += f" ({type(exc).__name__} at {Path(tb.filename).name}:{tb.lineno})"
        finally:
            left = cast.close()
            end = report.end.setdefault(flow, [])
            end.append(checks.Check("nothing left running or mounted", not left and not cast.mounted(),
                                    "; ".join(left) or "every process ended, mountpoint clear"))
        if report.aborted:
            break
    return report


def bring_up(cast: Cast, config: Config, end: list[checks.Check]) -> Any:
    """The cast up: mkfs, mount, the bystander file, the VMM, the device; the guest going; the baseline
    verdict over all of RAM (None without ``config.verify_ram``), which the first cycle continues from."""
    cast.mkfs()
    cast.wait_mount(cast.start_mount())
    cast.make_bystander()
    cast.start_vmm(cast.workdir / "vmm-0.mon")
    if cast.device:
        cast.start_device()
    assert cast.vmm_monitor is not None
    deadline = time.monotonic() + 30
    while min(cast.monitor_status(cast.vmm_monitor)["counters"]) < 1000:
        if time.monotonic() > deadline:
            raise HarnessError("the guest did not get going within 30 s")
        time.sleep(0.01)
    time.sleep(config.run_between)
    # the first cycle's baseline (a crash in its prepare has no freeze to go by)
    return _baseline(cast, end) if config.verify_ram else None


def _run_flow(cast: Cast, config: Config, report: Report, flow: str, hooks: Hooks | None,
              progress: Callable[[Cycle], None] | None) -> None:
    sid = parse_rid(RID)
    previous: Any = bring_up(cast, config, report.end.setdefault(flow, []))  #: the last verdict over all of RAM
    last: Cycle | None = None
    mine: list[Cycle] = []
    rng = random.Random(f"{config.seed}-{flow}")
    for i in range(1, config.cycles + 1):
        cycle = Cycle(i, flow, config.successors, cancel=bool(config.cancel_every) and i % config.cancel_every == 0)
        report.cycles.append(cycle)
        mine.append(cycle)
        plan = kill.choose(config.kill, rng, _spans(mine[:-1])) if config.kill is not None else None
        after = run_cycle(cast, cycle, previous, sid=sid, settle=config.settle, run_after=config.run_between,
                          verify_ram=config.verify_ram, hooks=hooks, kill=plan)
        previous = after if after is not None else previous
        last = cycle
        if progress is not None:
            progress(cycle)
        if cast.vmm is None:  # the successor did not survive: nothing left to cycle
            break
        time.sleep(config.run_between)
    tear_down(cast, report, flow, last, previous, mine)


def _baseline(cast: Cast, end: list[checks.Check]) -> Any:
    """All of guest RAM verified at a pause before the first cycle: what cycle 1 continues from."""
    v = checks.paused_verdict(cast)
    end.append(checks.check_guest_clean(v, "before the first cycle (all of RAM, paused)"))
    return v


def _spans(done: list[Cycle]) -> dict[str, float]:
    """Each phase's duration in the last cycle that was a whole live update (where a kill's delay is drawn)."""
    for c in reversed(done):
        e, b = c.edges, c.blackout()
        if c.kill.get("struck") or not b or "restore_end" not in e:
            continue
        return {"prepare": (e["prepare_end"] - e["prepare_start"]) / 1e9,
                "freeze": (e["freeze_end"] - e["freeze_start"]) / 1e9,
                "restore": (e["restore_end"] - e["restore_start"]) / 1e9,
                "retrieve": sum(b[k] for k in ("wait", "retrieve", "remap", "vm_create", "vcpu_restore")),
                "rebuild": c.timings.get("rebuild", 0.02), "finish": c.timings.get("finish", 0.01)}
    return {}


def tear_down(cast: Cast, report: Report, flow: str, last: Cycle | None, previous: Any, mine: list[Cycle]) -> None:
    """The end of a flow: the device stopped and its log judged per cycle, the last VMM stopped and the
    guest verified, a clean unmount, fsck (``report.end[flow]``)."""
    end = report.end.setdefault(flow, [])
    if cast.dev is not None:  # first: the VMM's stop releases its HWPT, and the device's context entry with it
        cast.stop(cast.dev)
        _device_report(cast, report, flow, mine)
    if cast.vmm is not None and cast.vmm_monitor is not None:
        cast.monitor(cast.vmm_monitor, "stop")  # pause, save, exit
        rc = cast.wait_exit(cast.vmm, 60, "the last VMM")
        end.append(checks.Check("last VMM stopped cleanly", rc == 0, f"exit status {rc}"))
        cast.vmm = None
        if last is not None:  # the guest as the last VMM left it, all of RAM, judged as the last cycle's
            final = checks.verdict(cast)
            last.bytes_verified += cast.guest_size
            last.add(checks.check_guest_clean(final, "at the final stop (all of RAM)"))
            if previous is not None or last.before is not None:
                last.add(checks.check_guest_continued(previous if previous is not None else last.before, final))
    cast.unmount()
    end.append(checks.check_fsck(cast))


def _device_report(cast: Cast, report: Report, flow: str, mine: list[Cycle]) -> None:
    import json

    from pkfuse.harness import device as device_mod

    entries = device_mod.read_log(cast.device_log)
    try:
        report.device[flow] = json.loads(cast.device_json.read_text())
    except (OSError, ValueError):
        report.device[flow] = device_mod.summarize(entries)
    blocked = np.zeros(entries.size, bool)  # the review's design after a crash: the device blocked, by rule
    for c in mine:
        if c.outcome == "unplanned crash" and c.flow == "ephemeral" and "vmm_ready" in c.edges:
            lo, hi = c.edges["killed_at"] - c.mono_offset, c.edges["vmm_ready"] - c.mono_offset + 50_000_000
            blocked |= (entries["time_ns"] >= lo) & (entries["time_ns"] <= hi)
    faults = int(((entries["fault"] != 0) & ~blocked).sum())
    report.end.setdefault(flow, []).append(checks.Check(
        "no DMA fault over the whole run", faults == 0,
        f"{faults} of {entries.size} DMAs faulted" + (f" ({int(blocked.sum())} in crashes' blocked windows "
                                                      "not counted)" if blocked.any() else "")))
    report.end[flow].append(checks.check_dma_reached_guest(cast, entries, "over the whole run"))
    for c in mine:
        e = c.edges
        if c.outcome == "unplanned crash":
            _crash_dma(cast, c, entries)
            continue
        if "prepare_start" not in e or "finish_end" not in e:
            continue
        lo, hi = e["prepare_start"] - c.mono_offset, e["finish_end"] - c.mono_offset
        w = entries[(entries["time_ns"] >= lo) & (entries["time_ns"] <= hi)]
        c.dma = {"dmas": int(w.size), "faults": int((w["fault"] != 0).sum())}
        c.add(checks.check_dma_faults(entries, lo, hi))
        c.add(checks.check_dma_reached_guest(cast, w, "in the live update"))
        if "paused" in e and "resumed" in e:
            b0, b1 = e["paused"] - c.mono_offset, e["resumed"] - c.mono_offset
            inb = entries[(entries["time_ns"] >= b0) & (entries["time_ns"] <= b1)]
            stamped = int(((inb["kind"] == device_mod.KIND_RECORDS_COUNT) & (inb["done"] == 1)).sum())
            c.dma.update(in_blackout=int(inb.size), records_in_blackout=stamped)
            c.add(checks.check_records_advanced(stamped))


def _crash_dma(cast: Cast, c: Cycle, entries: Any) -> None:
    """An unplanned crash's DMA: from the kill to the new VMM's attach pkernfs keeps translating (no
    fault), the review's design blocks the device (faults, counted); never a misdirected access; and
    none faults once the new VMM has attached (a 50 ms margin: a DMA in flight as it attached)."""
    e = c.edges
    kill_at, ready = e["killed_at"] - c.mono_offset, e["vmm_ready"] - c.mono_offset
    end = e.get("end", e["vmm_ready"]) - c.mono_offset
    crash = entries[(entries["time_ns"] >= kill_at) & (entries["time_ns"] <= ready)]
    faults = int((crash["fault"] != 0).sum())
    c.dma = {"dmas": int(crash.size), "faults": faults, "from_kill_to_new_vmm": int(crash.size)}
    c.add(checks.check_dma_reached_guest(cast, crash, "through the crash"))
    if c.flow == "persistent":
        c.add(checks.check_dma_faults(crash, kill_at, ready, "through the crash"))
    else:
        c.add(checks.Check("device blocked, not misdirected, until the new VMM attached", True,
                           f"{faults} of {crash.size} DMAs faulted between the kill and the new VMM"))
    c.add(checks.check_dma_faults(entries, ready + 50_000_000, end, "after the new VMM attached"))


__all__ = ["Config", "run", "device_available", "bring_up", "tear_down"]
