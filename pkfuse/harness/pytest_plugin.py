"""``pkfuse.harness`` as a pytest plugin: restart-survival tests in a user's own suite.

Registered by the ``pytest11`` entry point ``pkfuse`` (``pyproject.toml``): an installed pkfuse
gives every pytest run the ``pkfuse_host`` fixture. It brings up, in the test's ``tmp_path``,
what ``pkfuse restart-test`` runs -- an image, the daemon (the kernel), a VM on a guest file of
the mount and, where this pkfuse has it, the DMA device on the VM's requester id -- and yields a
``Host``. ``host.restart()`` plays one cycle (prepare, freeze, the jump, restore, retrieve,
rebuild, finish; ``kill="freeze"`` and the like land the jump elsewhere, as ``--kill`` does) and
returns its ``Cycle``: its checks, its blackout, its outcome. ``host.assert_ok(cycle)`` fails
the test with the first check that did not hold, in one line. At teardown, passing or failing,
the device's log is judged (no fault, no misdirected DMA), the VM stopped and verified, the
image unmounted and fsck'd -- ``host.end`` holds those checks and a failed one fails the test
-- and every process the fixture started is ended by pid, its mountpoint cleared.

The fixture's defaults (64 MiB guest, 1 vCPU, persistent domains, successors pre-started) are
changed with the ``pkfuse_host`` marker: ``@pytest.mark.pkfuse_host(flow="ephemeral",
guest_size=128 << 20, engine="unicorn")``, any field of ``pkfuse.harness.run.Config``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pkfuse.uapi.client import parse_rid

from . import checks, kill
from .cast import RID, Cast
from .cycle import Cycle, Hooks, run_cycle
from .report import Report
from .run import Config, bring_up, device_available, tear_down

MiB = 1 << 20


class Host:
    """A running host, VM and device, and the restart cycles played on it."""

    def __init__(self, cast: Cast, config: Config, flow: str) -> None:
        self.cast = cast
        self.config = config
        self.flow = flow
        self.report = Report(config.as_dict())
        self.cycles: list[Cycle] = []
        self.previous: Any = None  #: the last verdict over all of guest RAM
        self._rng = random.Random(f"{config.seed}-{flow}")

    @property
    def end(self) -> list[checks.Check]:
        return self.report.end.setdefault(self.flow, [])

    def restart(self, *, kill_at: str | None = None, cancel: bool = False, hooks: Hooks | None = None) -> Cycle:
        """One cycle on the running VM; ``kill_at``: a phase of ``kill.KILL_PHASES`` or "random" (the
        jump lands there); ``cancel``: a cancelled prepare first. Returns the cycle (``cycle.ok``)."""
        if self.cast.vmm is None:
            raise RuntimeError("no VM is running: the last cycle's successor did not survive")
        cycle = Cycle(len(self.cycles) + 1, self.flow, self.config.successors, cancel=cancel)
        self.cycles.append(cycle)
        self.report.cycles.append(cycle)
        plan = kill.choose(kill_at, self._rng, {}) if kill_at is not None else None
        after = run_cycle(self.cast, cycle, self.previous, sid=parse_rid(RID), settle=self.config.settle,
                          run_after=self.config.run_between, verify_ram=self.config.verify_ram, hooks=hooks,
                          kill=plan)
        self.previous = after if after is not None else self.previous
        return cycle

    @staticmethod
    def assert_ok(cycle: Cycle) -> None:
        """Fail with the cycle's first failed check, in one line."""
        failed = cycle.failed()
        if failed:
            pytest.fail(f"cycle {cycle.index} ({cycle.flow}, {cycle.outcome}): {failed[0].name}: {failed[0].detail}",
                        pytrace=False)

    def finish(self) -> None:
        """The end checks (``end``): device log, last VMM stopped and verified, unmount, fsck."""
        tear_down(self.cast, self.report, self.flow, self.cycles[-1] if self.cycles else None, self.previous,
                  self.cycles)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pkfuse_host(**config): options of the pkfuse_host fixture "
                                       "(pkfuse.harness.run.Config fields; flow='persistent'|'ephemeral')")


@pytest.fixture
def pkfuse_host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    """A running host (daemon on a fresh image), VM and DMA device; ``host.restart()`` plays a cycle."""
    marker = request.node.get_closest_marker("pkfuse_host")
    options = dict(marker.kwargs) if marker is not None else {}
    flow = options.pop("flow", "persistent")
    config = Config(tmp_path / "pkfuse-host", **{"guest_size": 64 * MiB, "settle": 0.3, "run_between": 0.1,
                                                 "seed": 0, **options})
    cast = Cast(Path(config.workdir) / flow, domains=flow, guest_size=config.guest_size, vcpus=config.vcpus,
                engine=config.engine, device=config.device and device_available(),
                iommu_pgsize=config.iommu_pgsize, dirty_share=config.dirty_share)
    host = Host(cast, config, flow)
    try:
        host.previous = bring_up(cast, config, host.end)
        yield host
        host.finish()
    finally:
        left = cast.close()
    failed = [c for c in host.end if not c.ok]
    if left:
        pytest.fail(f"pkfuse_host left behind: {'; '.join(left)}", pytrace=False)
    if failed:
        pytest.fail(f"pkfuse_host's end: {failed[0].name}: {failed[0].detail}", pytrace=False)


__all__ = ["Host", "pkfuse_host"]
