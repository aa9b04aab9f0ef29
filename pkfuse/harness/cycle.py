"""One restart cycle: LUO's phases around a running VM, a CLOCK_REALTIME timestamp at each edge.

The phases (``Phase``, named as LUO names them), in order:

1. ``prepare`` -- the VMM's monitor ``prepare vm0``: a session preserving guest RAM, the vCPU
   handover file and the HWPT with its device; the VM runs on. With ``--successors prestarted``
   the successors are started first, as cpr-transfer starts its successor before the switch: the
   new VMM (``pkfuse vmm run --incoming vm0 MNT``) waiting for a daemon offering the session, and
   the new daemon (``pkfuse mount --wait``) waiting for the image's lock and the mountpoint;
2. ``freeze`` -- monitor ``freeze``: the vCPUs paused at an instruction boundary and saved into
   the handover file, then ``reboot()``. The blackout starts at the pause (the handover's
   ``saved_ns``);
3. ``jump`` -- the kexec (``jump``, one function: the seam where a kill at another instant will
   go): SIGKILL of the daemon and of the old VMM, then the dead FUSE mount cleared;
4. ``restore`` -- a new daemon mounts the image: it validates ``iommu/lu-state``, and, with
   ``--domains ephemeral``, its open fills the ephemeral memory with poison (the old tables are
   gone; the device runs on the saved copy in the image);
5. ``retrieve`` -- the successor VMM retrieves the session, maps guest RAM, creates the VM,
   restores and resumes the vCPUs: the blackout ends;
6. ``rebuild`` -- IOAS and HWPT again, the guest running: the daemon adopts the preserved domain
   (persistent) or replaces the saved copy (ephemeral);
7. ``finish`` -- the session finished; the successor serves its monitor and becomes the VMM of the
   next cycle.

``cancel`` (every ``--cancel-every`` cycles, before the live update): a prepare, then monitor
``cancel``; everything must be as it was.

Guest RAM is read in place, from a read-only mapping of the image at the guest file's extents
(``Cast.guest_view``), never through the mount: between the freeze and the new mount no daemon
answers. Inside the blackout the harness reads only what is small -- the guest's state, its
rings, the device's records (``verify(dirty=False)``, milliseconds); the dirty areas, the bulk
of RAM, are checked by the guest itself, which checks each page still holds the last pass
before it rewrites it (ERROR_LOST), and, after finish, by the verifier over all of RAM with the
vCPUs paused (monitor ``pause`` / ``continue``: a pause of the guest, not a live update). So
every byte written before the jump is checked without the harness's reading in the blackout.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backing.errors import PkfuseError
from pkfuse.vmm import handover, verify

from . import checks
from .cast import GUEST, Cast, HarnessError, Proc, pid_alive, realtime_ns
from .kill import Killed, Killer, KillPlan, clear_after_kill, session_offered


class Phase(str, enum.Enum):
    """LUO's phases, as the report names them (and, next, where ``--kill PHASE`` will land)."""

    PREPARE = "prepare"
    FREEZE = "freeze"
    JUMP = "jump"
    RESTORE = "restore"
    RETRIEVE = "retrieve"
    REBUILD = "rebuild"
    FINISH = "finish"
    CANCEL = "cancel"


class Successors(str, enum.Enum):
    PRESTARTED = "prestarted"
    COLD = "cold"


#: the blackout's parts, in order: ``snapshot`` is the harness's own (its verdict over the guest's state,
#: rings and records, in place; a real kexec does not pay it); ``mount`` ends when the harness sees
#: ``pkfuse mount`` return or the successor begins to retrieve, whichever is first; ``wait`` is from then to
#: the retrieve
BLACKOUT_PARTS = ("freeze", "snapshot", "jump", "mount", "wait", "retrieve", "remap", "vm_create", "vcpu_restore")


@dataclasses.dataclass
class Hooks:
    """Where a test reaches into a cycle. ``before_jump`` runs after the freeze and its checks, the vCPUs
    paused and no byte of the old kernel touched yet (a corruption there must be found after finish)."""

    before_jump: Callable[[Cast, Cycle], None] | None = None


@dataclasses.dataclass
class Cycle:
    """One cycle's record: its edges (CLOCK_REALTIME ns), the successor's timings, the checks."""

    index: int
    flow: str
    successors: str
    cancel: bool = False
    edges: dict[str, int] = dataclasses.field(default_factory=dict)
    mono_offset: int = 0  #: CLOCK_REALTIME - CLOCK_MONOTONIC when the cycle began (the device log's clock)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  #: the successor's, seconds
    freeze_timings: dict[str, float] = dataclasses.field(default_factory=dict)  #: the old VMM's, seconds
    checks: list[checks.Check] = dataclasses.field(default_factory=list)
    bytes_verified: int = 0
    dma: dict[str, Any] = dataclasses.field(default_factory=dict)
    before: verify.Verdict | None = None  #: the guest after the freeze
    successor: Proc | None = None
    monitor: str = ""
    kill: dict[str, Any] = dataclasses.field(default_factory=dict)  #: --kill: the plan, where it struck, outcome
    outcome: str = "live update"  #: or "unplanned crash" (a kill before the freeze committed, or after finish)
    gone: str = ""  #: the successor resumed, then ended: why
    engine: str = ""  #: the successor VMM's engine ("kvm", "unicorn"), from its status

    def mark(self, edge: str) -> int:
        self.edges[edge] = t = realtime_ns()
        return t

    def add(self, *found: checks.Check) -> None:
        self.checks.extend(found)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[checks.Check]:
        return [c for c in self.checks if not c.ok]

    def blackout(self) -> dict[str, float]:
        """The blackout (vCPUs paused -> resumed) and its parts, in seconds."""
        t, e = self.timings, self.edges
        if "paused" not in e or "resumed" not in e:
            return {}
        total = (e["resumed"] - e["paused"]) / 1e9
        inner = {k: float(t.get(k, 0.0)) for k in ("retrieve", "remap", "vm_create", "vcpu_restore")}
        retrieving = e["resumed"] - int(sum(inner.values()) * 1e9)  # the successor's retrieve began
        answered = min(e["restore_end"], retrieving)  # seen by the harness, or by the successor first
        parts = {"freeze": (e["freeze_end"] - e["paused"]) / 1e9,
                 "snapshot": (e["jump_start"] - e["freeze_end"]) / 1e9,
                 "jump": (e["jump_end"] - e["jump_start"]) / 1e9, "mount": (answered - e["jump_end"]) / 1e9,
                 "wait": (retrieving - answered) / 1e9}
        parts.update(inner)
        return {"total": total, "without_snapshot": total - parts["snapshot"], **{k: parts[k] for k in BLACKOUT_PARTS}}

    def as_dict(self) -> dict[str, Any]:
        return {"cycle": self.index, "flow": self.flow, "successors": self.successors, "cancel": self.cancel,
                "engine": self.engine, "ok": self.ok, "outcome": self.outcome, "kill": dict(self.kill), "edges_ns": dict(self.edges), "blackout_s": self.blackout(),
                "off_blackout_s": {k: self.timings.get(k) for k in ("rebuild", "finish")},
                "freeze_s": dict(self.freeze_timings), "successor_timings_s": dict(self.timings),
                "bytes_verified": self.bytes_verified, "dma": dict(self.dma),
                "checks": [c.as_dict() for c in self.checks]}


def jump(cast: Cast, cycle: Cycle) -> None:
    """The kexec: SIGKILL the daemon and the old VMM at this instant, then clear the dead mount.

    One function on purpose: a kill at a random instant of another phase (``--kill``, next) is
    this, called from inside that phase instead of after the freeze."""
    cycle.mark("jump_start")
    victims = [p for p in (cast.daemon, cast.vmm) if p is not None]
    for p in victims:  # both signals first, so neither outlives the other by a wait
        if p.alive():
            try:
                if p.popen is not None:
                    p.popen.send_signal(signal.SIGKILL)
                elif cast._is_ours(p.pid):
                    os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in victims:
        cast.kill(p)  # waits until it is gone
    cycle.mark("killed")
    cast.clear_mount()
    cycle.mark("jump_end")
    cast.vmm = None


def _settle(seconds: float, *procs: Proc) -> None:
    """Let pre-started successors get through their interpreter's start (they give no signal)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise HarnessError(f"the pre-started {p.name} exited early: {p.popen.returncode if p.popen else '?'}")
        time.sleep(0.01)


def cancel_round(cast: Cast, cycle: Cycle, sid: int) -> None:
    """A prepare that is cancelled: the session gone, domains and translations as they were, VM running."""
    assert cast.vmm_monitor is not None
    domains = checks.domain_lines(cast)
    t_before = checks.translations(cast, sid)
    steps = cast.monitor_status(cast.vmm_monitor)["counters"]
    cycle.mark("cancel_start")
    cast.monitor(cast.vmm_monitor, "prepare", GUEST)
    cast.monitor(cast.vmm_monitor, "cancel")
    cycle.mark("cancel_end")
    cycle.add(*checks.check_cancel(cast, domains, t_before, checks.translations(cast, sid)))
    time.sleep(0.05)
    now = cast.monitor_status(cast.vmm_monitor)["counters"]
    cycle.add(checks.Check("cancel: the VM ran on", all(n > s for n, s in zip(now, steps)),
                           f"counters {steps} -> {now}"))


def run_cycle(cast: Cast, cycle: Cycle, previous: verify.Verdict | None, *, sid: int, settle: float = 0.5,
              run_before_freeze: float = 0.2, run_after: float = 0.2, verify_ram: bool = True,
              hooks: Hooks | None = None, kill: KillPlan | None = None) -> verify.Verdict | None:
    """Play one cycle on ``cast`` (a VMM running, its monitor ``cast.vmm_monitor``); return the guest's
    verdict after finish (the whole of RAM, taken at a pause; None without ``verify_ram``), which the
    next cycle continues from. ``previous``: the last such verdict. ``kill``: the jump lands there
    instead (``pkfuse.harness.kill``), and the cycle is judged by what it turned out to be.

    Every check goes into ``cycle.checks``; a process that does not do its part is a HarnessError."""
    hooks = hooks or Hooks()
    assert cast.vmm_monitor is not None
    killer = Killer(cast, kill) if kill is not None else None
    cycle.mono_offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()
    cycle.mark("start")
    if cycle.cancel:
        cancel_round(cast, cycle, sid)
    pages_before = int(cast.status("pages_free"))
    mon2 = cast.workdir / f"vmm-{cycle.flow[0]}{cycle.index}.mon"
    js = cast.workdir / f"vmm-{cycle.flow[0]}{cycle.index}.json"
    t_before = boot_before = before = None
    status: dict[str, Any] = {}
    try:
        prestarted = cycle.successors == Successors.PRESTARTED
        new_mount = None
        if prestarted:  # cpr-transfer's order: the successors first, waiting
            cycle.successor = cast.start_successor(mon2, js)
            new_mount = cast.start_mount(wait=120.0)
            cycle.mark("successors_started")

        cycle.mark("prepare_start")
        _arm(killer, "prepare")
        _step(killer, cast.monitor, cast.vmm_monitor, "prepare", GUEST)
        cycle.mark("prepare_end")
        # where the device's DMA goes, walked before the freeze: a prepared session's mappings are fixed
        # (its IOAS frozen), so this is what the live update must keep, and the walk of every IOVA of a
        # large guest is not the blackout's
        t_before = checks.translations(cast, sid)
        boot_before = checks.ephemeral_boot(cast) if cycle.flow == "ephemeral" else None
        cycle.mark("walked")
        if prestarted:
            _step(killer, _settle, settle, cycle.successor, new_mount)
        time.sleep(run_before_freeze)

        _check(killer)
        cycle.mark("freeze_start")
        _arm(killer, "freeze")
        reply = _step(killer, cast.monitor, cast.vmm_monitor, "freeze")
        cycle.mark("freeze_end")
        cycle.freeze_timings = _json_tail(reply, "ok frozen ")

        # the guest as the freeze left it, in place: its state, rings and records (milliseconds; the dirty
        # areas are checked by the guest as it rewrites each page, and by the verdict after finish)
        before = verify.verify(cast.guest_view(), dirty=False)
        cycle.mark("copied")
        if hooks.before_jump is not None:
            hooks.before_jump(cast, cycle)
        _check(killer)

        jump(cast, cycle)

        cycle.mark("restore_start")
        _arm(killer, "restore")
        if prestarted:
            assert new_mount is not None
            deadline = time.monotonic() + 120
            while not _step(killer, cast.poll_mount, new_mount):
                if time.monotonic() > deadline:
                    raise HarnessError("the pre-started daemon did not mount within 120 s of the jump")
                time.sleep(0.0002)
            cycle.mark("restore_end")
        else:
            new_mount = cast.start_mount()
            _step(killer, cast.wait_mount, new_mount)
            cycle.mark("restore_end")
            cycle.successor = cast.start_successor(mon2, js)
        for phase in ("retrieve", "rebuild", "finish"):  # the successor's, from the mount on
            _arm(killer, phase)
        assert cycle.successor is not None
        status = _successor_up(cast, cycle, killer, mon2, js)
        if killer is not None:
            time.sleep(0.001)  # a kill due at this instant
            killer.cancel()
            killer.check()
    except Killed:
        assert killer is not None
        return _after_kill(cast, cycle, killer, previous, before, t_before, boot_before, pages_before, sid=sid,
                           verify_ram=verify_ram, run_after=run_after, mon2=mon2, js=js)
    finally:
        if killer is not None:
            killer.cancel()
            cycle.kill = {**kill.as_dict(), "struck": killer.fired,  # type: ignore[union-attr]
                          **cycle.kill}
    assert before is not None and t_before is not None
    if killer is not None:
        cycle.kill["landed"] = "did not strike: the cycle was over first"
    _saved_blackout(cast, cycle)
    cycle.before = before
    cycle.add(checks.check_guest_clean(before, "after the freeze (state, rings, records)"))
    if previous is not None:
        cycle.add(checks.check_guest_continued(previous, before))
    cycle.add(checks.check_guest_running(before, status))  # first: the guest's own finding is the cause
    return _judge_live_update(cast, cycle, before, t_before, boot_before, pages_before, sid=sid,
                              verify_ram=verify_ram, run_after=run_after)


def _check(killer: Killer | None) -> None:
    """Between steps: ``Killed`` if the kill struck meanwhile."""
    if killer is not None:
        killer.check()


def _arm(killer: Killer | None, phase: str) -> None:
    if killer is not None:
        killer.arm(phase)


def _step(killer: Killer | None, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; a failure once the kill struck is ``Killed`` (what it cut), not the cast's fault."""
    try:
        result = fn(*args)
    except (HarnessError, PkfuseError, OSError) as exc:
        if killer is not None and killer.fired:
            raise Killed(str(exc)) from exc
        raise
    _check(killer)
    return result


def _successor_up(cast: Cast, cycle: Cycle, killer: Killer | None, mon2: Path, js: Path) -> dict[str, Any]:
    """Wait for the successor's monitor (it retrieved, resumed, rebuilt, finished); its status."""
    assert cycle.successor is not None
    try:
        status = _step(killer, cast.wait_monitor, cycle.successor, mon2, 120)
        cast.vmm, cast.vmm_monitor = cycle.successor, mon2
    except HarnessError as exc:
        status = _exited_status(cycle.successor, js)
        if status is None:
            raise
        # it resumed, then ended (every vCPU stopped): what it left in --json is judged, the run ends
        cycle.gone = str(exc)
        cast.vmm, cast.vmm_monitor = None, None
    cycle.mark("finish_end")
    cycle.monitor = str(mon2)
    cycle.timings = {k: float(v) for k, v in status.get("timings", {}).items()}
    cycle.engine = str(status.get("engine", ""))
    return status


def _saved_blackout(cast: Cast, cycle: Cycle) -> None:
    saved = _saved_ns(cast)
    cycle.edges["paused"] = saved
    cycle.edges["resumed"] = saved + int(cycle.timings.get("blackout", 0.0) * 1e9)


def _judge_live_update(cast: Cast, cycle: Cycle, before: verify.Verdict, t_before: checks.Translations,
                       boot_before: int | None, pages_before: int, *, sid: int, verify_ram: bool,
                       run_after: float, poisons: int = 1) -> verify.Verdict | None:
    """The checks of a live update, once the successor runs (``poisons``: restores since the jump)."""
    if cycle.gone:
        cycle.add(checks.Check("successor VMM running", False, cycle.gone))
    cycle.add(checks.check_session_finished(cast))
    if cycle.flow == "ephemeral":
        cycle.add(checks.check_ephemeral_poisoned(boot_before, checks.ephemeral_boot(cast), poisons))
    t_after = checks.translations(cast, sid)
    cycle.add(checks.check_translations_reach_guest(cast, t_before, "before the freeze"))
    cycle.add(checks.check_translations(t_before, t_after))
    cycle.add(*_after_grace(cast, cycle, pages_before))
    cycle.add(checks.check_bystander(cast))
    after = None
    if verify_ram and cast.vmm is not None:
        time.sleep(run_after)  # the guest runs on the successor: it rewrites pages, checking each first
        after = verify_paused(cast, cycle, "after finish")
        cycle.add(checks.check_guest_continued(before, after))
    cycle.mark("end")
    return after


def _after_kill(cast: Cast, cycle: Cycle, killer: Killer, previous: verify.Verdict | None,
                before: verify.Verdict | None, t_before: checks.Translations | None, boot_before: int | None,
                pages_before: int, *, sid: int, verify_ram: bool, run_after: float, mon2: Path,
                js: Path) -> verify.Verdict | None:
    """The machine after a kill at ``killer``'s instant: everything but the device ended, a new daemon
    mounts the image cold; then a live update (the session is offered: a successor retrieves it) or
    an unplanned crash (it is not: the guest cold-boots), each judged by its own rules."""
    killer.cancel()
    cycle.edges["killed_at"] = killer.fired_ns
    landed = _landed(cycle, killer.fired_ns)
    cycle.kill.update(landed=landed, killed=list(killer.killed))
    cycle.kill["ended_after"] = clear_after_kill(cast)
    cycle.mark("recover_start")
    cast.wait_mount(cast.start_mount(wait=30.0), timeout=120)  # a lock still held by a dying daemon: waited for
    cycle.mark("recover_mounted")
    e = cycle.edges  # the blackout's edges a kill cut short: the kill is the jump, the cold mount the restore
    e.setdefault("freeze_end", killer.fired_ns)
    e.setdefault("jump_start", max(killer.fired_ns, e["freeze_end"]))
    e.setdefault("jump_end", e["recover_start"])
    e["restore_end"] = e["recover_mounted"]
    if t_before is None:  # cut inside prepare, before its walk: what the device reached before is the rule
        t_before = checks.translations(cast, sid)
    if session_offered(cast):
        cycle.outcome = "live update"
        cycle.kill["outcome"] = "the freeze had committed: the new daemon offers the session, a successor takes it"
        cycle.successor = cast.start_successor(mon2, js)
        status = _successor_up(cast, cycle, None, mon2, js)
        if cycle.timings.get("rebooted"):
            cycle.kill["outcome"] += ("; an earlier successor had resumed the vCPUs and died before finish: "
                                      "their state was stale, the VM booted again over its RAM")
        _saved_blackout(cast, cycle)
        base = before if before is not None else previous
        if before is not None:
            cycle.before = before
            cycle.add(checks.check_guest_clean(before, "after the freeze (state, rings, records)"))
        if previous is not None and before is not None:
            cycle.add(checks.check_guest_continued(previous, before))
        if base is not None:
            cycle.add(checks.check_guest_running(base, status))
        poisons = 1 + (landed in ("restore", "retrieve", "rebuild", "finish"))
        if base is None:
            base = verify.verify(cast.guest_view(), dirty=False)
        return _judge_live_update(cast, cycle, base, t_before, boot_before, pages_before, sid=sid,
                                  verify_ram=verify_ram, run_after=run_after, poisons=poisons)
    cycle.outcome = "unplanned crash"
    cycle.kill["outcome"] = ("no committed freeze survives: the vCPUs' state is lost, the guest cold-boots "
                             "on its RAM")
    # what the device reaches now, between the kernels (no VMM): pkernfs kept it, the review's design blocks it
    t_between = checks.translations(cast, sid)
    cycle.mark("walked_between")
    cycle.add(checks.check_crash_translations(cycle.flow, t_before, t_between))
    cast.start_vmm(mon2, reboot=True)  # a cold boot on the same guest file: its RAM is all that is left of the guest
    cycle.mark("vmm_ready")
    cycle.monitor = str(mon2)
    status = cast.monitor_status(mon2)
    cycle.engine = str(status.get("engine", ""))
    base = previous if previous is not None else before
    cycle.add(checks.check_session_finished(cast, refused_ok=True))
    if base is not None:
        cycle.add(checks.check_guest_running(base, status, cold_boot=True))
    t_after = checks.translations(cast, sid)
    cycle.add(checks.check_translations_reach_guest(cast, t_after, "after the new VMM attached"))
    cycle.add(*_after_grace(cast, cycle, pages_before, saved_copy=cycle.flow == "ephemeral"))
    after = None
    if verify_ram:
        time.sleep(run_after)
        after = verify_paused(cast, cycle, "after the cold boot")
        if base is not None:
            cycle.add(checks.check_guest_continued(base, after))
    cycle.mark("end")
    return after


def _landed(cycle: Cycle, at_ns: int) -> str:
    """The phase the kill struck in, from the edges the harness saw before it."""
    e = cycle.edges
    order = [("prepare", "prepare_start"), ("freeze", "freeze_start"), ("jump", "jump_start"),
             ("restore", "restore_start"), ("retrieve", "restore_end")]
    landed = "before prepare"
    for phase, edge in order:
        if edge in e and e[edge] <= at_ns:
            landed = phase
    return landed  # after the mount, the successor's own phases: it was killed, it reported nothing


def verify_paused(cast: Cast, cycle: Cycle, when: str) -> verify.Verdict:
    """All of guest RAM verified at a pause (``checks.paused_verdict``), judged as ``cycle``'s."""
    cycle.mark("verify_start")
    v = checks.paused_verdict(cast)
    cycle.mark("verify_end")
    cycle.bytes_verified += cast.guest_size
    cycle.add(checks.check_guest_clean(v, f"{when} (all of RAM, paused)"))
    return v


def _after_grace(cast: Cast, cycle: Cycle, pages_before: int, *, saved_copy: bool | None = None) -> list[checks.Check]:
    """The saved copy gone and every page back, waited for: a replaced domain is freed once the
    IOMMU's grace period after its last detach has passed (``backing.iommu.FREE_GRACE_S``)."""
    from backing.iommu import FREE_GRACE_S

    deadline = time.monotonic() + FREE_GRACE_S + 3.0
    while True:
        saved = checks.check_no_saved_copy(cast)
        pages = checks.check_pages(pages_before, int(cast.status("pages_free")))
        if (saved.ok and pages.ok) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    cycle.mark("freed")
    since = cycle.edges.get("finish_end", cycle.edges.get("vmm_ready", cycle.edges["freed"]))
    took = (cycle.edges["freed"] - since) / 1e9
    if saved.ok:
        saved.detail += f" ({took:.2f} s after {'finish' if 'finish_end' in cycle.edges else 'the new VMM'})"
    return [saved, pages] if (cycle.flow == "ephemeral" if saved_copy is None else saved_copy) else [pages]


def _exited_status(p: Proc, js: os.PathLike[str]) -> dict[str, Any] | None:
    """The ``--json`` an exited successor wrote (its ``describe()``), None if it is running or wrote none."""
    import json

    if p.alive():
        return None
    try:
        with open(js) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_tail(reply: str, prefix: str) -> dict[str, float]:
    import json

    try:
        return {k: float(v) for k, v in json.loads(reply[len(prefix):]).items()}
    except (ValueError, AttributeError):
        return {}


def _saved_ns(cast: Cast) -> int:
    """When the old VMM paused its vCPUs: the handover record's ``saved_ns``."""
    fd = os.open(str(cast.guest) + ".vmstate", os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = handover.read(fd, "the handover file")
    finally:
        os.close(fd)
    if h is None:
        raise HarnessError("the handover file holds no saved state after the freeze")
    return int(h.saved_ns)


__all__ = ["Phase", "Successors", "Hooks", "Cycle", "BLACKOUT_PARTS", "jump", "run_cycle", "cancel_round",
           "pid_alive"]
