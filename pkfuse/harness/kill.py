"""``--kill PHASE|random``: the jump at another instant -- inside a phase, from a timer thread.

A ``KillPlan`` names the phase and the delay into it; a ``Killer`` armed at
the phase's first edge SIGKILLs, at that instant, everything of the cast but
the device: every process it started and every process whose command line
names its image (a daemon a ``pkfuse mount`` forked, even one not yet known
by pid: a restore cut in the middle). What the main thread was doing then
fails (a monitor call, a mount that exits -9, a successor gone): ``Killed``.

Then ``recover`` plays what a machine does after it: what is left is
ended, the dead mount cleared, a new daemon mounts the image cold. Whether
it was a live update is read off that daemon, not guessed: if it offers
the session ``vm0`` incoming, the freeze had committed (``reboot()``
returned, whether or not its reply reached the harness) and a successor
VMM retrieves it -- judged as every live update is. Otherwise it was an
unplanned crash: no vCPU state survives, the guest cold-boots on its RAM
(``pkfuse vmm run`` on the same guest file), and what must hold differs
by design: pkernfs keeps guest memory and DMA translation (the device's
context entry and domain are in the image: every IOVA still translates to
its guest page, no DMA faults, and the new VMM's attach replaces the left
domain hitlessly); the review's design loses the domain with host RAM, and
the new daemon must find the device's context entry pointing into
poisoned ephemeral memory and block it (every IOVA faults until the new
VMM attaches; faults, never a misdirected access). The report says which
it was for every cycle.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
from typing import Any

from .cast import GUEST, Cast, Proc, realtime_ns, start_time

#: where a kill may land, in order (``jump``: the planned instant, after the freeze)
KILL_PHASES = ("prepare", "freeze", "jump", "restore", "retrieve", "rebuild", "finish")
#: seconds each phase lasts before a run has measured it (64 MiB, KVM, here)
DEFAULT_SPAN = {"prepare": 0.01, "freeze": 0.02, "restore": 0.06, "retrieve": 0.04, "rebuild": 0.02,
                "finish": 0.01}


class Killed(Exception):
    """The main thread's step failed because the Killer fired (not a HarnessError: not the cast's fault)."""


@dataclasses.dataclass
class KillPlan:
    """SIGKILL ``delay`` seconds after ``phase``'s first edge (``jump``: the planned jump, no timer).
    ``retrieve``, ``rebuild`` and ``finish`` all start at the new daemon's mount (the successor runs
    them without an edge the harness sees): their delays include the phases before them."""

    phase: str
    delay: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "delay_s": self.delay}


def choose(spec: str, rng: random.Random, spans: dict[str, float]) -> KillPlan:
    """The plan for one cycle: ``spec`` a phase of KILL_PHASES or ``random`` (a phase drawn uniformly);
    the delay uniform over the phase's span (``spans``: measured by earlier cycles, else DEFAULT_SPAN)."""
    phase = rng.choice(KILL_PHASES) if spec == "random" else spec
    if phase not in KILL_PHASES:
        raise ValueError(f"--kill {spec}: one of {', '.join(KILL_PHASES)} or random")
    if phase == "jump":
        return KillPlan(phase)
    span = {k: spans.get(k, v) for k, v in DEFAULT_SPAN.items()}
    before = 0.0
    if phase in ("rebuild", "finish"):
        before += span["retrieve"]
    if phase == "finish":
        before += span["rebuild"]
    return KillPlan(phase, before + rng.uniform(0.0, span[phase]))


class Killer:
    """One cycle's kill: ``arm()`` at the plan's phase edge; ``fired_ns`` once it struck."""

    def __init__(self, cast: Cast, plan: KillPlan) -> None:
        self.cast = cast
        self.plan = plan
        self.fired_ns = 0
        self.killed: list[str] = []
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def fired(self) -> bool:
        return self.fired_ns != 0

    def arm(self, phase: str) -> None:
        """Start the timer if ``phase`` is the plan's (called at each phase's first edge)."""
        if phase != self.plan.phase or self._timer is not None or self.plan.phase == "jump":
            return
        self._timer = threading.Timer(self.plan.delay, self.fire)
        self._timer.daemon = True
        self._timer.start()

    def check(self) -> None:
        """Raise Killed if the kill struck (the main thread calls this between its steps)."""
        if self.fired:
            raise Killed(f"SIGKILL {self.plan.delay * 1e3:.1f} ms into {self.plan.phase}")

    def fire(self) -> None:
        """SIGKILL every process of the cast but the device, at once (no wait between them)."""
        with self._lock:
            if self.fired:
                return
            self.fired_ns = realtime_ns()
            for pid, name in victims(self.cast):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(f"{name} {pid}")
                except ProcessLookupError:
                    pass

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()


def victims(cast: Cast) -> list[tuple[int, str]]:
    """(pid, name) of every live process of the cast but the device: those it started, and every
    process whose command line names its image (a forked daemon)."""
    dev = cast.dev.pid if cast.dev is not None else -1
    found = {p.pid: p.name for p in cast.procs if p.pid != dev and p.alive()}
    key = os.fsencode(cast.image)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in found or int(d) in (dev, os.getpid()):
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if key in f.read().split(b"\0"):
                    found[int(d)] = "daemon"
        except OSError:
            continue
    # the kernel first: a VMM killed before its daemon closes its connections, and a daemon that
    # lived a moment longer would release what they held (detach the device, free its HWPT) -- a
    # kexec takes the kernel down first, with everything it would have done at a close undone
    return sorted(found.items(), key=lambda pn: (pn[1] not in ("daemon", "mount"), pn[0]))


def clear_after_kill(cast: Cast) -> list[str]:
    """What the kill left: every process but the device ended (SIGKILL, waited for), the dead mount
    cleared. Returns what it ended."""
    ended = []
    for p in cast.procs:
        if p is not cast.dev and p.alive():
            cast.kill(p)
            ended.append(f"{p.name} {p.pid}")
    # a daemon forked since the kill (a waiting mount's, killed after its fork): scan until two scans
    # 50 ms apart find nothing
    deadline, quiet = time.monotonic() + 10, 0
    while quiet < 2 and time.monotonic() < deadline:
        found = victims(cast)
        for pid, name in found:
            cast.kill(Proc(name, None, pid, start=start_time(pid)))  # known by start time: waited for until gone
            ended.append(f"{name} {pid}")
        quiet = 0 if found else quiet + 1
        time.sleep(0.05)
    cast.clear_mount()
    cast.vmm, cast.vmm_monitor = None, None
    return ended


def session_offered(cast: Cast) -> bool:
    """Whether the daemon serving the mount offers session ``vm0`` for retrieve (a committed freeze)."""
    line = cast.status("liveupdate")
    _, _, sessions = line.partition(" sessions: ")
    return f"{GUEST} incoming" in sessions.split(", ")


__all__ = ["KILL_PHASES", "KillPlan", "Killer", "Killed", "choose", "victims", "clear_after_kill", "session_offered"]
