"""The Unicorn engine (pkfuse/vmm/emulator.py) as an ``engine.Engine``: boot, run, pause, save, restore, stops."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from vmm_helpers import RAM

from pkfuse.vmm import abi, boot, guest, verify
from pkfuse.vmm.emulator import UNICORN_VCPU_STATE, Emulator
from pkfuse.vmm.engine import EngineError
from pkfuse.vmm.memory import GuestMemory


def setup(mem: GuestMemory, nr_vcpus: int = 1, text: bytes | None = None) -> None:
    boot.write_boot(mem.array, boot.GuestParams(nr_vcpus=nr_vcpus, ram_size=RAM, dirty_share=0.05),
                    guest.load() if text is None else text, fresh=True)


def counter(mem: GuestMemory, i: int = 0) -> int:
    g = abi.VCPU_STATE_GPA + i * abi.VCPU_STATE_STRIDE
    return int(np.frombuffer(mem.array[g:g + 8].tobytes(), "<u8")[0])


def keep_going(vcpu: int, port: int, value: int) -> bool:
    return port != abi.PORT_ERROR


def wait_for(what, timeout: float = 5.0) -> None:  # noqa: ANN001 -- a predicate
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_boot_puts_each_vcpu_in_64_bit_mode_at_cpl_3_with_paging_on(mem: GuestMemory) -> None:
    setup(mem, 2)
    with Emulator(mem, 2, keep_going) as e:
        e.boot()
        states = [np.frombuffer(b, UNICORN_VCPU_STATE)[0] for b in e.save()]
    for i, s in enumerate(states):
        c = boot.initial_cpu(i)
        assert (int(s["cs"]), int(s["ss"])) == (abi.SEL_USER_CODE, abi.SEL_USER_DATA)  # RPL 3 = CPL 3
        assert int(s["cr0"]) & boot.CR0_PG and int(s["cr3"]) == abi.PML4_GPA and int(s["efer"]) & boot.EFER_LMA
        assert int(s["rflags"]) & boot.RFLAGS_IOPL3 == boot.RFLAGS_IOPL3
        assert (int(s["rip"]), int(s["gprs"][4]), int(s["gprs"][7]), int(s["gprs"][6])) == (c.rip, c.rsp, c.rdi, c.rsi)


def test_the_guest_page_tables_are_used_a_supervisor_page_faults_at_cpl_3(mem: GuestMemory) -> None:
    setup(mem)
    pd = mem.array[abi.PD_GPA:abi.PD_GPA + 8].view("<u8")
    pd[0] &= ~np.uint64(boot.PTE_US)  # the first 2 MiB (the text among them) for ring 0 only
    del pd
    with Emulator(mem, 1, keep_going) as e:
        e.boot()
        e.start()
        wait_for(lambda: e.stopped())
        assert "exception 14 (#PF)" in e.stopped()[0]


def test_pause_save_close_then_restore_in_a_new_engine_continues_the_counters(mem: GuestMemory) -> None:
    setup(mem, 2)
    with Emulator(mem, 2, keep_going) as e:
        e.boot()
        e.start()
        wait_for(lambda: min(counter(mem, 0), counter(mem, 1)) > 100)
        e.pause()
        states = e.save()
    before = verify.verify(mem.array)
    assert before.ok, before.findings
    with Emulator(mem, 2, keep_going) as e:
        e.restore(states)
        e.start()
        wait_for(lambda: min(counter(mem, 0) - before.vcpus[0].counter, counter(mem, 1) - before.vcpus[1].counter)
                 > 100)
        e.pause()
        assert e.stopped() == {}
    after = verify.verify(mem.array)
    assert after.ok, after.findings  # no rollback error
    assert verify.progressed(before, after, advanced=True) == []
    assert [v.boots for v in after.vcpus] == [0, 0] and [v.started for v in after.vcpus] == [1, 1]  # a resume


def test_a_paused_guest_makes_no_progress_until_resumed(mem: GuestMemory) -> None:
    setup(mem)
    with Emulator(mem, 1, keep_going) as e:
        e.boot()
        e.start()
        wait_for(lambda: counter(mem) > 10)
        e.pause()
        n = counter(mem)
        time.sleep(0.05)
        assert counter(mem) == n
        e.resume()
        wait_for(lambda: counter(mem) > n + 10)


def test_a_handler_saying_stop_stops_that_vcpu_only(mem: GuestMemory) -> None:
    setup(mem, 2)
    seen: list[tuple[int, int, int]] = []

    def handler(vcpu: int, port: int, value: int) -> bool:
        seen.append((vcpu, port, value))
        return vcpu != 1
    with Emulator(mem, 2, handler) as e:
        e.boot()
        e.start()
        wait_for(lambda: 1 in e.stopped())
        n = counter(mem, 0)
        wait_for(lambda: counter(mem, 0) > n + 10)
        assert list(e.stopped()) == [1] and "OUT 0x1 to port 0x510" in e.stopped()[1]
        assert counter(mem, 1) == 0
    assert sorted(seen) == [(0, abi.PORT_STARTED, 0), (1, abi.PORT_STARTED, 1)]


def test_a_port_handler_that_raises_stops_the_vcpu_with_why(mem: GuestMemory) -> None:
    setup(mem)

    def handler(vcpu: int, port: int, value: int) -> bool:
        raise RuntimeError("no such device")
    with Emulator(mem, 1, handler) as e:
        e.boot()
        e.start()
        wait_for(lambda: e.stopped())
        assert "RuntimeError: no such device" in e.stopped()[0]


def test_a_guest_fault_is_a_shutdown_of_that_vcpu(mem: GuestMemory) -> None:
    setup(mem, text=b"\x0f\x0b")  # ud2
    with Emulator(mem, 1, keep_going) as e:
        e.boot()
        e.start()
        wait_for(lambda: e.stopped())
        assert f"(#UD) at rip {abi.GUEST_TEXT_GPA:#x}" in e.stopped()[0] and "shutdown" in e.stopped()[0]


def test_restore_refuses_a_state_it_did_not_save(mem: GuestMemory) -> None:
    setup(mem)
    with Emulator(mem, 1, keep_going) as e:
        e.boot()
        good = e.save()[0]
    with Emulator(mem, 1, keep_going) as e:
        with pytest.raises(EngineError, match="is 144 bytes"):
            e.restore([bytes(144)])
        with pytest.raises(EngineError, match="not a Unicorn vCPU state"):
            e.restore([bytes(len(good))])
        newer = np.frombuffer(good, UNICORN_VCPU_STATE).copy()
        newer["version"] = 2
        with pytest.raises(EngineError, match="version 2"):
            e.restore([newer.tobytes()])
        with pytest.raises(EngineError, match="2 saved states for 1 vCPUs"):
            e.restore([good, good])


def test_save_refuses_while_running_and_close_joins_every_thread(mem: GuestMemory) -> None:
    setup(mem, 2)
    e = Emulator(mem, 2, keep_going)
    e.boot()
    e.start()
    wait_for(lambda: counter(mem, 1) > 0)
    with pytest.raises(EngineError, match="running: pause first"):
        e.save()
    e.close()
    e.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("unicorn-vcpu")]
    n = counter(mem, 0)
    time.sleep(0.02)
    assert counter(mem, 0) == n and verify.verify(mem.array).ok  # RAM left as it was


def test_the_port_handler_may_pause_the_engine_from_a_vcpu_thread(mem: GuestMemory) -> None:
    setup(mem, 2)
    holder: list[Emulator] = []
    paused = threading.Event()

    def handler(vcpu: int, port: int, value: int) -> bool:
        if vcpu == 1 and port == abi.PORT_STARTED:
            holder[0].pause()  # must not wait for its own vCPU
            paused.set()
        return True
    with Emulator(mem, 2, handler) as e:
        holder.append(e)
        e.boot()
        e.start()
        assert paused.wait(5)
        time.sleep(0.02)
        n = counter(mem, 0), counter(mem, 1)
        time.sleep(0.03)
        assert (counter(mem, 0), counter(mem, 1)) == n and e.stopped() == {}
        e.resume()
        wait_for(lambda: counter(mem, 1) > n[1] + 10)
