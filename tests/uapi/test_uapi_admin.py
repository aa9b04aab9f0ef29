"""pkfuse's own /dev/iommu calls (``PKFUSE_DOMAIN_*``, ``PKFUSE_LAST_ERROR``): their wire section and the
client's refusals before anything is sent. What the daemon does with them is tests/mount/test_control_admin.py."""

from __future__ import annotations

import ctypes
import errno

import pytest

from pkfuse.uapi import wire as w

# Field by field as a C compiler lays them out (u32 4-aligned, __aligned_u64 8-aligned).
LAYOUTS: dict[type[ctypes.Structure], tuple[int, list[tuple[str, int]]]] = {
    w.pkfuse_domain_create: (16, [("size", 0), ("flags", 4), ("domain_id", 8), ("__reserved", 12)]),
    w.pkfuse_domain_destroy: (16, [("size", 0), ("flags", 4), ("domain_id", 8), ("__reserved", 12)]),
    w.pkfuse_domain_copy: (16, [("size", 0), ("flags", 4), ("src_domain_id", 8), ("domain_id", 12)]),
    w.pkfuse_domain_map: (40, [("size", 0), ("flags", 4), ("domain_id", 8), ("__reserved", 12), ("iova", 16),
                               ("phys_addr", 24), ("length", 32)]),
    w.pkfuse_domain_map_file: (1064, [("size", 0), ("flags", 4), ("domain_id", 8), ("__reserved", 12),
                                      ("iova", 16), ("offset", 24), ("length", 32), ("path", 40)]),
    w.pkfuse_domain_unmap: (32, [("size", 0), ("flags", 4), ("domain_id", 8), ("__reserved", 12), ("iova", 16),
                                 ("length", 24)]),
    w.pkfuse_domain_attach: (16, [("size", 0), ("flags", 4), ("domain_id", 8), ("rid", 12)]),
    w.pkfuse_domain_detach: (16, [("size", 0), ("flags", 4), ("domain_id", 8), ("rid", 12)]),
    w.pkfuse_last_error: (272, [("size", 0), ("flags", 4), ("out_cmd", 8), ("out_errno", 12),
                                ("out_message", 16)]),
}
NUMBERS = {
    w.PKFUSE_DOMAIN_CREATE: 0x5010, w.PKFUSE_DOMAIN_DESTROY: 0x5011, w.PKFUSE_DOMAIN_COPY: 0x5012,
    w.PKFUSE_DOMAIN_MAP: 0x5013, w.PKFUSE_DOMAIN_MAP_FILE: 0x5014, w.PKFUSE_DOMAIN_UNMAP: 0x5015,
    w.PKFUSE_DOMAIN_ATTACH: 0x5016, w.PKFUSE_DOMAIN_DETACH: 0x5017, w.PKFUSE_LAST_ERROR: 0x5018,
}
RESERVED = [t for t in LAYOUTS if any(name == "__reserved" for name, _ in t._fields_)]


@pytest.mark.parametrize("struct_type", list(LAYOUTS), ids=lambda t: t.__name__)
def test_layout_size_first_and_no_smaller_version(struct_type: type[ctypes.Structure]) -> None:
    size, fields = LAYOUTS[struct_type]
    assert ctypes.sizeof(struct_type) == size == struct_type.MIN_SIZE
    assert [(name, w.offsetof(struct_type, name)) for name, _ in struct_type._fields_] == fields
    assert w.size_field(struct_type) == "size"


def test_numbers_are_type_p_from_0x10_and_clash_with_nothing() -> None:
    assert all(cmd == value for cmd, value in NUMBERS.items()), {hex(k): hex(v) for k, v in NUMBERS.items()}
    assert set(w.PKFUSE_DOMAIN_REQUESTS) == set(NUMBERS)
    assert all(w._IOC_TYPE(c) == w.PKFUSE_TYPE and w._IOC_NR(c) >= 0x10 for c in NUMBERS)
    others = [cmd for table in (w.OPEN_REQUESTS, w.IOMMUFD_REQUESTS, w.LIVEUPDATE_REQUESTS, w.SESSION_REQUESTS)
              for cmd in table]
    assert not set(others) & set(NUMBERS)
    assert {w.PKFUSE_DOMAIN_REQUESTS[c] for c in NUMBERS} == set(LAYOUTS)


def test_flags_values() -> None:
    assert w.pkfuse_domain_map_flags.PKFUSE_DOMAIN_MAP_WRITEABLE == 1
    assert w.pkfuse_domain_attach_flags.PKFUSE_DOMAIN_ATTACH_REPLACE == 1


@pytest.mark.parametrize("struct_type", list(LAYOUTS), ids=lambda t: t.__name__)
def test_decode_follows_the_kernels_extensibility_rules(struct_type: type[ctypes.Structure]) -> None:
    raw = w.encode(w.new(struct_type))
    assert bytes(w.decode(struct_type, raw)) == raw
    longer = bytearray(raw + bytes(8))
    longer[:4] = len(longer).to_bytes(4, "little")
    w.decode(struct_type, bytes(longer))  # zeros past sizeof: fine
    longer[-1] = 1
    with pytest.raises(w.WireError) as exc:
        w.decode(struct_type, bytes(longer))
    assert exc.value.errno == errno.E2BIG
    short = bytearray(raw[:-4])
    short[:4] = len(short).to_bytes(4, "little")
    with pytest.raises(w.WireError) as exc:
        w.decode(struct_type, bytes(short))
    assert exc.value.errno == errno.EINVAL  # no older, smaller version


@pytest.mark.parametrize("struct_type", RESERVED, ids=lambda t: t.__name__)
def test_a_nonzero_reserved_field_is_eopnotsupp(struct_type: type[ctypes.Structure]) -> None:
    inst = w.new(struct_type)
    w.check_reserved(inst)
    setattr(inst, "__reserved", 1)
    with pytest.raises(w.WireError) as exc:
        w.check_reserved(inst)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_values_the_fields_cannot_hold_are_refused_before_sending() -> None:
    with pytest.raises(OverflowError):
        w.new(w.pkfuse_domain_create, domain_id=-1)
    with pytest.raises(OverflowError):
        w.new(w.pkfuse_domain_map, iova=1 << 64)
    with pytest.raises(ValueError):
        w.new(w.pkfuse_domain_map_file, path=b"x" * w.PKFUSE_DOMAIN_PATH_LENGTH)
    w.new(w.pkfuse_domain_map_file, path=b"x" * (w.PKFUSE_DOMAIN_PATH_LENGTH - 1))
