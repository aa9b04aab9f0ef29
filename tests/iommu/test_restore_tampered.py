"""Preserved state tampered with between the kernels: refused with a finding, never adopted.

Every test freezes the same two VMs -- sessions ``vm0`` (requester 00:03.0)
and ``vm1`` (00:04.0), each a guest file mapped with 4 KiB leaves into its
own HWPT -- changes one thing in the image as garbage in persistent memory
would (a state edit is resealed with its checksum, so it reaches the checks
past it), starts the next kernel, and states what it must do: the session
the garbage reaches is refused with a finding that names the structure and
its image byte offset, its device is blocked as the hardware sees it, and
the other session is restored whole, translating what it did before; after
the boot fsck finds the image clean. Where the garbage reaches everything
(the state's header) every session is refused and every device blocked.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from iommu_helpers import Boot, device_view, entry_where

from backing import format as fmt
from backing import fsck, lustate, vtd
from backing.errors import Finding, StoreError
from backing.iommu import Iommu
from backing.iommufd import OPTION_HUGE_PAGES, OPTION_OP_SET
from backing.store import Store

MiB = 1 << 20
PS = fmt.PAGE_SIZE
RIDS = {b"vm0": 0x18, b"vm1": 0x20}  # 00:03.0, 00:04.0
IOVA = 1 << 30
SIZE = 4 * MiB
PROBES = IOVA + np.arange(0, SIZE, 64 * 1024, dtype=np.uint64)


@dataclasses.dataclass
class Frozen:
    """What the first kernel preserved, for the checks after the restart."""

    image: Path
    design: str
    did: dict[bytes, int]  #: session -> the domain its requester stays attached to
    ino: dict[bytes, int]  #: session -> its guest file
    seen: dict[bytes, list[int]]  #: session -> what its requester reached at PROBES

    def entry(self, name: bytes, iova: int, level: int) -> int:
        """u64 index in the image of the entry of ``name``'s domain translating ``iova`` at ``level``."""
        with Store.open(self.image, read_only=True) as s, Iommu.open(s) as io:
            return entry_where(s, io.domains[self.did[name]], iova, level)


@pytest.fixture
def image(make_image: Callable[..., Path]) -> Path:
    return make_image("64M")


@pytest.fixture
def design() -> str:
    """The domain design of both kernels (a test parametrizes it to change it)."""
    return "persistent"


@pytest.fixture
def frozen(image: Path, design: str) -> Iterator[Frozen]:
    b = Boot(image, design)
    ino = {}
    for name, rid in RIDS.items():
        ino[name] = b.guest(name, SIZE)
        ctx = b.fd.open_context()
        ioas = ctx.ioas_alloc()
        ctx.option(OPTION_HUGE_PAGES, OPTION_OP_SET, ioas, 0)  # 4 KiB leaves: one page, one entry
        ctx.ioas_map_file(ioas, ino[name], 0, SIZE, IOVA, writeable=True)
        dev = ctx.device_bind(rid)
        hwpt = ctx.hwpt_alloc(dev, ioas)
        ctx.device_attach(dev, hwpt)
        s = b.lu.create_session(name)
        b.lu.preserve_file(s, ino[name], 1)
        b.lu.preserve_hwpt(s, ctx, hwpt, 2)
    b.io.enable()
    state = b.lu.reboot()
    b.close()
    did = {sess.name: sess.hwpts[0].domain_id for sess in state.sessions}  # the saved copies, ephemeral
    seen = {name: device_view(image, rid, PROBES)[0] for name, rid in RIDS.items()}
    yield Frozen(image, design, did, ino, seen)


@pytest.fixture
def restart(frozen: Frozen) -> Iterator[Callable[[], Boot]]:
    """The next kernel (opened once, by the test, after its tampering); closed at teardown."""
    opened: list[Boot] = []

    def start() -> Boot:
        opened.append(Boot(frozen.image, frozen.design))
        return opened[-1]

    yield start
    for b in opened:
        if not b.closed:
            b.close()


def blocked(image: Path, name: bytes) -> bool:
    _phys, faults = device_view(image, RIDS[name], PROBES)
    return faults == [fmt.FR_CONTEXT_NOT_PRESENT] * PROBES.size


def assert_refused_alone(b: Boot, frozen: Frozen, name: bytes, structure: str, offset: int | None = None) -> Finding:
    """``name`` refused at ``structure`` (and ``offset``), blocked and freed; the other whole; fsck clean."""
    other = next(n for n in RIDS if n != name)
    finding = b.lu.refused.get(name)
    assert finding is not None, b.findings
    assert finding.structure == structure, finding
    if offset is not None:
        assert finding.offset == offset, finding
    assert list(b.lu.incoming) == [other] and list(b.lu.refused) == [name]
    with pytest.raises(StoreError) as e:
        b.lu.retrieve_session(name)
    assert e.value.errno == errno.ENOENT  # never adopted: nothing to retrieve
    assert RIDS[name] not in b.io.attached and blocked(frozen.image, name)
    assert device_view(frozen.image, RIDS[other], PROBES)[0] == frozen.seen[other]
    assert b.io.attached[RIDS[other]] == frozen.did[other]
    b.close()
    assert fsck.check_image(frozen.image) == (0, [])
    return finding


def edit_state(image: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Change records of ``iommu/lu-state`` in place (``edit`` gets the header and each record
    array as writable views, by name) and reseal its checksum."""
    with Store.open(image) as s:
        ino = s.lookup(s.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
        pages = s.image_pages(ino)
        size = s.getattr(ino).size
        raw = bytearray(s.image.reshape(-1, PS)[pages].tobytes()[:size])
        edit(lustate.record_views(raw))
        lustate.seal(raw)
        buf = np.zeros(pages.size * PS, np.uint8)
        buf[:size] = np.frombuffer(bytes(raw), np.uint8)
        s.image.reshape(-1, PS)[pages] = buf.reshape(-1, PS)


def record_offset(image: Path, array: str, index: int, field: str) -> int:
    """The image byte offset of ``array[index].field`` of the committed state."""
    with Store.open(image, read_only=True) as s:
        ino = s.lookup(s.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
        state = lustate.decode(s.read(ino, 0, s.getattr(ino).size))
        pages = s.image_pages(ino)
    _, off = state.where(array, index, field)
    return int(pages[off // PS]) * PS + off % PS


def poke(image: Path, where: int, value: int) -> None:
    """Store ``value`` at u64 index ``where`` of the image."""
    with Store.open(image) as s:
        s.image_u64[where] = np.uint64(value)


def phys_of(image: Path, ino: int, offset: int = 0) -> int:
    with Store.open(image, read_only=True) as s:
        e = s.extents(ino)[0]
        return e.phys_addr + offset


# ------------------------------------------------------ the domain's tables


@pytest.mark.parametrize("design", ["persistent", "ephemeral"])
def test_a_leaf_into_another_vms_file_refuses_that_session_at_the_leaf(frozen: Frozen, restart) -> None:
    where = frozen.entry(b"vm0", IOVA, 3)
    poke(frozen.image, where, vtd.leaf_entry(3, phys_of(frozen.image, frozen.ino[b"vm1"]), True))
    f = assert_refused_alone(restart(), frozen, b"vm0", f"iommu/dom-{frozen.did[b'vm0']} SL-PTE", where * 8)
    assert "does not translate what was preserved" in f.problem


@pytest.mark.parametrize("target", ["metadata", "a free page", "outside the image", "the state file"])
def test_a_leaf_to_anything_but_guest_ram_refuses_the_domain_at_open(frozen: Frozen, restart, target: str) -> None:
    with Store.open(frozen.image, read_only=True) as s:
        g = s.geometry
        state = s.lookup(s.lookup(fmt.ROOT_INO, fmt.IOMMU_DIR_NAME), fmt.LU_STATE_NAME)
        page = {"metadata": 1, "a free page": g.npages - 1, "outside the image": g.npages + 5,
                "the state file": int(s.image_pages(state)[0])}[target]
        if target == "a free page":
            assert s.page_owner(np.array([page]))[0][0] == 0
        phys = (g.base_pfn + page) << fmt.PAGE_SHIFT
    where = frozen.entry(b"vm0", IOVA + 7 * PS, 3)
    poke(frozen.image, where, vtd.leaf_entry(3, phys, True))
    record = record_offset(frozen.image, "hwpts", 0, "domain_id")
    b = restart()
    did = frozen.did[b"vm0"]
    [dom] = [f for f in b.io.refused if f.structure.startswith(f"iommu/dom-{did} ")]
    assert (dom.structure, dom.offset) == (f"iommu/dom-{did} SL-PTE", where * 8)
    assert "not all guest RAM" in dom.problem or "outside the image" in dom.problem
    f = assert_refused_alone(b, frozen, b"vm0", "iommu/lu-state hwpts[0].domain_id", record)
    assert "refused at open" in f.problem


@pytest.mark.parametrize("into", ["the other domain's table", "a guest page", "its own table (a loop)"])
def test_a_table_pointer_out_of_the_domains_pool_refuses_the_domain_at_open(frozen: Frozen, restart,
                                                                            into: str) -> None:
    pde = frozen.entry(b"vm0", IOVA, 2)  # the SL-PDE pointing at vm0's page table
    with Store.open(frozen.image, read_only=True) as s:
        g = s.geometry
        table = {"the other domain's table": frozen.entry(b"vm1", IOVA, 3) // 512,
                 "a guest page": phys_of(frozen.image, frozen.ino[b"vm0"]) // PS - g.base_pfn,
                 "its own table (a loop)": pde // 512}[into]
        phys = (g.base_pfn + table) << fmt.PAGE_SHIFT
    poke(frozen.image, pde, vtd.table_entry(phys))
    b = restart()
    did = frozen.did[b"vm0"]
    [dom] = [f for f in b.io.refused if f.structure.startswith(f"iommu/dom-{did} ")]
    assert (dom.structure, dom.offset) == (f"iommu/dom-{did} SL-PDE", pde * 8), dom
    assert_refused_alone(b, frozen, b"vm0", "iommu/lu-state hwpts[0].domain_id")


@pytest.mark.parametrize(("level", "bit", "name"), [(0, fmt.SL_W, "SL-PML4E"), (2, fmt.SL_R, "SL-PDE"),
                                                      (3, fmt.SL_R, "SL-PTE")])
def test_an_entry_lacking_a_right_pkfuse_always_sets_refuses_the_domain_at_open(frozen: Frozen, restart, level: int,
                                                                               bit: int, name: str) -> None:
    # found by `pkfuse fuzz --target sessions`: a PML4E without W made every leaf below read-only, and the
    # restore (comparing leaves alone) adopted a domain that no longer translated what was preserved
    where = frozen.entry(b"vm0", IOVA, level)
    with Store.open(frozen.image) as s:
        s.image_u64[where] ^= np.uint64(bit)
    b = restart()
    did = frozen.did[b"vm0"]
    [dom] = [f for f in b.io.refused if f.structure.startswith(f"iommu/dom-{did} ")]
    assert (dom.structure, dom.offset) == (f"iommu/dom-{did} {name}", where * 8) and "lacks a right" in dom.problem
    assert_refused_alone(b, frozen, b"vm0", "iommu/lu-state hwpts[0].domain_id")


# ------------------------------------------------------------ the state's records


def _vm0(v: dict[str, np.ndarray]) -> int:
    return [bytes(n) for n in v["sessions"]["name"]].index(b"vm0")


STATE_EDITS: dict[str, tuple[Callable[[dict[str, np.ndarray]], None], str]] = {
    "a file inode that is free": (lambda v: v["files"]["ino"].__setitem__(0, 40), "files[0].ino"),
    "a file of another generation": (lambda v: v["files"]["igen"].__setitem__(0, v["files"]["igen"][0] + 1),
                                     "files[0].ino"),
    "a file size that is not the file's": (lambda v: v["files"]["size"].__setitem__(0, SIZE * 2), "files[0].size"),
    "a domain that does not exist": (lambda v: v["hwpts"]["domain_id"].__setitem__(0, 999), "hwpts[0].domain_id"),
    "a map of a file not in the session": (lambda v: v["maps"]["ino"].__setitem__(0, v["files"]["ino"][1]),
                                           "maps[0].ino"),
    "a map past its file's end": (lambda v: v["maps"]["length"].__setitem__(0, SIZE + PS), "maps[0].length"),
    # the domain maps IOVA, which the state says nothing maps: named at the domain's leaf
    "a map at another iova": (lambda v: v["maps"]["iova"].__setitem__(0, IOVA + 2 * MiB), "dom-{vm0} SL-PTE"),
    "a map below the domain's": (lambda v: v["maps"]["iova"].__setitem__(0, IOVA - 2 * MiB), "maps[0].iova"),
    "a map shorter than the domain's": (lambda v: v["maps"]["length"].__setitem__(0, SIZE - PS),
                                        "dom-{vm0} SL-PTE"),
    "a map read-only where the domain writes": (lambda v: v["maps"]["flags"].__setitem__(0, 0), "dom-{vm0} SL-PTE"),
    "a requester not attached to the domain": (lambda v: v["devices"]["rid"].__setitem__(0, 0x28),
                                               "devices[0].rid"),
}


@pytest.mark.parametrize("case", list(STATE_EDITS))
def test_a_state_record_that_does_not_resolve_refuses_its_session_at_the_record(frozen: Frozen, restart,
                                                                                case: str) -> None:
    edit, field = STATE_EDITS[case]
    edit_state(frozen.image, lambda v: (_check_first_is_vm0(v), edit(v)))
    if field.startswith("dom-"):
        structure = f"iommu/{field.format(vm0=frozen.did[b'vm0'])}"
        offset = None
    else:
        array, rest = field.split("[", 1)
        index, attr = int(rest.split("]")[0]), rest.split(".", 1)[1]
        structure, offset = f"iommu/lu-state {field}", record_offset(frozen.image, array, index, attr)
    assert_refused_alone(restart(), frozen, b"vm0", structure, offset)


def _check_first_is_vm0(v: dict[str, np.ndarray]) -> None:
    assert _vm0(v) == 0 and int(v["sessions"]["file_first"][0]) == 0  # the edits name vm0's records by index


def test_a_file_claimed_by_a_second_session_refuses_the_second(frozen: Frozen, restart) -> None:
    def claim(v: dict[str, np.ndarray]) -> None:  # vm1's file record names vm0's file, maps and all
        v["files"][1] = v["files"][0]
        v["maps"]["ino"][1], v["maps"]["igen"][1] = v["files"]["ino"][0], v["files"]["igen"][0]

    edit_state(frozen.image, claim)
    offset = record_offset(frozen.image, "files", 1, "ino")
    f = assert_refused_alone(restart(), frozen, b"vm1", "iommu/lu-state files[1].ino", offset)
    assert "earlier session" in f.problem


def test_a_requester_claimed_by_a_second_session_refuses_the_second(frozen: Frozen, restart) -> None:
    edit_state(frozen.image, lambda v: v["devices"]["rid"].__setitem__(1, RIDS[b"vm0"]))
    offset = record_offset(frozen.image, "devices", 1, "rid")
    f = assert_refused_alone(restart(), frozen, b"vm1", "iommu/lu-state devices[1].rid", offset)
    assert "twice" in f.problem


def test_a_domain_claimed_by_a_second_session_refuses_the_second(frozen: Frozen, restart) -> None:
    edit_state(frozen.image, lambda v: v["hwpts"]["domain_id"].__setitem__(1, frozen.did[b"vm0"]))
    offset = record_offset(frozen.image, "hwpts", 1, "domain_id")
    b = restart()
    assert b.lu.refused[b"vm1"].structure == "iommu/lu-state hwpts[1].domain_id"
    assert b.lu.refused[b"vm1"].offset == offset and "preserved twice" in b.lu.refused[b"vm1"].problem
    # vm1's own domain is now no session's: freed at restore with vm1 refused, its device blocked
    assert list(b.lu.incoming) == [b"vm0"] and blocked(frozen.image, b"vm1")
    assert device_view(frozen.image, RIDS[b"vm0"], PROBES)[0] == frozen.seen[b"vm0"]
    b.close()
    assert fsck.check_image(frozen.image) == (0, [])


@pytest.mark.parametrize("count", ["nmaps", "nfiles", "nsessions"])
def test_a_huge_count_refuses_the_whole_state_and_blocks_every_device(frozen: Frozen, restart, count: str) -> None:
    edit_state(frozen.image, lambda v: v["header"][count].__setitem__(0, 0xFFFF_FFFF))
    b = restart()
    assert b.lu.state_refused is not None and b.lu.state_refused.structure == f"iommu/lu-state header.{count}"
    assert b.lu.incoming == {} and all(blocked(frozen.image, n) for n in RIDS)
    assert not set(frozen.did.values()) & set(b.io.domains)  # no record can say whose they are: freed
    b.close()
    assert fsck.check_image(frozen.image) == (0, [])


# ------------------------------------------------------------ root and context entries


@pytest.mark.parametrize("garbage", ["reserved bits", "translation type", "address width", "an unknown SLPTPTR"])
def test_a_tampered_context_entry_is_blocked_and_refuses_its_session(frozen: Frozen, restart, garbage: str) -> None:
    with Store.open(frozen.image) as s, Iommu.open(s) as io:
        sid = RIDS[b"vm0"]
        lo_where = int(io.root_pages[1]) * 512 + (sid & 0xFF) * 2
        lo, hi = int(s.image_u64[lo_where]), int(s.image_u64[lo_where + 1])
        unknown = (s.geometry.base_pfn + s.geometry.npages - 2) << fmt.PAGE_SHIFT
        lo, hi = {"reserved bits": (lo | 1 << 7, hi), "translation type": (lo | 2 << 2, hi),
                  "address width": (lo, hi & ~7 | 4),
                  "an unknown SLPTPTR": (lo & ~fmt.CE_LO_SLPTPTR_MASK | unknown, hi)}[garbage]
        s.image_u64[lo_where + 1], s.image_u64[lo_where] = hi, lo
    b = restart()
    [entry] = [f for f in b.io.refused if "context entry 00:03.0" in f.structure]
    assert entry.offset == lo_where * 8 and "blocked" in entry.problem
    assert_refused_alone(b, frozen, b"vm0", "iommu/lu-state devices[0].rid")


def test_a_context_entry_copied_into_another_requesters_slot_blocks_that_requester(frozen: Frozen, restart) -> None:
    # found by `pkfuse fuzz --target sessions`: 00:03.0 (vm0's) got vm1's context entry, and vm1, restored,
    # kept it attached: vm0's device could DMA into vm1's memory
    with Store.open(frozen.image) as s, Iommu.open(s) as io:
        ct = int(io.root_pages[1]) * 512
        src, dst = ct + (RIDS[b"vm1"] & 0xFF) * 2, ct + (RIDS[b"vm0"] & 0xFF) * 2
        s.image_u64[dst : dst + 2] = s.image_u64[src : src + 2]
    b = restart()
    [entry] = [f for f in b.io.refused if "context entry 00:03.0" in f.structure]
    assert entry.offset == dst * 8 and "did not preserve it" in entry.problem
    assert_refused_alone(b, frozen, b"vm0", "iommu/lu-state devices[0].rid")  # its device is blocked, not vm1's


def test_a_root_entry_pointing_elsewhere_is_rewritten_and_both_sessions_live(frozen: Frozen, restart) -> None:
    with Store.open(frozen.image) as s, Iommu.open(s) as io:
        root = int(io.root_pages[0]) * 512
        s.image_u64[root] = np.uint64(vtd.root_entry(io.store.geometry.phys_addr(int(io.root_pages[9])))[0])
    b = restart()
    assert [f.structure for f in b.io.refused] == ["iommu/root-pgtables root entry 00"]
    assert sorted(b.lu.incoming) == sorted(RIDS) and b.lu.refused == {}
    assert all(device_view(frozen.image, rid, PROBES)[0] == frozen.seen[n] for n, rid in RIDS.items())
    b.close()
    assert fsck.check_image(frozen.image) == (0, [])


def test_a_context_entry_on_a_bus_without_a_root_entry_is_cleared_before_it_can_go_live(
        frozen: Frozen, restart) -> None:
    with Store.open(frozen.image) as s, Iommu.open(s) as io:
        src = int(io.root_pages[1]) * 512 + (RIDS[b"vm0"] & 0xFF) * 2
        dst = int(io.root_pages[1 + 5]) * 512 + 2 * 2  # 05:00.2, a bus nothing is attached on
        s.image_u64[dst : dst + 2] = s.image_u64[src : src + 2]
    b = restart()
    assert any("context entry 05:00.2" in f.structure and f.offset == dst * 8 for f in b.io.refused)
    assert 0x502 not in b.io.attached and sorted(b.lu.incoming) == sorted(RIDS)
    b.close()
    assert fsck.check_image(frozen.image) == (0, [])
