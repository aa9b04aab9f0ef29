"""Live update in the kernel layer (backing.liveupdate): sessions, reboot(), restore, reclaim.

A "boot" is a Store, its Iommu, Iommufd and LiveUpdate on one image; a
restart closes the boot after ``reboot()`` (the halted kernel releases
nothing) and opens the next one on the same image, which restores.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from iommu_helpers import Boot

from backing import format as fmt
from backing import fsck, lustate
from backing.errors import StoreError
from backing.iommu import Iommu
from backing.iommufd import Context
from backing.liveupdate import _read_state
from backing.regs import default_path
from backing.store import Store

MiB = 1 << 20
PS = fmt.PAGE_SIZE
RID = (0 << 8) | (3 << 3) | 0  # 00:03.0
RID2 = (0 << 8) | (4 << 3) | 0  # 00:04.0


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("128M")


@pytest.fixture
def boots(image: Path) -> Iterator[list[Boot]]:
    """Boots opened by a test, closed (the last one normally) at teardown."""
    opened: list[Boot] = []
    yield opened
    for b in opened:
        if not b.closed:
            b.close()


def boot(boots: list[Boot], image: Path, mode: str = "persistent") -> Boot:
    b = Boot(image, mode)
    boots.append(b)
    return b


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as exc:
        fn()
    return exc.value.errno


def vm(b: Boot, *, size: int = 8 * MiB, iova: int = 1 << 30, rid: int = RID) -> tuple[Context, int, int, int]:
    """A VMM's objects: guest file mapped at ``iova`` in an IOAS, a HWPT, the device attached.
    Returns (context, ino, ioas id, hwpt id)."""
    ino = b.guest(b"vm0", size)
    ctx = b.fd.open_context()
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, size, iova, writeable=True)
    dev = ctx.device_bind(rid)
    hwpt = ctx.hwpt_alloc(dev, ioas)
    ctx.device_attach(dev, hwpt)
    return ctx, ino, ioas, hwpt


def preserved_vm(b: Boot, **kw: int) -> tuple[Context, int, int, int]:
    ctx, ino, ioas, hwpt = vm(b, **kw)
    s = b.lu.create_session(b"vm0")
    b.lu.preserve_file(s, ino, 1)
    b.lu.preserve_hwpt(s, ctx, hwpt, 2)
    return ctx, ino, ioas, hwpt


def restart(boots: list[Boot], image: Path, b: Boot, mode: str = "persistent") -> Boot:
    b.lu.reboot()
    b.close()
    return boot(boots, image, mode)


# ------------------------------------------------------------ sessions


def test_a_session_name_is_unique(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    b.lu.create_session(b"a")
    assert errno_of(lambda: b.lu.create_session(b"a")) == errno.EEXIST


@pytest.mark.parametrize("name", [b"", b"x" * 64, b"a\0b"])
def test_a_bad_session_name_is_einval(boots: list[Boot], image: Path, name: bytes) -> None:
    b = boot(boots, image)
    assert errno_of(lambda: b.lu.create_session(name)) == errno.EINVAL


def test_a_token_is_unique_in_its_session(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    s = b.lu.create_session(b"a")
    b.lu.preserve_file(s, b.guest(b"f", PS), 7)
    assert errno_of(lambda: b.lu.preserve_file(s, b.guest(b"g", PS), 7)) == errno.EEXIST


def test_a_file_is_preserved_once(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    s, t = b.lu.create_session(b"a"), b.lu.create_session(b"b")
    ino = b.guest(b"f", PS)
    b.lu.preserve_file(s, ino, 1)
    assert errno_of(lambda: b.lu.preserve_file(t, ino, 1)) == errno.EEXIST


def test_a_session_holds_at_most_128_files(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    s = b.lu.create_session(b"a")
    for i in range(fmt.LU_MAX_FILES):
        b.lu.preserve_file(s, b.guest(b"f%d" % i, 0), i)
    assert errno_of(lambda: b.lu.preserve_file(s, b.guest(b"x", 0), 999)) == errno.ENOSPC


def test_a_preserved_file_has_its_size_frozen_and_cannot_go(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ino = b.guest(b"f", 4 * PS)
    b.lu.preserve_file(b.lu.create_session(b"a"), ino, 1)
    guest_dir = b.store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    assert errno_of(lambda: b.store.truncate(ino, 8 * PS)) == errno.EBUSY
    assert errno_of(lambda: b.store.truncate(ino, PS)) == errno.EBUSY
    assert errno_of(lambda: b.store.write(ino, 4 * PS, b"x")) == errno.EBUSY
    assert errno_of(lambda: b.store.unlink(guest_dir, b"f")) == errno.EBUSY
    assert b.store.write(ino, 0, b"inside") == 6  # data changes; the size does not


def test_cancel_thaws_the_files(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ino = b.guest(b"f", PS)
    s = b.lu.create_session(b"a")
    b.lu.preserve_file(s, ino, 1)
    b.lu.cancel(s)
    b.store.truncate(ino, 2 * PS)
    assert b.lu.create_session(b"a")  # the name is free again


# ---------------------------------------------------------------- HWPTs


def test_a_hwpt_is_preserved_only_with_every_mapped_file(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, ino, _ioas, hwpt = vm(b)
    s = b.lu.create_session(b"a")
    assert errno_of(lambda: b.lu.preserve_hwpt(s, ctx, hwpt, 2)) == errno.EINVAL
    b.lu.preserve_file(s, ino, 1)
    b.lu.preserve_hwpt(s, ctx, hwpt, 2)
    assert errno_of(lambda: b.lu.preserve_hwpt(s, ctx, hwpt, 3)) == errno.EEXIST
    assert errno_of(lambda: b.lu.preserve_hwpt(s, ctx, hwpt + 100, 4)) == errno.ENOENT


def test_a_preserved_hwpt_freezes_its_ioas(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, ino, ioas, _hwpt = preserved_vm(b)
    assert errno_of(lambda: ctx.ioas_unmap(ioas, 1 << 30, 8 * MiB)) == errno.EBUSY
    assert errno_of(lambda: ctx.ioas_map_file(ioas, ino, 0, PS, None, writeable=False)) == errno.EBUSY


def test_a_closed_context_keeps_what_a_session_preserves(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    did = ctx.hwpt(hwpt).domain.domain_id
    ctx.close()
    assert b.io.attached[RID] == did  # the device keeps doing DMA through it


def test_cancel_releases_what_a_closed_context_kept(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    ctx.close()
    b.lu.cancel(b.lu.outgoing[b"vm0"])
    assert RID not in b.io.attached and RID not in b.fd.bound
    assert ctx not in b.fd.contexts


# --------------------------------------------------------------- reboot


def test_reboot_commits_the_minimum(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, ino, _ioas, hwpt = preserved_vm(b)
    did = ctx.hwpt(hwpt).domain.domain_id
    b.lu.reboot()
    state = _read_state(b.store)
    assert state is not None and state.boot == 1 and state.domains == fmt.LU_DOMAINS_PERSISTENT
    (s,) = state.sessions
    assert s.name == b"vm0"
    assert [(f.token, f.ino, f.size) for f in s.files] == [(1, ino, 8 * MiB)]
    (h,) = s.hwpts
    assert (h.token, h.domain_id, h.rids) == (2, did, (RID,))
    assert [(m.iova, m.length, m.ino, m.offset, m.write) for m in h.maps] == [(1 << 30, 8 * MiB, ino, 0, True)]


def test_after_reboot_every_call_is_eshutdown(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    b.lu.reboot()
    assert errno_of(lambda: b.lu.create_session(b"late")) == errno.ESHUTDOWN
    assert errno_of(lambda: b.lu.reboot()) == errno.ESHUTDOWN


def test_after_reboot_closing_releases_nothing(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, *_ = vm(b)  # not preserved: left for the next boot to free
    b.lu.reboot()
    ctx.close()
    b.fd.close()
    assert RID in b.io.attached


def test_reboot_with_unfinished_incoming_sessions_is_eagain(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b2 = restart(boots, image, b)
    assert errno_of(lambda: b2.lu.reboot()) == errno.EAGAIN
    assert not b2.lu.rebooted


def test_fsck_accepts_a_committed_state_and_names_a_corrupt_one(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b.lu.reboot()
    b.close()
    assert fsck.check_image(image)[0] == 0
    st = Store.open(image)
    ino = st.lookup(st.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
    st.image[int(st.image_pages(ino)[0]) * PS + 100] ^= 0xFF
    st.close()
    status, findings = fsck.check_image(image)
    assert status == 1 and any("crc" in f.structure for f in findings)


# -------------------------------------------------------------- restore


def test_restore_gives_back_the_session_with_its_translations(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    before = b.translations(RID)
    b2 = restart(boots, image, b)
    assert b2.findings == []
    assert list(b2.lu.incoming) == [b"vm0"]
    assert b2.translations(RID) == before  # the device never lost its mapping


def test_restored_files_stay_frozen_until_finish(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b2 = restart(boots, image, b)
    assert errno_of(lambda: b2.store.truncate(b2.ino(b"vm0"), PS)) == errno.EBUSY


def test_retrieve_session_twice_is_ebusy_and_unknown_is_enoent(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b2 = restart(boots, image, b)
    b2.lu.retrieve_session(b"vm0")
    assert errno_of(lambda: b2.lu.retrieve_session(b"vm0")) == errno.EBUSY
    assert errno_of(lambda: b2.lu.retrieve_session(b"other")) == errno.ENOENT


def rebuild(b: Boot, *, iova: int = 1 << 30, attach_ioas: bool = False) -> tuple[Context, int]:
    """The VMM after the restart: same file, same map, bind, HWPT (or attach to the IOAS)."""
    s = b.lu.retrieve_session(b"vm0")
    f = b.lu.retrieve_file(s, 1)
    ctx = b.fd.open_context()
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, f.ino, 0, f.size, iova, writeable=True)
    dev = ctx.device_bind(RID)
    if attach_ioas:
        hwpt = ctx.device_attach(dev, ioas)
    else:
        hwpt = ctx.hwpt_alloc(dev, ioas)
        ctx.device_attach(dev, hwpt)
    return ctx, hwpt


def test_adopt_takes_the_preserved_domain_over(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    did = ctx.hwpt(hwpt).domain.domain_id
    before = b.translations(RID)
    b2 = restart(boots, image, b)
    ctx2, hwpt2 = rebuild(b2)
    assert ctx2.hwpt(hwpt2).domain.domain_id == did
    assert b2.translations(RID) == before
    b2.lu.finish(b2.lu.incoming[b"vm0"])
    assert b2.lu.incoming == {} and _read_state(b2.store) is None
    assert not b2.lu.frozen(b2.ino(b"vm0"))


def test_adopt_also_through_an_automatic_hwpt(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    did = ctx.hwpt(hwpt).domain.domain_id
    b2 = restart(boots, image, b)
    ctx2, hwpt2 = rebuild(b2, attach_ioas=True)
    assert ctx2.hwpt(hwpt2).domain.domain_id == did


def test_replace_switches_the_device_and_finish_frees_the_old_domain(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    old = ctx.hwpt(hwpt).domain.domain_id
    b2 = restart(boots, image, b)
    ctx2, hwpt2 = rebuild(b2, iova=2 << 30)  # other maps: no adopt, a new domain
    new = ctx2.hwpt(hwpt2).domain.domain_id
    assert new != old and b2.io.attached[RID] == new
    b2.lu.finish(b2.lu.incoming[b"vm0"])
    b2.io.domains[old]._quiet_after = 0.0
    b2.fd.reap()
    assert old not in b2.io.domains


def test_finish_is_ebusy_until_everything_is_reclaimed(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b2 = restart(boots, image, b)
    s = b2.lu.retrieve_session(b"vm0")
    assert errno_of(lambda: b2.lu.finish(s)) == errno.EBUSY
    b2.lu.retrieve_file(s, 1)
    assert errno_of(lambda: b2.lu.finish(s)) == errno.EBUSY  # the HWPT is not reclaimed
    assert list(b2.lu.incoming) == [b"vm0"]


def test_an_adopter_closing_before_finish_gives_the_domain_back(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    before = b.translations(RID)
    b2 = restart(boots, image, b)
    ctx2, _ = rebuild(b2)
    ctx2.close()
    assert b2.translations(RID) == before
    b2.lu.incoming[b"vm0"].open = False
    ctx3, _ = rebuild(b2)  # reclaimed again by the next VMM
    b2.lu.finish(b2.lu.incoming[b"vm0"])


def test_a_restart_before_finish_restores_again(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    before = b.translations(RID)
    b2 = restart(boots, image, b)
    rebuild(b2)
    b2.kill()  # before finish
    b3 = boot(boots, image)
    assert list(b3.lu.incoming) == [b"vm0"] and b3.translations(RID) == before


def test_domains_that_were_not_preserved_are_freed(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    other = b.guest(b"other", MiB)
    ctx = b.fd.open_context()
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, other, 0, MiB, None, writeable=True)
    dev = ctx.device_bind(RID2)
    ctx.device_attach(dev, ioas)
    dropped = b.io.attached[RID2]
    b2 = restart(boots, image, b)
    assert dropped not in b2.io.domains and RID2 not in b2.io.attached
    assert any(f"domain {dropped} freed" in f for f in b2.findings)


def test_a_session_whose_domain_changed_is_refused_and_its_device_blocked(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, _ioas, hwpt = preserved_vm(b)
    did = ctx.hwpt(hwpt).domain.domain_id
    b.lu.reboot()
    b.close()
    st = Store.open(image)  # garbage between the boots: one page unmapped
    io = Iommu.open(st, default_path(image))
    io.domains[did].unmap(1 << 30, PS)
    io.close()
    st.close()
    b2 = boot(boots, image)
    assert b"vm0" in b2.lu.refused and b2.lu.incoming == {}
    assert RID not in b2.io.attached and did not in b2.io.domains
    assert errno_of(lambda: b2.lu.retrieve_session(b"vm0")) == errno.ENOENT
    assert _read_state(b2.store) is None
    assert not b2.lu.frozen(b2.ino(b"vm0"))


def test_a_state_that_does_not_decode_is_refused_whole(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    b.lu.reboot()
    ino = b.store.lookup(b.store.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
    b.store.image[int(b.store.image_pages(ino)[0]) * PS + 90] ^= 1
    b.close()
    b2 = boot(boots, image)
    assert b2.lu.incoming == {} and any("crc" in f for f in b2.findings)


def test_the_state_codec_round_trips(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    preserved_vm(b)
    state = b.lu.reboot()
    raw = lustate.encode(state)
    assert lustate.decode(raw) == state
    assert len(raw) == fmt.LU_HEADER_DTYPE.itemsize + sum(
        dt.itemsize for dt in (fmt.LU_SESSION_DTYPE, fmt.LU_FILE_DTYPE, fmt.LU_HWPT_DTYPE, fmt.LU_MAP_DTYPE,
                               fmt.LU_DEVICE_DTYPE))
    assert np.frombuffer(raw, fmt.LU_HEADER_DTYPE, 1)["nsessions"][0] == 1


def test_a_reboot_that_cannot_commit_is_eagain_and_changes_nothing(boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ctx, _ino, ioas, _hwpt = preserved_vm(b)
    filler = b.guest(b"filler", 0)
    b.store.truncate(filler, b.store.statfs().free_pages * PS)  # no page left for iommu/lu-state
    assert errno_of(lambda: b.lu.reboot()) == errno.EAGAIN
    assert not b.lu.rebooted and list(b.lu.outgoing) == [b"vm0"]  # the session goes on, frozen as before
    assert ctx.ioas(ioas).frozen and _read_state(b.store) is None
    b.store.truncate(filler, 0)
    b.lu.reboot()  # and commits once there is room
    assert _read_state(b.store) is not None


# ------------------------------------------------------------ an unplanned restart (no reboot())


def test_an_unplanned_restart_keeps_an_iommufd_domain_translating_for_its_device(boots: list[Boot],
                                                                                  image: Path) -> None:
    b = boot(boots, image)
    vm(b)
    did, before = b.io.attached[RID], b.translations(RID)
    b.kill()  # the kernel died without a reboot(): no session, nothing dropped
    b2 = boot(boots, image)
    assert b2.io.attached[RID] == did and b2.translations(RID) == before
    assert b2.fd.orphaned(did)


def test_after_an_unplanned_restart_a_new_bind_replaces_the_left_domain_hitlessly_and_frees_it(
        boots: list[Boot], image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = boot(boots, image)
    vm(b)
    old, before = b.io.attached[RID], b.translations(RID)
    b.kill()
    b2 = boot(boots, image)
    switches: list[int] = []
    real_attach = b2.io.attach

    def attach(domain, bus, dev, fn, *, replace=False):  # type: ignore[no-untyped-def]
        switches.append(replace)
        return real_attach(domain, bus, dev, fn, replace=replace)

    monkeypatch.setattr(b2.io, "attach", attach)
    ctx = b2.fd.open_context()
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, b2.ino(b"vm0"), 0, 8 * MiB, 1 << 30, writeable=True)
    dev = ctx.device_bind(RID)  # not EBUSY: no iommufd and no session holds the domain it is on
    ctx.device_attach(dev, ioas)
    assert switches == [True]  # a replace: the context entry stayed present through the switch
    assert b2.io.attached[RID] != old and b2.translations(RID) == before
    assert any(d.domain_id == old for d in b2.fd.dying)  # freed once its grace period has passed
    b2.io.domains[old]._quiet_after = 0.0
    b2.fd.reap()
    assert old not in b2.io.domains
    b2.close()
    status, findings = fsck.check_image(image)
    assert status == 0 and not findings


def test_a_domain_the_administrator_attached_is_no_orphan_after_an_unplanned_restart(
        boots: list[Boot], image: Path) -> None:
    b = boot(boots, image)
    ino = b.guest(b"vm0", 8 * MiB)
    d = b.io.create_domain()  # made by `pkfuse iommu`, not for an iommufd HWPT
    d.map_file(ino, 0, 8 * MiB, 0, write=True)
    d.attach(0, 3, 0)
    b.kill()
    b2 = boot(boots, image)
    assert not b2.fd.orphaned(d.domain_id)
    assert errno_of(lambda: b2.fd.open_context().device_bind(RID)) == errno.EBUSY


def test_a_saved_copy_a_freeze_made_before_it_was_cut_is_freed_at_the_next_restore(boots: list[Boot],
                                                                                    image: Path) -> None:
    b = boot(boots, image)
    vm(b)
    copy = b.io.copy_domain(b.io.domains[b.io.attached[RID]])  # the freeze's copy (DOMF_SAVED) ...
    assert copy.flags & fmt.DOMF_SAVED
    b.kill()  # ... and the kill before its reboot() committed: no session will ever claim it
    b2 = boot(boots, image)
    assert copy.domain_id not in b2.io.domains
    assert any(f"domain {copy.domain_id} freed: a saved copy" in f for f in b2.findings)
    b2.close()
    status, findings = fsck.check_image(image)
    assert status == 0 and not findings
