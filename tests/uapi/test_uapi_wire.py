"""The wire structures against the kernel headers, and the kernel's rules for reading them (decode)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from pkfuse.uapi import wire as w

# Offsets as a C compiler lays out the headers' structs on x86-64 (every
# __u32 4-aligned, every __aligned_u64 8-aligned), field by field in header
# order: iommufd.h and vfio.h (torvalds/linux), liveupdate.h (@16cec0d2), the
# unmerged live-update series' iommu_hwpt_lu_set_preserve, pkfuse's own.
LAYOUTS: dict[type[ctypes.Structure], tuple[int, list[tuple[str, int]]]] = {
    w.iommu_destroy: (8, [("size", 0), ("id", 4)]),
    w.iommu_ioas_alloc: (12, [("size", 0), ("flags", 4), ("out_ioas_id", 8)]),
    w.iommu_iova_range: (16, [("start", 0), ("last", 8)]),
    w.iommu_ioas_iova_ranges: (
        32,
        [("size", 0), ("ioas_id", 4), ("num_iovas", 8), ("__reserved", 12), ("allowed_iovas", 16),
         ("out_iova_alignment", 24)],
    ),
    w.iommu_ioas_map_file: (
        40,
        [("size", 0), ("flags", 4), ("ioas_id", 8), ("fd", 12), ("start", 16), ("length", 24), ("iova", 32)],
    ),
    w.iommu_ioas_unmap: (24, [("size", 0), ("ioas_id", 4), ("iova", 8), ("length", 16)]),
    w.iommu_option: (
        24, [("size", 0), ("option_id", 4), ("op", 8), ("__reserved", 10), ("object_id", 12), ("val64", 16)],
    ),
    w.iommu_hwpt_alloc: (
        48,
        [("size", 0), ("flags", 4), ("dev_id", 8), ("pt_id", 12), ("out_hwpt_id", 16), ("__reserved", 20),
         ("data_type", 24), ("data_len", 28), ("data_uptr", 32), ("fault_id", 40), ("__reserved2", 44)],
    ),
    w.iommu_hwpt_lu_set_preserve: (12, [("size", 0), ("hwpt_id", 4), ("hwpt_token", 8)]),
    w.vfio_device_bind_iommufd: (
        24,
        [("argsz", 0), ("flags", 4), ("iommufd", 8), ("out_devid", 12), ("token_uuid_ptr", 16)],
    ),
    w.vfio_device_attach_iommufd_pt: (16, [("argsz", 0), ("flags", 4), ("pt_id", 8), ("pasid", 12)]),
    w.vfio_device_detach_iommufd_pt: (12, [("argsz", 0), ("flags", 4), ("pasid", 8)]),
    w.pkfuse_device_bind_iommufd: (16, [("argsz", 0), ("flags", 4), ("rid", 8), ("out_devid", 12)]),
    w.pkfuse_device_attach_iommufd_pt: (
        24,
        [("argsz", 0), ("flags", 4), ("pt_id", 8), ("pasid", 12), ("dev_id", 16), ("__reserved", 20)],
    ),
    w.pkfuse_device_detach_iommufd_pt: (16, [("argsz", 0), ("flags", 4), ("pasid", 8), ("dev_id", 12)]),
    w.liveupdate_ioctl_create_session: (72, [("size", 0), ("fd", 4), ("name", 8)]),
    w.liveupdate_ioctl_retrieve_session: (72, [("size", 0), ("fd", 4), ("name", 8)]),
    w.liveupdate_session_preserve_fd: (16, [("size", 0), ("fd", 4), ("token", 8)]),
    w.liveupdate_session_retrieve_fd: (16, [("size", 0), ("fd", 4), ("token", 8)]),
    w.liveupdate_session_finish: (8, [("size", 0), ("reserved", 4)]),
    w.pkfuse_open: (72, [("size", 0), ("flags", 4), ("path", 8)]),
    w.pkfuse_reboot: (8, [("size", 0), ("flags", 4)]),
    w.pkfuse_guest_mmap: (
        32,
        [("size", 0), ("flags", 4), ("out_num_extents", 8), ("__reserved", 12), ("out_length", 16),
         ("out_phys_base", 24)],
    ),
    w.pkfuse_guest_extent: (24, [("file_offset", 0), ("image_offset", 8), ("length", 16)]),
}

# The kernel's min_size: offsetofend of IOCTL_OP's last field (iommufd main.c,
# luo_core.c, luo_session.c) or the VFIO handler's minsz (device_cdev.c).
MIN_SIZES: dict[type[ctypes.Structure], int] = {
    w.iommu_destroy: 8,
    w.iommu_ioas_alloc: 12,
    w.iommu_ioas_iova_ranges: 32,
    w.iommu_ioas_map_file: 40,
    w.iommu_ioas_unmap: 24,
    w.iommu_option: 24,  # IOCTL_OP(IOMMU_OPTION, iommufd_option, struct iommu_option, val64)
    w.iommu_hwpt_alloc: 24,
    w.iommu_hwpt_lu_set_preserve: 12,
    w.vfio_device_bind_iommufd: 16,
    w.vfio_device_attach_iommufd_pt: 12,
    w.vfio_device_detach_iommufd_pt: 8,
    w.liveupdate_ioctl_create_session: 72,
    w.liveupdate_ioctl_retrieve_session: 72,
    w.liveupdate_session_preserve_fd: 16,
    w.liveupdate_session_retrieve_fd: 16,
    w.liveupdate_session_finish: 8,
}

COMMAND_STRUCTS = [t for t in LAYOUTS if t not in (w.iommu_iova_range, w.pkfuse_guest_extent)]  # array entries


@pytest.mark.parametrize("struct_type", list(LAYOUTS), ids=lambda t: t.__name__)
def test_struct_size_is_the_headers(struct_type: type[ctypes.Structure]) -> None:
    assert ctypes.sizeof(struct_type) == LAYOUTS[struct_type][0]


@pytest.mark.parametrize("struct_type", list(LAYOUTS), ids=lambda t: t.__name__)
def test_field_names_order_and_offsets_are_the_headers(struct_type: type[ctypes.Structure]) -> None:
    expected = LAYOUTS[struct_type][1]
    assert [name for name, _ in struct_type._fields_] == [name for name, _ in expected]
    assert [(name, w.offsetof(struct_type, name)) for name, _ in expected] == expected


@pytest.mark.parametrize("struct_type", list(MIN_SIZES), ids=lambda t: t.__name__)
def test_min_size_is_the_kernels(struct_type: type[ctypes.Structure]) -> None:
    assert struct_type.MIN_SIZE == MIN_SIZES[struct_type]


def test_pkfuse_structs_have_no_smaller_version() -> None:
    for t in (w.pkfuse_device_bind_iommufd, w.pkfuse_device_attach_iommufd_pt, w.pkfuse_device_detach_iommufd_pt,
              w.pkfuse_open, w.pkfuse_reboot, w.pkfuse_guest_mmap):
        assert t.MIN_SIZE == ctypes.sizeof(t), t.__name__


def test_ioctl_numbers_are_asm_generic_io_encodings() -> None:
    # _IO(type, nr) = type << 8 | nr: direction and size bits zero.
    assert w.IOMMU_DESTROY == 0x3B80
    assert w.IOMMU_IOAS_ALLOC == 0x3B81
    assert w.IOMMU_IOAS_IOVA_RANGES == 0x3B84
    assert w.IOMMU_IOAS_UNMAP == 0x3B86
    assert w.IOMMU_OPTION == 0x3B87
    assert w.IOMMU_HWPT_ALLOC == 0x3B89
    assert w.IOMMU_IOAS_MAP_FILE == 0x3B8F
    assert w.IOMMU_HWPT_LU_SET_PRESERVE == 0x3B95
    assert w.VFIO_DEVICE_BIND_IOMMUFD == 0x3B76  # VFIO_BASE 100 + 18
    assert w.VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3B77
    assert w.VFIO_DEVICE_DETACH_IOMMUFD_PT == 0x3B78
    assert w.LIVEUPDATE_IOCTL_CREATE_SESSION == 0xBA00
    assert w.LIVEUPDATE_IOCTL_RETRIEVE_SESSION == 0xBA01
    assert w.LIVEUPDATE_SESSION_PRESERVE_FD == 0xBA40
    assert w.LIVEUPDATE_SESSION_RETRIEVE_FD == 0xBA41
    assert w.LIVEUPDATE_SESSION_FINISH == 0xBA42
    assert w.PKFUSE_OPEN == 0x5000
    assert w.PKFUSE_REBOOT == 0x5001
    assert w.PKFUSE_GUEST_MMAP == 0x5002


def test_ioc_nr_and_type_invert_io() -> None:
    assert w._IOC_NR(w.IOMMU_HWPT_ALLOC) == w.IOMMUFD_CMD_HWPT_ALLOC
    assert w._IOC_TYPE(w.IOMMU_HWPT_ALLOC) == w.IOMMUFD_TYPE
    assert w._IOC_TYPE(w.LIVEUPDATE_SESSION_FINISH) == w.LIVEUPDATE_IOCTL_TYPE


def test_every_command_number_is_distinct_across_connection_kinds() -> None:
    tables = (w.OPEN_REQUESTS, w.IOMMUFD_REQUESTS, w.LIVEUPDATE_REQUESTS, w.SESSION_REQUESTS, w.FILE_REQUESTS,
              w.PKFUSE_DOMAIN_REQUESTS)
    numbers = [cmd for table in tables for cmd in table]
    assert len(numbers) == len(set(numbers))


def test_flags_have_the_kernels_values() -> None:
    f = w.iommufd_ioas_map_flags
    assert (f.IOMMU_IOAS_MAP_FIXED_IOVA, f.IOMMU_IOAS_MAP_WRITEABLE, f.IOMMU_IOAS_MAP_READABLE) == (1, 2, 4)
    h = w.iommufd_hwpt_alloc_flags
    assert (h.IOMMU_HWPT_ALLOC_NEST_PARENT, h.IOMMU_HWPT_ALLOC_DIRTY_TRACKING, h.IOMMU_HWPT_FAULT_ID_VALID,
            h.IOMMU_HWPT_ALLOC_PASID) == (1, 2, 4, 8)
    assert w.vfio_device_attach_flags.VFIO_DEVICE_ATTACH_PASID == 1
    assert w.vfio_device_detach_flags.VFIO_DEVICE_DETACH_PASID == 1
    assert w.vfio_device_bind_flags.VFIO_DEVICE_BIND_FLAG_TOKEN == 1


def test_rid_packs_bus_device_function() -> None:
    assert w.rid(0x3A, 0x1F, 7) == 0x3A << 8 | 0x1F << 3 | 7
    with pytest.raises(ValueError):
        w.rid(0, 32, 0)


def test_new_sets_size_to_sizeof() -> None:
    assert w.new(w.iommu_hwpt_alloc).size == 48
    assert w.new(w.pkfuse_device_bind_iommufd).argsz == 16


def test_new_refuses_a_value_the_field_cannot_hold() -> None:
    with pytest.raises(OverflowError):
        w.new(w.iommu_hwpt_lu_set_preserve, hwpt_token=1 << 32)
    with pytest.raises(OverflowError):
        w.new(w.iommu_ioas_unmap, length=-1)


def test_new_refuses_a_name_without_room_for_its_nul() -> None:
    w.new(w.liveupdate_ioctl_create_session, name=b"n" * 63)
    with pytest.raises(ValueError):
        w.new(w.liveupdate_ioctl_create_session, name=b"n" * 64)


@pytest.mark.parametrize("struct_type", COMMAND_STRUCTS, ids=lambda t: t.__name__)
def test_decode_reads_back_what_encode_wrote(struct_type: type[ctypes.Structure]) -> None:
    inst = w.new(struct_type)
    raw = bytearray(w.encode(inst))
    for i in range(4, len(raw)):
        raw[i] = i & 0xFF
    assert bytes(w.decode(struct_type, bytes(raw))) == bytes(raw)


def test_decode_of_fewer_than_four_bytes_is_einval() -> None:
    with pytest.raises(w.WireError) as e:
        w.decode(w.iommu_destroy, b"\x08\x00")
    assert e.value.errno == errno.EINVAL


def test_decode_below_min_size_is_einval() -> None:
    payload = (20).to_bytes(4, "little") + bytes(16)  # iommu_hwpt_alloc's minimum is 24
    with pytest.raises(w.WireError) as e:
        w.decode(w.iommu_hwpt_alloc, payload)
    assert e.value.errno == errno.EINVAL


def test_decode_size_field_disagreeing_with_length_is_einval() -> None:
    payload = bytearray(w.encode(w.new(w.iommu_ioas_unmap)))
    payload[0] = 16  # says 16, 24 bytes sent
    with pytest.raises(w.WireError) as e:
        w.decode(w.iommu_ioas_unmap, bytes(payload))
    assert e.value.errno == errno.EINVAL


def test_decode_accepts_trailing_zero_bytes_of_a_newer_struct() -> None:
    inst = w.new(w.iommu_destroy, id=7)
    payload = (16).to_bytes(4, "little") + bytes(inst)[4:] + bytes(8)
    got = w.decode(w.iommu_destroy, payload)
    assert (got.size, got.id) == (16, 7)


def test_decode_trailing_nonzero_byte_is_e2big() -> None:
    inst = w.new(w.iommu_destroy, id=7)
    payload = (16).to_bytes(4, "little") + bytes(inst)[4:] + bytes(7) + b"\x01"
    with pytest.raises(w.WireError) as e:
        w.decode(w.iommu_destroy, payload)
    assert e.value.errno == errno.E2BIG


def test_decode_zero_extends_an_older_smaller_struct() -> None:
    # iommu_hwpt_alloc as it was before data_type/data_len/data_uptr/fault_id: 24 bytes.
    old = w.new(w.iommu_hwpt_alloc, flags=0, dev_id=3, pt_id=5)
    payload = (24).to_bytes(4, "little") + bytes(old)[4:24]
    got = w.decode(w.iommu_hwpt_alloc, payload)
    assert (got.size, got.dev_id, got.pt_id) == (24, 3, 5)
    assert (got.data_type, got.data_len, got.data_uptr, got.fault_id, getattr(got, "__reserved2")) == (0, 0, 0, 0, 0)


def test_respond_copies_back_only_the_callers_size() -> None:
    got = w.decode(w.iommu_hwpt_alloc, (24).to_bytes(4, "little") + bytes(20))
    got.out_hwpt_id = 9
    back = w.respond(got)
    assert len(back) == 24
    assert int.from_bytes(back[16:20], "little") == 9


def test_respond_of_a_larger_callers_struct_is_sizeof() -> None:
    got = w.decode(w.iommu_destroy, (16).to_bytes(4, "little") + bytes(12))
    assert len(w.respond(got)) == 8


RESERVED = [
    (w.iommu_ioas_iova_ranges, "__reserved"),
    (w.iommu_hwpt_alloc, "__reserved"),
    (w.iommu_hwpt_alloc, "__reserved2"),
    (w.pkfuse_device_attach_iommufd_pt, "__reserved"),
    (w.liveupdate_session_finish, "reserved"),
    (w.pkfuse_guest_mmap, "__reserved"),
]


@pytest.mark.parametrize(("struct_type", "field"), RESERVED, ids=lambda x: getattr(x, "__name__", x))
def test_check_reserved_refuses_a_nonzero_reserved_field(struct_type: type[ctypes.Structure], field: str) -> None:
    inst = w.new(struct_type)
    setattr(inst, field, 1)
    with pytest.raises(w.WireError) as e:
        w.check_reserved(inst)
    assert e.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("struct_type", COMMAND_STRUCTS, ids=lambda t: t.__name__)
def test_check_reserved_accepts_zero_reserved_fields(struct_type: type[ctypes.Structure]) -> None:
    inst = w.new(struct_type)
    for name, ftype in struct_type._fields_:  # every other field non-zero: only reserved ones count
        if not name.startswith("__reserved") and name != "reserved" and not issubclass(ftype, ctypes.Array):
            setattr(inst, name, 1)
    w.check_reserved(inst)


def test_wire_error_is_an_oserror_with_the_errno() -> None:
    e = w.WireError(errno.E2BIG, "detail")
    assert isinstance(e, OSError) and e.errno == errno.E2BIG and "detail" in str(e)


def test_cstring_stops_at_the_first_nul() -> None:
    inst = w.new(w.pkfuse_open, path=w.DEV_IOMMU)
    assert w.cstring(inst.path) == b"/dev/iommu"


def test_iova_ranges_array_round_trips() -> None:
    ranges = [(0, 0xFFF), (1 << 32, (1 << 48) - 1)]
    data = w.encode_iova_ranges(ranges)
    assert len(data) == 32
    assert w.decode_iova_ranges(data) == ranges


def test_iova_ranges_array_of_a_partial_entry_is_einval() -> None:
    with pytest.raises(w.WireError) as e:
        w.decode_iova_ranges(bytes(20))
    assert e.value.errno == errno.EINVAL


def test_guest_extents_array_round_trips() -> None:
    extents = [(0, 0x40_0000, 0x20_0000), (0x20_0000, 0x1000, 0x1000)]
    data = w.encode_guest_extents(extents)
    assert len(data) == 2 * ctypes.sizeof(w.pkfuse_guest_extent)
    assert w.decode_guest_extents(data) == extents
    entry = w.pkfuse_guest_extent.from_buffer_copy(data[24:])
    assert (entry.file_offset, entry.image_offset, entry.length) == extents[1]


def test_guest_extents_array_of_a_partial_entry_is_einval() -> None:
    with pytest.raises(w.WireError) as e:
        w.decode_guest_extents(bytes(25))
    assert e.value.errno == errno.EINVAL


def test_the_daemons_extent_dtype_is_the_wire_struct() -> None:
    from backing.guestmmap import GUEST_EXTENT_DTYPE

    assert GUEST_EXTENT_DTYPE.itemsize == ctypes.sizeof(w.pkfuse_guest_extent)
    assert [(n, GUEST_EXTENT_DTYPE.fields[n][1]) for n in GUEST_EXTENT_DTYPE.names] == \
        [(n, w.offsetof(w.pkfuse_guest_extent, n)) for n, _ in w.pkfuse_guest_extent._fields_]


def test_guest_mmap_carries_one_fd_and_answers_with_two() -> None:
    assert w.REQUEST_FDS[w.PKFUSE_GUEST_MMAP] == 1 and w.REPLY_FDS[w.PKFUSE_GUEST_MMAP] == 2
