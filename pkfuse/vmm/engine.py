"""What runs the guest's vCPUs: the one interface of KVM (``vm.Vm``) and Unicorn (``emulator.Emulator``).

The VMM drives an engine through these calls only, so the same guest binary,
the same RAM mapping and the same live-update flow run on either. An engine
never decides policy: a port write from the guest goes to the VMM's
``PortHandler``, which says whether that vCPU goes on.

Life of an engine: construct (VM, memory slot, vCPUs created; nothing runs),
then ``boot`` (each vCPU at ``boot.initial_cpu``) or ``restore`` (each vCPU
from a saved state), then ``start``; ``pause`` / ``save`` / ``resume`` any
number of times; ``close`` (threads joined, fds closed, guest RAM untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from backing.errors import PkfuseError

#: (vcpu index, port, value) -> True to keep that vCPU running, False to stop it there
PortHandler = Callable[[int, int, int], bool]


class GuestRam(Protocol):
    """Guest-physical ``[0, size)`` at host virtual ``address`` (``memory.GuestMemory`` is one)."""

    address: int
    size: int
    array: np.ndarray


class EngineError(PkfuseError):
    """The engine cannot do what was asked (one line: which capability or call, and why)."""


class Engine(Protocol):
    name: str  #: "kvm" or "unicorn"
    nr_vcpus: int

    def boot(self) -> None:
        """Every vCPU at its first instruction (64-bit mode, CPL 3): a cold boot."""

    def restore(self, states: Sequence[bytes]) -> None:
        """Every vCPU from ``states`` (one per vCPU, from ``save`` of the same engine)."""

    def start(self) -> None:
        """Run every vCPU in its own thread until paused, stopped or closed."""

    def pause(self) -> None:
        """Return once every vCPU is out of guest code at an instruction boundary, pending I/O done."""

    def resume(self) -> None:
        """Run the paused vCPUs again from exactly where they stopped."""

    def save(self) -> list[bytes]:
        """Each paused vCPU's whole state (what the guest depends on), one opaque blob per vCPU."""

    def stopped(self) -> dict[int, str]:
        """vCPUs that left for good, with why (a handler said stop, a shutdown, an engine error)."""

    def close(self) -> None:
        """Stop every vCPU, join its thread, release the engine; guest RAM is left as it is."""
