"""The iommufd object model (backing.iommufd): IOAS, HWPT, devices, with the kernel's errnos.

Each test drives the kernel layer directly (no socket) and checks what the
hardware would see: the domains' translations, the context entries, the pins.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backing import format as fmt
from backing import fsck, vtd
from backing.errors import StoreError
from backing.iommu import Iommu
from backing.iommufd import (
    OPTION_HUGE_PAGES,
    OPTION_OP_GET,
    OPTION_OP_SET,
    OPTION_RLIMIT_MODE,
    U64_MAX,
    Context,
    Iommufd,
)
from backing.store import Store

MiB = 1 << 20
GiB = 1 << 30
PS = fmt.PAGE_SIZE
RID = (0 << 8) | (3 << 3) | 0  # 00:03.0
RID2 = (0 << 8) | (4 << 3) | 0  # 00:04.0


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("256M")


@pytest.fixture
def kernel(store: Store, io: Iommu) -> Iterator[Iommufd]:
    k = Iommufd(store, io)
    yield k
    k.close()


@pytest.fixture
def ctx(kernel: Iommufd) -> Context:
    return kernel.open_context()


def guest(store: Store, name: bytes, size: int) -> int:
    ino = store.create(store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME), name, 0o644, 0, 0)
    store.truncate(ino, size)
    return ino


def phys_of(store: Store, ino: int, offset: int) -> int:
    e = next(e for e in store.extents(ino) if e.file_offset <= offset < e.file_offset + e.length)
    return e.phys_addr + offset - e.file_offset


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(StoreError) as exc:
        fn()
    return exc.value.errno


def attached_vm(store: Store, ctx: Context, size: int = 8 * MiB) -> tuple[int, int, int, int, int]:
    """vm0 mapped at IOVA 0 in an IOAS, a device bound and attached: (ino, ioas, dev, hwpt, size)."""
    ino = guest(store, b"vm0", size)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, size, 0, writeable=True)
    dev = ctx.device_bind(RID)
    hwpt = ctx.device_attach(dev, ioas)
    return ino, ioas, dev, hwpt, size


# ------------------------------------------------------------------ IOAS


def test_ioas_ids_start_at_one_and_are_not_reused(ctx: Context) -> None:
    a, b = ctx.ioas_alloc(), ctx.ioas_alloc()
    assert (a, b) == (1, 2)
    ctx.destroy(b)
    assert ctx.ioas_alloc() == 3


def test_map_without_fixed_iova_aligns_for_superpages(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, PS, 0, writeable=True)  # something at 0 to step over
    iova = ctx.ioas_map_file(ioas, ino, 2 * MiB, 2 * MiB, None, writeable=True)
    assert iova % (2 * MiB) == phys_of(store, ino, 2 * MiB) % (2 * MiB)
    assert iova >= PS


@pytest.mark.parametrize("length", [PS, 2 * MiB, 4 * MiB])
def test_an_automatic_iova_is_never_zero(store: Store, ctx: Context, length: int) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()  # empty: IOVA 0 is free, and congruent to any 4 KiB-aligned address mod 4 KiB
    iova = ctx.ioas_map_file(ioas, ino, 0, length, None, writeable=True)
    align = min(length, 2 * MiB)
    assert iova != 0 and iova % align == phys_of(store, ino, 0) % align


def test_fixed_iova_over_an_existing_map_is_eexist_and_changes_nothing(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, 2 * MiB, 0, writeable=True)
    assert errno_of(lambda: ctx.ioas_map_file(ioas, ino, 2 * MiB, 2 * MiB, MiB, writeable=True)) == errno.EEXIST
    assert len(ctx.ioas(ioas).areas) == 1


@pytest.mark.parametrize(("start", "length", "iova", "code"), [
    (0, 0, 0, errno.EINVAL),  # zero length
    (1, PS, 0, errno.EINVAL),  # unaligned start
    (0, PS + 1, 0, errno.EINVAL),  # unaligned length
    (0, PS, 3, errno.EINVAL),  # unaligned iova
    (0, 8 * MiB, 0, errno.EINVAL),  # beyond the file
    (0, 2 * PS, (1 << 48) - PS, errno.EINVAL),  # beyond the 48-bit IOVA space
    (U64_MAX - PS + 1, 2 * PS, 0, errno.EOVERFLOW),  # start + length wraps
    (0, 2 * PS, U64_MAX - PS + 1, errno.EOVERFLOW),  # iova + length wraps
    (0, U64_MAX, 0, errno.EOVERFLOW),  # ioas.c: a length of U64_MAX is EOVERFLOW, not "unaligned"
    (U64_MAX - PS + 1, PS, 0, errno.EINVAL),  # the last byte is U64_MAX: no wrap, but beyond the file
])
def test_map_file_refuses_bad_ranges_with_the_kernels_errno(
    store: Store, ctx: Context, start: int, length: int, iova: int, code: int
) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    assert errno_of(lambda: ctx.ioas_map_file(ioas, ino, start, length, iova, writeable=True)) == code
    assert ctx.ioas(ioas).areas == [] and not store.pin_hook(ino)


def test_map_file_overflow_is_eoverflow_before_the_ioas_is_looked_up(ctx: Context) -> None:
    assert errno_of(lambda: ctx.ioas_map_file(99, 1, 0, PS, U64_MAX, writeable=True)) == errno.EOVERFLOW
    assert errno_of(lambda: ctx.ioas_map_file(99, 1, 0, U64_MAX, None, writeable=True)) == errno.EOVERFLOW
    assert errno_of(lambda: ctx.ioas_map_file(99, 1, 0, PS, 0, writeable=True)) == errno.ENOENT


def test_map_file_of_a_directory_is_einval(store: Store, ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    top = store.lookup(fmt.ROOT_INO, fmt.GUEST_DIR_NAME)
    assert errno_of(lambda: ctx.ioas_map_file(ioas, top, 0, PS, 0, writeable=True)) == errno.EINVAL


def test_a_mapped_file_is_pinned_without_any_hwpt(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, 4 * MiB, 0, writeable=True)
    assert errno_of(lambda: store.truncate(ino, 0)) == errno.EBUSY
    ctx.ioas_unmap(ioas, 0, 4 * MiB)
    store.truncate(ino, 0)


def test_unmap_that_cuts_a_map_is_enoent(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, 4 * MiB, 0, writeable=True)
    assert errno_of(lambda: ctx.ioas_unmap(ioas, 0, 2 * MiB)) == errno.ENOENT
    assert len(ctx.ioas(ioas).areas) == 1


def test_unmap_of_nothing_is_enoent_but_unmap_all_of_nothing_succeeds(ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    assert errno_of(lambda: ctx.ioas_unmap(ioas, 0, MiB)) == errno.ENOENT
    assert ctx.ioas_unmap(ioas, 0, U64_MAX) == 0


@pytest.mark.parametrize(("iova", "length"), [(1, U64_MAX), (PS, U64_MAX), (U64_MAX, 1), (U64_MAX, 0)])
def test_unmap_with_u64_max_other_than_unmap_all_is_eoverflow_and_unmaps_nothing(
    store: Store, ctx: Context, iova: int, length: int
) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, MiB, 2 * MiB, writeable=True)
    assert errno_of(lambda: ctx.ioas_unmap(ioas, iova, length)) == errno.EOVERFLOW
    assert len(ctx.ioas(ioas).areas) == 1


def test_unmap_of_a_superset_removes_every_whole_map_inside(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, MiB, 0, writeable=True)
    ctx.ioas_map_file(ioas, ino, MiB, MiB, 4 * MiB, writeable=False)
    assert ctx.ioas_unmap(ioas, 0, 16 * MiB) == 2 * MiB
    assert ctx.ioas(ioas).areas == []


def test_iova_ranges_are_the_48_bit_space_in_pages(ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    assert ctx.ioas_iova_ranges(ioas) == ([(0, (1 << 48) - 1)], PS)


# ------------------------------------------------------------------ IOMMU_OPTION


def leaf_pages(ctx: Context, hwpt: int) -> set[int]:
    """The sizes, in 4 KiB pages, of the leaves of a HWPT's domain, as its tables hold them."""
    levels, problems = ctx.hwpt(hwpt).domain.walk()
    assert not problems
    return set(vtd.leaf_ranges(levels)[2].tolist())


def test_huge_pages_off_maps_every_leaf_4k_and_on_uses_superpages(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 8 * MiB)
    assert phys_of(store, ino, 0) % (2 * MiB) == 0  # the allocator's 2 MiB alignment: superpages possible
    dev = ctx.device_bind(RID)
    hwpts = {}
    for huge in (1, 0):
        ioas = ctx.ioas_alloc()
        assert ctx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas, 7) == 1  # the default
        assert ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, huge) == huge
        assert ctx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas, 0) == huge
        hwpts[huge] = ctx.hwpt_alloc(dev, ioas)
        ctx.ioas_map_file(ioas, ino, 0, 8 * MiB, 0, writeable=True)
        d = ctx.hwpt(hwpts[huge]).domain
        assert d.translate_soft(5 * MiB + 3 * PS) == phys_of(store, ino, 5 * MiB + 3 * PS)
    assert leaf_pages(ctx, hwpts[1]) == {512}
    assert leaf_pages(ctx, hwpts[0]) == {1}
    assert ctx.hwpt(hwpts[0]).domain.table_pages == 1 + 1 + 1 + 4  # PML4, PDPT, PD and a PT per 2 MiB


def test_huge_pages_off_after_a_map_into_a_hwpt_is_einval_before_one_is_allowed(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    dev = ctx.device_bind(RID)
    ioas = ctx.ioas_alloc()
    ctx.ioas_map_file(ioas, ino, 0, 4 * MiB, 0, writeable=True)
    ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)  # areas but no HWPT: nothing is in superpages yet
    hwpt = ctx.hwpt_alloc(dev, ioas)  # made after: maps the areas with 4 KiB leaves
    assert leaf_pages(ctx, hwpt) == {1}
    ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 1)  # on again: always allowed
    assert errno_of(lambda: ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)) == errno.EINVAL
    assert ctx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas, 0) == 1


def test_option_refusals_are_the_kernels_errnos(ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    assert errno_of(lambda: ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 2)) == errno.EINVAL
    assert errno_of(lambda: ctx.option(OPTION_HUGE_PAGES, 2, ioas, 0)) == errno.EOPNOTSUPP
    assert errno_of(lambda: ctx.option(9, OPTION_OP_GET, ioas, 0)) == errno.EOPNOTSUPP
    assert errno_of(lambda: ctx.option(OPTION_HUGE_PAGES, OPTION_OP_GET, ioas + 1, 0)) == errno.ENOENT
    assert errno_of(lambda: ctx.option(OPTION_RLIMIT_MODE, OPTION_OP_GET, ioas, 0)) == errno.EOPNOTSUPP
    assert ctx.option(OPTION_RLIMIT_MODE, OPTION_OP_SET, 0, 1) == 1
    assert ctx.option(OPTION_RLIMIT_MODE, OPTION_OP_GET, 0, 0) == 1


# ------------------------------------------------------------------ HWPT


def test_every_map_is_mirrored_into_every_hwpt_of_the_ioas(store: Store, ctx: Context) -> None:
    ino = guest(store, b"vm0", 8 * MiB)
    ioas = ctx.ioas_alloc()
    dev = ctx.device_bind(RID)
    h1 = ctx.hwpt_alloc(dev, ioas)
    ctx.ioas_map_file(ioas, ino, 0, 4 * MiB, 0, writeable=True)
    h2 = ctx.hwpt_alloc(dev, ioas)  # made after the map: gets it too
    ctx.ioas_map_file(ioas, ino, 4 * MiB, 4 * MiB, GiB, writeable=False)
    for h in (h1, h2):
        d = ctx.hwpt(h).domain
        assert d.translate_soft(PS) == phys_of(store, ino, PS)
        assert d.translate_soft(GiB + 5 * PS) == phys_of(store, ino, 4 * MiB + 5 * PS)
        assert [m.write for m in d.mappings()] == [True, False]


def test_a_map_that_fails_in_the_second_domain_leaves_the_first_as_it_was(
    store: Store, ctx: Context
) -> None:
    ino = guest(store, b"vm0", 4 * MiB)
    ioas = ctx.ioas_alloc()
    dev = ctx.device_bind(RID)
    h1, h2 = ctx.hwpt_alloc(dev, ioas), ctx.hwpt_alloc(dev, ioas)
    d2 = ctx.hwpt(h2).domain
    d2.map_file(ino, 0, PS, 0)  # behind the IOAS's back: the second domain will refuse IOVA 0
    pins = dict(ctx.hwpt(h1).domain.pins)
    assert errno_of(lambda: ctx.ioas_map_file(ioas, ino, 0, 2 * MiB, 0, writeable=True)) == errno.EEXIST
    assert ctx.hwpt(h1).domain.mappings() == [] and ctx.hwpt(h1).domain.pins == pins
    assert ctx.ioas(ioas).areas == []


def test_hwpt_alloc_needs_a_bound_device_and_an_ioas(store: Store, ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    assert errno_of(lambda: ctx.hwpt_alloc(99, ioas)) == errno.ENOENT
    dev = ctx.device_bind(RID)
    # hw_pagetable.c: a pt_id that names nothing, or not a page table, is EINVAL (not ENOENT)
    assert errno_of(lambda: ctx.hwpt_alloc(dev, 99)) == errno.EINVAL
    assert errno_of(lambda: ctx.hwpt_alloc(dev, dev)) == errno.EINVAL
    h = ctx.hwpt_alloc(dev, ioas)
    assert errno_of(lambda: ctx.hwpt_alloc(dev, h)) == errno.EOPNOTSUPP  # nesting, without driver data
    assert ctx.statistics() == {"ioas": 1, "hwpt": 1, "device": 1}


def test_attach_to_a_device_id_is_einval_and_to_no_object_enoent(ctx: Context) -> None:
    ctx.ioas_alloc()
    dev = ctx.device_bind(RID)
    assert errno_of(lambda: ctx.device_attach(dev, dev)) == errno.EINVAL  # device.c: not an IOAS or a HWPT
    assert errno_of(lambda: ctx.device_attach(dev, 99)) == errno.ENOENT
    assert ctx.device(dev).hwpt is None


# --------------------------------------------------------------- devices


def test_attach_to_an_ioas_makes_an_automatic_hwpt_the_hardware_translates_through(
    store: Store, io: Iommu, ctx: Context
) -> None:
    ino, _ioas, _dev, hwpt, _ = attached_vm(store, ctx)
    io.enable()
    phys, _faults = io.translate(0, 3, 0, [0, 5 * PS])
    assert phys.tolist() == [phys_of(store, ino, 0), phys_of(store, ino, 5 * PS)]
    assert io.attached[RID] == ctx.hwpt(hwpt).domain.domain_id


def test_a_second_device_on_the_same_ioas_shares_the_automatic_hwpt(store: Store, ctx: Context) -> None:
    _ino, ioas, _dev, hwpt, _ = attached_vm(store, ctx)
    dev2 = ctx.device_bind(RID2)
    assert ctx.device_attach(dev2, ioas) == hwpt


def test_binding_a_requester_twice_is_ebusy_also_from_another_context(kernel: Iommufd, ctx: Context) -> None:
    ctx.device_bind(RID)
    assert errno_of(lambda: ctx.device_bind(RID)) == errno.EBUSY
    assert errno_of(lambda: kernel.open_context().device_bind(RID)) == errno.EBUSY


def test_binding_a_requester_the_kernel_attached_offline_is_ebusy(io: Iommu, ctx: Context) -> None:
    io.create_domain(7).attach(0, 3, 0)
    assert errno_of(lambda: ctx.device_bind(RID)) == errno.EBUSY


def test_reattach_replaces_the_domain_and_drops_the_old_automatic_hwpt(store: Store, io: Iommu,
                                                                         ctx: Context) -> None:
    ino, ioas, dev, auto, size = attached_vm(store, ctx)
    h = ctx.hwpt_alloc(dev, ioas)
    assert ctx.device_attach(dev, h) == h
    assert io.attached[RID] == ctx.hwpt(h).domain.domain_id
    assert errno_of(lambda: ctx.hwpt(auto)) == errno.ENOENT


def test_detach_blocks_dma_and_a_second_detach_is_a_no_op(store: Store, io: Iommu, ctx: Context) -> None:
    _ino, _ioas, dev, _hwpt, _ = attached_vm(store, ctx)
    ctx.device_detach(dev)
    assert RID not in io.attached
    ctx.device_detach(dev)
    io.enable()
    _phys, faults = io.translate(0, 3, 0, [0])
    assert faults.tolist() != [0]


def test_objects_of_another_context_are_enoent(kernel: Iommufd, ctx: Context) -> None:
    ioas = ctx.ioas_alloc()
    other = kernel.open_context()
    other.ioas_alloc()  # id 1 exists there too, but it is other's own
    assert errno_of(lambda: other.destroy(ioas + 1)) == errno.ENOENT
    assert errno_of(lambda: other.ioas_unmap(ioas + 5, 0, PS)) == errno.ENOENT


# --------------------------------------------------------------- destroy


def test_destroy_refuses_whatever_is_in_use(store: Store, ctx: Context) -> None:
    _ino, ioas, dev, hwpt, _ = attached_vm(store, ctx)
    assert errno_of(lambda: ctx.destroy(ioas)) == errno.EBUSY
    assert errno_of(lambda: ctx.destroy(hwpt)) == errno.EBUSY
    assert errno_of(lambda: ctx.destroy(dev)) == errno.EBUSY
    ctx.device_detach(dev)  # the automatic HWPT goes with its last device
    ctx.destroy(ioas)
    ctx.destroy(dev)
    assert ctx.objects == {}


def test_a_destroyed_domain_is_freed_after_the_grace_period(store: Store, io: Iommu, kernel: Iommufd,
                                                           ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    _ino, ioas, dev, hwpt, _ = attached_vm(store, ctx)
    did = ctx.hwpt(hwpt).domain.domain_id
    ctx.device_detach(dev)
    assert did in io.domains and kernel.dying  # a walk may still be inside it
    monkeypatch.setattr("backing.iommu.time.monotonic", lambda: 1e12)
    assert kernel.reap() == 0.0
    assert did not in io.domains and kernel.dying == []


# ----------------------------------------------------------------- close


def test_closing_a_context_releases_everything_and_fsck_is_clean(
    store: Store, io: Iommu, kernel: Iommufd, ctx: Context, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ino, *_ = attached_vm(store, ctx)
    ctx.close()
    assert RID not in io.attached and RID not in kernel.bound and ctx.objects == {}
    assert store.pin_hook(ino)  # the dying domain still maps it until its grace period ends
    monkeypatch.setattr("backing.iommu.time.monotonic", lambda: 1e12)
    kernel.reap()
    assert io.domains == {} and not store.pin_hook(ino)
    store.truncate(ino, 0)
    status, findings = fsck.check_image(str(image))
    assert status == 0, findings
