"""The VMM: a guest whose RAM is a pkernfs file, its device's DMA through iommufd, its live update.

``Vmm`` ties the rooms together: guest RAM (``memory.GuestMemory``, the
file's image pages mapped by the daemon's mmap call), an engine running the
vCPUs (``vm.Vm`` on KVM, ``emulator.Emulator`` on Unicorn), the IOMMU through
the control socket (IOAS over guest RAM at IOVA = guest-physical address, a
HWPT for the device's requester id, attached, as a VFIO VMM does) and the
VMM's side of live update, in cpr-transfer's shape:

- ``prepare(name)``, the VM running: a session preserving the guest-RAM file,
  the handover file and the HWPT (with its device). Off the critical path.
- ``freeze()``: pause every vCPU at an instruction boundary, save their state
  into the handover file, ``reboot()``. The vCPUs stay paused: this VMM's
  work is over; the kexec (a SIGKILL) ends it.
- ``Vmm.incoming(mnt, name)``: the successor. Waits for the new daemon,
  retrieves the session, maps guest RAM, recreates the VM, restores and
  resumes the vCPUs (the blackout ends here), then rebuilds IOAS and HWPT --
  the daemon adopts the preserved domain or, in the review's design,
  replaces the saved copy -- and calls ``finish()``.

A stop (``close(save=True)``, what SIGTERM does in ``pkfuse vmm run``) pauses
and saves too, so ``Vmm.start(..., resume=True)`` continues the same guest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backing.errors import PkfuseError
from pkfuse.uapi import Iommufd, LiveUpdate, wire
from pkfuse.uapi.client import Session, parse_rid

from . import abi, boot, cpustate, guest, handover
from .engine import Engine, EngineError
from .memory import GuestMemory

log = logging.getLogger(__name__)

RAM_TOKEN, STATE_TOKEN, HWPT_TOKEN = 1, 2, 3
#: the IOMMU leaf sizes a VMM may ask for its device's HWPT: "2M" lets the kernel use superpages wherever
#: guest RAM's pages are aligned for them (iommufd's default), "4K" sets IOMMU_OPTION_HUGE_PAGES 0 on the
#: IOAS before guest RAM is mapped, so every leaf is 4 KiB
IOMMU_PGSIZES = ("2M", "4K")
STATE_SUFFIX = ".vmstate"
STATUS_FILE = Path(".pkernfs", "status")


class VmmError(PkfuseError):
    """What the VMM refuses or cannot do, in one line."""


@dataclass(frozen=True)
class VmmSpec:
    """A VM to start: guest RAM file (on a mount), size, vCPUs, engine, device, workload."""

    guest: str  #: the guest-RAM file, a path on the mount (created if missing)
    memory: int  #: bytes
    vcpus: int = 1
    engine: str = "auto"  #: "kvm", "unicorn" or "auto" (KVM where /dev/kvm opens)
    device: str | int | None = "00:03.0"  #: the requester id whose DMA goes through the HWPT; None: no IOMMU
    dirty_share: float = 0.5
    dma_every: int = 64
    dma_length: int = abi.BUFFER_SIZE
    seed: int = 0
    mode: int = abi.MODE_RUN
    iommu_pgsize: str = "2M"  #: ``IOMMU_PGSIZES``: "4K" turns the IOAS's huge pages off


def find_mountpoint(path: str | os.PathLike[str]) -> Path:
    """The pkfuse mount a path is on: the nearest ancestor with ``.pkernfs/status``."""
    p = Path(os.path.abspath(path))
    for d in [p, *p.parents]:
        if (d / STATUS_FILE).exists():
            return d
    raise VmmError(f"{path} is not on a pkfuse mount (no .pkernfs/status above it)")


def make_engine(name: str, ram: GuestMemory, nr_vcpus: int, on_port: Callable[[int, int, int], bool]) -> Engine:
    """The engine called ``name``; "auto" is KVM where ``/dev/kvm`` can be opened, else Unicorn."""
    if name == "auto":
        name = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "unicorn"
    if name == "kvm":
        from .vm import Vm

        return Vm(ram, nr_vcpus, on_port)
    if name == "unicorn":
        from .emulator import Emulator

        return Emulator(ram, nr_vcpus, on_port)
    raise VmmError(f"unknown engine {name!r}: kvm, unicorn or auto")


def state_view(ram: np.ndarray, nr_vcpus: int) -> np.ndarray:
    """The guest's VCPU_STATE records, a live view into its RAM."""
    dt = np.dtype({"names": list(abi.VCPU_STATE.names), "formats": [abi.VCPU_STATE.fields[n][0]
                   for n in abi.VCPU_STATE.names], "offsets": [abi.VCPU_STATE.fields[n][1]
                   for n in abi.VCPU_STATE.names], "itemsize": abi.VCPU_STATE_STRIDE})
    return np.ndarray((nr_vcpus,), dt, buffer=ram, offset=abi.VCPU_STATE_GPA)


@dataclass
class PortLog:
    """What the vCPUs said on their ports (the run loop's threads append; read under the GIL)."""

    started: list[int] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    errors: dict[int, int] = field(default_factory=dict)  #: vCPU -> ERROR_*

    def __call__(self, vcpu: int, port: int, value: int) -> bool:
        if port == abi.PORT_STARTED:
            self.started.append(vcpu)
            return True
        if port == abi.PORT_DONE:
            self.done.add(vcpu)
            return False  # mode FILL: that vCPU's work is done
        if port == abi.PORT_ERROR:
            self.errors[vcpu] = value
            return False
        return True  # an unknown port: ignored, as an unclaimed ISA port is


class Vmm:
    """A running guest. Build with ``Vmm.start`` or ``Vmm.incoming``; end with ``close``."""

    def __init__(self, mnt: Path, guest_rel: str, guest_fd: int, state_fd: int, ram: GuestMemory,
                 engine: Engine, ports: PortLog, config: np.void, iommufd: Iommufd) -> None:
        self.mnt = mnt
        self.guest_rel = guest_rel
        self.guest_fd = guest_fd
        self.state_fd = state_fd
        self.ram = ram
        self.engine = engine
        self.ports = ports
        self.config = config
        self.iommufd = iommufd
        self.nr_vcpus = int(config["nr_vcpus"])
        self.vm_uuid = bytes(config["vm_uuid"])
        self.rid: int | None = None
        self.iommu_pgsize = "2M"  #: set by start / incoming before the device is attached
        self.ioas: int | None = None
        self.dev: int | None = None
        self.hwpt: int | None = None
        self.session: Session | None = None
        self.lu: LiveUpdate | None = None
        self.paused = False
        self.rebooted = False
        self.timings: dict[str, float] = {}  #: seconds, per phase of the last start / freeze / incoming
        self.closed = False
        self._final: np.ndarray | None = None  #: the vCPU states when closed
        self._stopped: dict[int, str] = {}

    # ------------------------------------------------------------ start

    @classmethod
    def start(cls, spec: VmmSpec, *, resume: bool = False, reboot: bool = False, text: bytes | None = None) -> Vmm:
        """Create or open the guest file, map it, boot (or, ``resume``, restore its saved vCPUs), run.

        ``reboot``: a cold boot of the same VM over its RAM (what is left of it after a host crash: no
        vCPU state survives) -- its state blocks and rings kept, which the guest takes over, and its
        CONFIG's vm_uuid and DMA seed kept when the RAM holds a valid one; otherwise a new guest."""
        if resume and reboot:
            raise VmmError("resume continues from the saved vCPUs, reboot boots over RAM: one or the other")
        mnt = find_mountpoint(spec.guest)
        rel = os.path.relpath(os.path.abspath(spec.guest), mnt)
        params = boot.GuestParams(spec.vcpus, spec.memory, spec.dirty_share, spec.mode, spec.dma_every,
                                  spec.dma_length, seed=spec.seed)
        try:
            params.config()
        except boot.BootError as exc:
            raise VmmError(str(exc)) from None
        guest_fd = _open_sized(spec.guest, spec.memory, "guest RAM")
        state_fd = _open_sized(spec.guest + STATE_SUFFIX, handover.FILE_SIZE, "the handover file")
        iommufd = ram = engine = None
        try:
            iommufd = Iommufd(mnt)
            ram = GuestMemory.map_file(iommufd, guest_fd)
            saved = handover.read(state_fd, spec.guest + STATE_SUFFIX) if resume else None
            if resume and saved is None:
                raise VmmError(f"{spec.guest}{STATE_SUFFIX} holds no saved state to resume")
            ports = PortLog()
            if saved is not None:
                config = boot.read_config(ram.array)
                _check_saved(saved, config, spec.vcpus, spec.memory, spec.guest)
                engine = make_engine(saved.engine, ram, spec.vcpus, ports)
                engine.restore(cpustate.decode(saved.payload, expect_uuid=saved.vm_uuid, expect_vcpus=spec.vcpus,
                                               expect_engine=saved.engine, expect_ram_size=spec.memory).blobs)
            else:
                old = boot.read_config(ram.array) if reboot else None
                same = old is not None and int(old["magic"]) == abi.CONFIG_MAGIC and \
                    int(old["version"]) == abi.CONFIG_VERSION
                if same:
                    params = dataclasses.replace(params, vm_uuid=bytes(old["vm_uuid"]), seed=int(old["seed"]))
                config = boot.write_boot(ram.array, params, text if text is not None else guest.load(),
                                         fresh=not same)[()]
                engine = make_engine(spec.engine, ram, spec.vcpus, ports)
                engine.boot()
            vmm = cls(mnt, rel, guest_fd, state_fd, ram, engine, ports, config, iommufd)
        except BaseException:
            _cleanup(engine, ram, iommufd, guest_fd, state_fd)
            raise
        vmm.iommu_pgsize = _pgsize(spec.iommu_pgsize)
        try:
            if spec.device is not None:
                vmm.attach_device(parse_rid(spec.device))
            engine.start()
        except BaseException:
            vmm.close(save=False)
            raise
        return vmm

    def attach_device(self, rid: int) -> None:
        """Guest RAM into a new IOAS at IOVA = GPA, the device bound, a HWPT allocated and attached.

        With ``iommu_pgsize`` "4K" the IOAS's huge pages are turned off first (IOMMU_OPTION), as a
        VMM on iommufd would do it: the only way the uAPI gives to ask for 4 KiB leaves."""
        self.ioas = self.iommufd.ioas_alloc()
        if self.iommu_pgsize == "4K":
            self.iommufd.option(wire.iommufd_option.IOMMU_OPTION_HUGE_PAGES,
                                wire.iommufd_option_ops.IOMMU_OPTION_OP_SET, self.ioas, 0)
        self.iommufd.ioas_map_file(self.ioas, self.guest_fd, 0, self.ram.size, 0)
        self.dev = self.iommufd.device_bind(rid)
        self.hwpt = self.iommufd.hwpt_alloc(self.dev, self.ioas)
        self.iommufd.device_attach(self.dev, self.hwpt)
        self.rid = rid

    # ------------------------------------------------------------ running

    def vcpu_states(self) -> np.ndarray:
        """A copy of every vCPU's VCPU_STATE, read from guest RAM (after ``close``: as it was then)."""
        if self._final is not None:
            return self._final.copy()
        return state_view(self.ram.array, self.nr_vcpus).copy()

    def status_line(self) -> str:
        s = self.vcpu_states()
        return (f"steps {int(s['counter'].sum())}  dirtied {int(s['pages'].sum()) * abi.PAGE_SIZE >> 20} MiB  "
                f"dma posted {int(s['dma_posted'].sum())} ok {int(s['dma_ok'].sum())} "
                f"errors {int(s['dma_errors'].sum())}  guest errors {len(self.ports.errors)}")

    def pause(self) -> None:
        if not self.paused:
            self.engine.pause()
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.engine.resume()
            self.paused = False

    def save(self, *, tokens: tuple[int, int, int] = (0, 0, 0)) -> int:
        """Pause (if running) and write every vCPU's state into the handover file; its generation."""
        saved_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)  # the blackout starts as the pause does
        self.pause()
        blobs = self.engine.save()
        payload = cpustate.encode(self.engine.name, self.vm_uuid, self.ram.size, blobs)
        return handover.write(self.state_fd, handover.Handover(
            0, self.nr_vcpus, self.ram.size, self.vm_uuid, self.engine.name, self.guest_rel, self.rid,
            *tokens, saved_ns, payload))

    # ------------------------------------------------------------ live update, outgoing

    def prepare(self, name: str) -> None:
        """A session ``name`` preserving guest RAM, the handover file and the HWPT; the VM keeps running."""
        t0 = time.perf_counter()
        if self.session is not None:
            raise VmmError(f"a live update is prepared already (session {name})")
        self.lu = LiveUpdate(self.mnt)
        try:
            self.session = self.lu.create_session(name)
            self.session.preserve_fd(self.guest_fd, RAM_TOKEN)
            self.session.preserve_fd(self.state_fd, STATE_TOKEN)
            if self.hwpt is not None:
                self.iommufd.hwpt_lu_set_preserve(self.hwpt, HWPT_TOKEN, self.session)
        except BaseException:
            self.cancel()
            raise
        self.timings["prepare"] = time.perf_counter() - t0

    def cancel(self) -> None:
        """An aborted prepare: closing the session unpreserves everything; the VM goes on."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.lu is not None:
            self.lu.close()
            self.lu = None

    def freeze(self) -> None:
        """Pause every vCPU, save them into the preserved handover file, ``reboot()``.

        On a refused reboot (EAGAIN) the vCPUs run again and the session stays prepared.
        """
        if self.session is None or self.lu is None:
            raise VmmError("freeze without prepare: no live-update session")
        t0 = time.perf_counter()
        self.save(tokens=(RAM_TOKEN, STATE_TOKEN, HWPT_TOKEN if self.hwpt is not None else 0))
        t1 = time.perf_counter()
        try:
            self.lu.reboot()
        except OSError:
            self.resume()
            raise
        self.rebooted = True
        self.timings.update(freeze_save=t1 - t0, freeze_reboot=time.perf_counter() - t1)

    # ------------------------------------------------------------ live update, incoming

    @classmethod
    def incoming(cls, mnt: str | os.PathLike[str], name: str, *, engine: str | None = None,
                 timeout: float = 60.0, iommu_pgsize: str = "2M") -> Vmm:
        """The successor: wait for the daemon, retrieve session ``name``, resume the guest, rebuild, finish.

        ``iommu_pgsize`` is the rebuilt IOAS's, as the predecessor's command line had it (cpr-transfer
        starts the new VMM with the same configuration): the persistent design adopts the preserved
        domain only if the maps agree, whatever its leaves."""
        iommu_pgsize = _pgsize(iommu_pgsize)
        mnt = Path(mnt)
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        lu = _wait_for_daemon(mnt, name, timeout)
        t["wait"] = time.perf_counter() - t0
        guest_fd = state_fd = -1
        iommufd = ram = eng = session = None
        try:
            t1 = time.perf_counter()
            session = lu.retrieve_session(name)
            state_fd = session.retrieve_fd(STATE_TOKEN)
            saved = handover.read(state_fd, f"session {name}'s handover file")
            if saved is None:
                raise VmmError(f"session {name}'s handover file holds no saved state (was the VM frozen?)")
            guest_fd = session.retrieve_fd(saved.ram_token)
            t2 = time.perf_counter()
            iommufd = Iommufd(mnt)
            ram = GuestMemory.map_file(iommufd, guest_fd)
            t3 = time.perf_counter()
            config = boot.read_config(ram.array)
            _check_saved(saved, config, saved.nr_vcpus, saved.memory, f"session {name}")
            state = cpustate.decode(saved.payload, expect_uuid=saved.vm_uuid, expect_vcpus=saved.nr_vcpus,
                                    expect_engine=saved.engine, expect_ram_size=saved.memory)
            if engine is not None and engine not in ("auto", saved.engine):
                raise VmmError(f"session {name} was saved by the {saved.engine} engine, not {engine}")
            ports = PortLog()
            eng = make_engine(saved.engine, ram, saved.nr_vcpus, ports)
            t4 = time.perf_counter()
            rebooted = bool(saved.flags & handover.FLAG_RESUMED)
            if rebooted:  # an earlier successor resumed it, then died before finish: the state is stale
                log.warning("session %s: its vCPU state was resumed once already (the VM ran since): "
                            "the VM boots again over its RAM", name)
                boot.write_boot(ram.array, None, guest.load())
                eng.boot()
            else:
                eng.restore(state.blobs)
                # marked before the vCPUs run: a successor after this one must not restore them again
                handover.write(state_fd, dataclasses.replace(saved, flags=saved.flags | handover.FLAG_RESUMED))
            eng.start()
            resumed_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
            t5 = time.perf_counter()
            vmm = cls(mnt, saved.guest, guest_fd, state_fd, ram, eng, ports, config, iommufd)
        except BaseException:
            _cleanup(eng, ram, iommufd, guest_fd, state_fd)
            for c in (session, lu):
                if c is not None:
                    c.close()
            raise
        vmm.lu, vmm.session = lu, session
        vmm.iommu_pgsize = iommu_pgsize
        t.update(retrieve=t2 - t1, remap=t3 - t2, vm_create=t4 - t3, vcpu_restore=t5 - t4,
                 blackout=(resumed_ns - saved.saved_ns) / 1e9, rebooted=float(rebooted))
        try:
            t6 = time.perf_counter()
            if saved.rid is not None:
                vmm.attach_device(saved.rid)  # adopt (same maps) or replace (the saved copy): the daemon decides
            t7 = time.perf_counter()
            session.finish()
            t.update(rebuild=t7 - t6, finish=time.perf_counter() - t7)
            vmm.cancel()  # finished: closing the session releases nothing now
        except BaseException:
            vmm.close(save=False)
            raise
        vmm.timings = t
        return vmm

    # ------------------------------------------------------------ end

    def close(self, *, save: bool = True) -> None:
        """Stop the VM: pause, save (unless ``save`` is False or a reboot happened), release everything."""
        if self.closed:
            return
        self.closed = True
        try:
            if save and not self.rebooted and not self.engine.stopped().keys() >= set(range(self.nr_vcpus)):
                self.save()
        finally:
            if not self.rebooted:
                self.cancel()
            self._final = self.vcpu_states()
            self._stopped = self.engine.stopped()
            _cleanup(self.engine, self.ram, self.iommufd, self.guest_fd, self.state_fd)

    def __enter__(self) -> Vmm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(save=False)

    def describe(self) -> dict[str, Any]:
        s = self.vcpu_states()
        return {"engine": self.engine.name, "vcpus": self.nr_vcpus, "memory": self.ram.size,
                "guest": self.guest_rel, "device": self.rid, "hwpt": self.hwpt, "paused": self.paused,
                "iommu_pgsize": self.iommu_pgsize,
                "counters": s["counter"].tolist(), "pages": s["pages"].tolist(),
                "dma_posted": s["dma_posted"].tolist(), "dma_ok": s["dma_ok"].tolist(),
                "dma_errors": s["dma_errors"].tolist(), "guest_errors": dict(self.ports.errors),
                "stopped": self._stopped if self.closed else self.engine.stopped(), "timings": dict(self.timings)}


# ---------------------------------------------------------------- helpers


def _pgsize(name: str) -> str:
    if name not in IOMMU_PGSIZES:
        raise VmmError(f"unknown IOMMU page size {name!r}: {' or '.join(IOMMU_PGSIZES)}")
    return name


def _open_sized(path: str, size: int, what: str) -> int:
    """``path`` read-write, created and sized to ``size`` bytes if new (its pages allocated now);
    a file of another size is refused: a guest or handover file is never resized behind its VM."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VmmError(f"cannot open {what} {path} for writing: {exc.strerror}") from None
    try:
        have = os.fstat(fd).st_size
        if have == 0:
            os.ftruncate(fd, size)
        elif have != size:
            raise VmmError(f"{what} {path} is {have} bytes, not the {size} asked for")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_saved(saved: handover.Handover, config: np.void, vcpus: int, memory: int, where: str) -> None:
    """Refuse a saved state that is not this VM's, in one line."""
    if bytes(config["vm_uuid"]) != saved.vm_uuid:
        raise VmmError(f"{where}: the saved vCPU state belongs to another VM (uuid "
                       f"{saved.vm_uuid.hex()}, the guest's RAM says {bytes(config['vm_uuid']).hex()})")
    if saved.nr_vcpus != vcpus or int(config["nr_vcpus"]) != vcpus:
        raise VmmError(f"{where}: the saved state has {saved.nr_vcpus} vCPUs, the VM {vcpus}")
    if saved.memory != memory:
        raise VmmError(f"{where}: the saved state is of a {saved.memory}-byte guest, not {memory}")


def _session_state(mnt: Path, name: str) -> str | None:
    """Session ``name``'s state in the ``liveupdate:`` line of the mount's status, None if not listed."""
    for line in (mnt / STATUS_FILE).read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "liveupdate":
            _, _, sessions = value.partition(" sessions: ")
            for item in sessions.split(", "):
                sname, _, state = item.rpartition(" ")
                if sname == name:
                    return state
    return None


def _wait_for_daemon(mnt: Path, name: str, timeout: float) -> LiveUpdate:
    """``/dev/liveupdate`` of a daemon serving ``mnt`` that holds session ``name`` incoming.

    Until the restart the mount is the old daemon's (the session is outgoing
    or frozen there), then a dead mount (ENOTCONN), then nothing, then the new
    daemon's: a successor started before the restart waits through all of it
    without touching the old daemon's ``/dev/liveupdate``, which is single-open.
    """
    deadline = time.monotonic() + timeout
    last = "no mount"
    while time.monotonic() < deadline:
        try:
            state = _session_state(mnt, name)
            if state == "incoming":
                return LiveUpdate(mnt)
            if state == "refused":
                raise VmmError(f"the daemon on {mnt} refused session {name} at restore "
                               f"(its reason is in {mnt}/.pkernfs/iommu)")
            last = f"session {name} is {state or 'not there'}"
        except OSError as exc:
            last = exc.strerror or str(exc)
        time.sleep(0.002)
    raise VmmError(f"no daemon on {mnt} offers session {name} after {timeout:.0f} s (last: {last})")


def _cleanup(engine: Engine | None, ram: GuestMemory | None, iommufd: Iommufd | None, *fds: int) -> None:
    for step in (engine.close if engine is not None else None, ram.close if ram is not None else None,
                 iommufd.close if iommufd is not None else None):
        if step is not None:
            try:
                step()
            except Exception:  # noqa: BLE001 -- a cleanup goes on; the first error is the caller's
                log.exception("cleanup")
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["Vmm", "VmmSpec", "VmmError", "EngineError", "find_mountpoint", "make_engine", "state_view"]
