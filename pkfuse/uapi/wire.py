"""The control socket's wire format: the kernel's uAPI structures, declared, with the rules that read them.

This module is the specification of what travels on pkfuse's control socket.
It holds constants, ``ctypes`` structures with size asserts, the ioctl
numbers, and the kernel's rules for reading an extensible structure
(``decode``, ``respond``, ``check_reserved``); no socket is touched here
(framing is ``pkfuse.uapi.transport``, calls are ``pkfuse.uapi.client``).

Protocol
--------

A connection to the control socket is an open file of the kernel. Its first
message is ``PKFUSE_OPEN`` naming the device: ``/dev/iommu`` (an iommufd
context) or ``/dev/liveupdate`` (at most one open at a time: EBUSY). Any
other first message gets EBADF, an unknown path ENOENT, a second
``PKFUSE_OPEN`` EBUSY.

After that each request is one datagram: the ioctl number of the call it
stands for (``u32``), then its struct, exactly ``size`` bytes. File
descriptors the call takes travel with it as SCM_RIGHTS; a struct's ``fd``
field then carries the sender's own number, for messages only. Each reply is
one datagram: an errno (``s32``, 0 for success) and, on success, the struct
as the kernel would copy it back, then any variable-length array;
descriptors the call returns travel with the reply (``REQUEST_FDS`` and
``REPLY_FDS`` say how many; descriptors sent with a call that takes none are
EBADF, as a stray SCM_RIGHTS is a caller's bug the kernel could never see).
An error reply carries
no struct, except where the kernel copies the struct back before failing:
IOMMU_IOAS_IOVA_RANGES's EMSGSIZE carries it, ``num_iovas`` holding the
count needed.

Extensibility is the kernel's: bytes beyond what the daemon knows must be
zero (E2BIG); unknown flags or non-zero reserved fields give EOPNOTSUPP; an
unknown command ENOTTY. A malformed datagram (shorter than a command, larger
than 4096 bytes, too many descriptors, a struct whose size field disagrees
with its length) gets an errno and never ends the connection.

Session fds are themselves connections (socketpairs made by the daemon).
Closing a connection is closing the file: everything it held is released,
except what a live-update session preserved.

Where pkfuse departs from the kernel, and why
---------------------------------------------

- **A device is a requester id, not a VFIO cdev fd.** pkfuse has no
  ``/dev/vfio/devices/vfioN``: a device is its PCI requester id
  (``bus << 8 | dev << 3 | fn``). So the VFIO cdev calls are made on the
  iommufd connection and name their device: ``pkfuse_device_bind_iommufd``
  carries ``rid`` where VFIO's struct carries the iommufd's fd (and has no
  ``token_uuid_ptr``: there are no SR-IOV VF tokens to check);
  ``pkfuse_device_attach_iommufd_pt`` and ``pkfuse_device_detach_iommufd_pt``
  are VFIO's structs with ``dev_id`` (bind's ``out_devid``) appended. They
  use VFIO's ioctl numbers. Being iommufd calls here, they are read with
  iommufd's rule (``copy_struct_from_user``: non-zero unknown bytes E2BIG),
  where VFIO itself only checks ``argsz >= minsz`` and ignores the rest.
  The real VFIO structs are declared too, for reference and size checks.
- **Pointers do not cross a socket.** ``iommu_ioas_iova_ranges.allowed_iovas``
  and ``iommu_hwpt_alloc.data_uptr`` are user pointers in the kernel; pkfuse
  clients send 0 there. The IOVA ranges follow the struct in the reply.
- **IOMMU_HWPT_LU_SET_PRESERVE names its session by fd.** In the unmerged
  series the call carries only ``{size, hwpt_id, hwpt_token}``; pkfuse's
  client sends the live-update session's fd with it as the one SCM_RIGHTS
  descriptor, which is how the daemon knows which session preserves the
  HWPT. The struct itself is the series' own.
- **pkfuse's own commands** (type ``'P'``): ``PKFUSE_OPEN`` stands for
  ``open(2)`` of a device node and ``PKFUSE_REBOOT`` for
  ``reboot(LINUX_REBOOT_CMD_KEXEC)``, sent on a ``/dev/liveupdate``
  connection. Their structs follow the uAPI habits (``size`` first, flags
  that must be 0). ``PKFUSE_DOMAIN_*`` (0x10 up), on a ``/dev/iommu``
  connection, are ``pkfuse iommu``'s offline commands served live: their
  section below says how. ``PKFUSE_GUEST_MMAP`` stands for ``mmap(2)`` of
  a guest-RAM file (``MAP_SHARED``, ``PROT_READ | PROT_WRITE``), which the
  kernel serves by pointing the VMA at the file's physical pages and pkfuse
  cannot (``direct_io`` makes a shared mapping through the mount ENODEV).
  It is a system call on a file, not an ioctl of a device: it is served on
  every connection (``FILE_REQUESTS``). The file travels as the request's
  one SCM_RIGHTS descriptor. Pointers do not cross the socket and a
  datagram is at most 4096 bytes while a 16 GiB guest may have 8192
  extents, so the reply carries two descriptors: the image (``O_RDWR``),
  whose pages the caller maps itself at the extents, and a sealed memfd
  (``F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL``) holding
  the ``pkfuse_guest_extent`` array, where the kernel would copy to a user
  pointer. The mapped file is pinned while the connection is open (its
  section below says how).

Layout
------

Structures are little-endian with the natural alignment of the C headers on
x86-64: ``__aligned_u64`` is a ``c_uint64`` with 8-byte alignment (asserted
below), so each struct's size and offsets are the C compiler's. Every size is
asserted at import and every offset in ``tests/uapi/test_uapi_wire.py`` against
the headers cited beside each struct. ``MIN_SIZE`` of a struct is the
kernel's ``min_size`` (``offsetofend`` of the last field its ioctl table or
handler requires); a shorter struct is EINVAL, a longer one up to
``sizeof`` is zero-extended.

Headers read: ``include/uapi/linux/iommufd.h`` and
``drivers/iommu/iommufd/main.c`` (torvalds/linux and linux-next);
``include/uapi/linux/vfio.h`` and ``drivers/vfio/device_cdev.c``
(torvalds/linux); ``include/uapi/linux/liveupdate.h``,
``kernel/liveupdate/luo_core.c`` and ``luo_session.c`` (torvalds/linux
@16cec0d2); the unmerged "iommu: Add live update state preservation"
series' additions to ``iommufd.h``.
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import os
import struct
from collections.abc import Callable
from typing import TypeVar

# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class WireError(OSError):
    """A datagram or struct the kernel's rules refuse; ``errno`` is the errno the reply carries.

    An ``OSError`` so that a client sees the same exception type whether the
    daemon or its own library refused a call.
    """

    def __init__(self, err: int, detail: str = "") -> None:
        message = os.strerror(err) + (f": {detail}" if detail else "")
        super().__init__(err, message)


# --------------------------------------------------------------------------
# ioctl numbers: include/uapi/asm-generic/ioctl.h
# --------------------------------------------------------------------------
# The generic encoding (x86, arm64, riscv): nr in bits 0..7, type in 8..15,
# size in 16..29, direction in 30..31. iommufd, VFIO's cdev calls and LUO all
# use _IO (direction none, size 0): the struct carries its own size.

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0


def _IOC(dir: int, type: int, nr: int, size: int) -> int:
    return (dir << _IOC_DIRSHIFT) | (type << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(type: int, nr: int) -> int:
    """``_IO(type, nr)``: an ioctl number with no direction and no size (asm-generic/ioctl.h)."""
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOC_NR(cmd: int) -> int:
    """The command number (bits 0..7) of an ioctl number."""
    return (cmd >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_TYPE(cmd: int) -> int:
    """The type (bits 8..15) of an ioctl number."""
    return (cmd >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


# --------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------

# __aligned_u64 is u64 with 8-byte alignment on every ABI; ctypes gives that
# natively on the 64-bit hosts pkfuse runs on. Refuse to run where it does not.
assert ctypes.alignment(ctypes.c_uint64) == 8, "__aligned_u64 needs 8-byte alignment"

_Struct = ctypes.LittleEndianStructure
_S = TypeVar("_S", bound=ctypes.Structure)

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
s32 = ctypes.c_int32
aligned_u64 = ctypes.c_uint64


def _min_size_through(last: str) -> Callable[[type[_S]], type[_S]]:
    """Set ``MIN_SIZE = offsetofend(struct, last)``: the kernel's ``IOCTL_OP(..., _last)`` minimum."""

    def mark(cls: type[_S]) -> type[_S]:
        field = getattr(cls, last)
        cls.MIN_SIZE = field.offset + field.size
        return cls

    return mark


def offsetof(struct_type: type[ctypes.Structure], field: str) -> int:
    """Byte offset of ``field`` in ``struct_type``, as C's ``offsetof``."""
    return getattr(struct_type, field).offset


def offsetofend(struct_type: type[ctypes.Structure], field: str) -> int:
    """Byte offset just past ``field``, as the kernel's ``offsetofend``."""
    f = getattr(struct_type, field)
    return f.offset + f.size


# --------------------------------------------------------------------------
# iommufd: include/uapi/linux/iommufd.h
# --------------------------------------------------------------------------

IOMMUFD_TYPE = ord(";")

IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C
IOMMUFD_CMD_HWPT_INVALIDATE = 0x8D
IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8E
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
IOMMUFD_CMD_VIOMMU_ALLOC = 0x90
IOMMUFD_CMD_VDEVICE_ALLOC = 0x91
IOMMUFD_CMD_IOAS_CHANGE_PROCESS = 0x92
IOMMUFD_CMD_VEVENTQ_ALLOC = 0x93
IOMMUFD_CMD_HW_QUEUE_ALLOC = 0x94
# Unmerged: "iommu: Add live update state preservation" takes the next free
# number after HW_QUEUE_ALLOC. pkfuse uses the series' number so that a VMM
# written against pkfuse ports to that kernel unchanged.
IOMMUFD_CMD_HWPT_LU_SET_PRESERVE = 0x95


@_min_size_through("id")
class iommu_destroy(_Struct):  # the kernel's names, lower case as in the headers
    """``struct iommu_destroy`` (iommufd.h): destroy any object by id; EBUSY while in use.

    size: sizeof = 8. id: the object to destroy.
    """

    _fields_ = [
        ("size", u32),
        ("id", u32),
    ]


IOMMU_DESTROY = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)


@_min_size_through("out_ioas_id")
class iommu_ioas_alloc(_Struct):
    """``struct iommu_ioas_alloc`` (iommufd.h): allocate an IO address space.

    flags: must be 0. out_ioas_id: the new IOAS's id.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("out_ioas_id", u32),
    ]


IOMMU_IOAS_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)


class iommu_iova_range(_Struct):
    """``struct iommu_iova_range`` (iommufd.h): an interval of IOVA, ``last`` inclusive. Not a command."""

    _fields_ = [
        ("start", aligned_u64),
        ("last", aligned_u64),
    ]


@_min_size_through("out_iova_alignment")
class iommu_ioas_iova_ranges(_Struct):
    """``struct iommu_ioas_iova_ranges`` (iommufd.h): the IOVA ranges a map may use.

    num_iovas: in, the capacity of the caller's array; out, the total count.
    When the capacity is too small the reply is EMSGSIZE *with* this struct
    (``num_iovas`` = the count needed) and the ranges that fitted, as the
    kernel copies the struct back before failing. __reserved: must be 0.
    allowed_iovas: a user pointer in the kernel, 0 on the wire: the array of
    ``iommu_iova_range`` follows the struct in the reply.
    out_iova_alignment: bytes; every map's iova and iova + length must be
    multiples of it.
    """

    _fields_ = [
        ("size", u32),
        ("ioas_id", u32),
        ("num_iovas", u32),
        ("__reserved", u32),
        ("allowed_iovas", aligned_u64),
        ("out_iova_alignment", aligned_u64),
    ]


IOMMU_IOAS_IOVA_RANGES = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)


class iommufd_ioas_map_flags(enum.IntFlag):
    """``enum iommufd_ioas_map_flags`` (iommufd.h), for IOAS_MAP, IOAS_MAP_FILE and IOAS_COPY."""

    IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0  #: map at ``iova``; the range must be unused
    IOMMU_IOAS_MAP_WRITEABLE = 1 << 1  #: DMA may write
    IOMMU_IOAS_MAP_READABLE = 1 << 2  #: DMA may read


@_min_size_through("iova")
class iommu_ioas_map_file(_Struct):
    """``struct iommu_ioas_map_file`` (iommufd.h): map ``length`` bytes of a file from byte ``start``.

    flags: ``iommufd_ioas_map_flags``. fd: the file; on the wire the file
    travels as the request's one SCM_RIGHTS descriptor and this field holds
    the sender's number for it. iova: in with FIXED_IOVA, else out (the
    daemon picks it). Existing IOVA is never replaced.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("ioas_id", u32),
        ("fd", s32),
        ("start", aligned_u64),
        ("length", aligned_u64),
        ("iova", aligned_u64),
    ]


IOMMU_IOAS_MAP_FILE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)


@_min_size_through("length")
class iommu_ioas_unmap(_Struct):
    """``struct iommu_ioas_unmap`` (iommufd.h): unmap whole earlier maps inside [iova, iova + length).

    length: in, bytes; out, the bytes unmapped. iova 0 with length U64_MAX
    unmaps everything; nothing there is ENOENT.
    """

    _fields_ = [
        ("size", u32),
        ("ioas_id", u32),
        ("iova", aligned_u64),
        ("length", aligned_u64),
    ]


IOMMU_IOAS_UNMAP = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)


class iommufd_option(enum.IntEnum):
    """``enum iommufd_option`` (iommufd.h).

    RLIMIT_MODE: how RLIMIT_MEMLOCK accounting works (0 per user, 1 per
    process); global, object_id 0. HUGE_PAGES: 1 (the default) lets
    contiguous pages be combined into larger IOMMU mappings, 0 maps
    everything with PAGE_SIZE leaves ("useful for benchmarking"); per IOAS,
    object_id the IOAS, and it can be turned off only before an area is
    mapped into a HWPT (``iopt_disable_large_pages``: EINVAL after).
    """

    IOMMU_OPTION_RLIMIT_MODE = 0
    IOMMU_OPTION_HUGE_PAGES = 1


class iommufd_option_ops(enum.IntEnum):
    """``enum iommufd_option_ops`` (iommufd.h)."""

    IOMMU_OPTION_OP_SET = 0
    IOMMU_OPTION_OP_GET = 1


@_min_size_through("val64")
class iommu_option(_Struct):
    """``struct iommu_option`` (iommufd.h): set or get one option of an object or of the context.

    option_id: ``iommufd_option``; unknown EOPNOTSUPP. op: ``iommufd_option_ops``;
    unknown EOPNOTSUPP. __reserved: must be 0 (EOPNOTSUPP). object_id: the
    IOAS for HUGE_PAGES, 0 for RLIMIT_MODE. val64: in, the value to set (0 or
    1, else EINVAL); out, the value (a get), as main.c copies val64 back.
    """

    _fields_ = [
        ("size", u32),
        ("option_id", u32),
        ("op", u16),
        ("__reserved", u16),
        ("object_id", u32),
        ("val64", aligned_u64),
    ]


IOMMU_OPTION = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)


class iommufd_hwpt_alloc_flags(enum.IntFlag):
    """``enum iommufd_hwpt_alloc_flags`` (iommufd.h)."""

    IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
    IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
    IOMMU_HWPT_ALLOC_PASID = 1 << 3


class iommu_hwpt_data_type(enum.IntEnum):
    """``enum iommu_hwpt_data_type`` (iommufd.h); a kernel-managed HWPT from an IOAS is DATA_NONE."""

    IOMMU_HWPT_DATA_NONE = 0
    IOMMU_HWPT_DATA_VTD_S1 = 1
    IOMMU_HWPT_DATA_ARM_SMMUV3 = 2


# main.c: IOCTL_OP(IOMMU_HWPT_ALLOC, ..., __reserved): a 24-byte struct from
# before data_type/data_len/data_uptr (and fault_id) were added is accepted and
# zero-extended, which is exactly "DATA_NONE, no fault queue".
@_min_size_through("__reserved")
class iommu_hwpt_alloc(_Struct):
    """``struct iommu_hwpt_alloc`` (iommufd.h): allocate a HWPT (an iommu_domain) for a device from an IOAS.

    flags: ``iommufd_hwpt_alloc_flags``. dev_id: a bound device's id.
    pt_id: the IOAS (or HWPT, vIOMMU) to connect to. out_hwpt_id: the new
    HWPT. __reserved, __reserved2: must be 0. data_type/data_len/data_uptr:
    the user-managed page table description; DATA_NONE, 0, 0 for pkfuse.
    fault_id: valid only with FAULT_ID_VALID.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("dev_id", u32),
        ("pt_id", u32),
        ("out_hwpt_id", u32),
        ("__reserved", u32),
        ("data_type", u32),
        ("data_len", u32),
        ("data_uptr", aligned_u64),
        ("fault_id", u32),
        ("__reserved2", u32),
    ]


IOMMU_HWPT_ALLOC = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)


# Unmerged series, its addition to iommufd.h; main.c's entry is
# IOCTL_OP(IOMMU_HWPT_LU_SET_PRESERVE, ..., hwpt_token).
@_min_size_through("hwpt_token")
class iommu_hwpt_lu_set_preserve(_Struct):
    """``struct iommu_hwpt_lu_set_preserve`` (unmerged series): preserve a HWPT across the kexec.

    hwpt_id: the HWPT (ENOENT if none; EEXIST if preserved already).
    hwpt_token: the caller's name for it upon restore, unique in the session
    with its file tokens (EEXIST, as LUO's duplicate tokens). The series' field is a
    ``__u32`` (not a u64 like LUO's tokens) and pkfuse keeps it so. pkfuse
    sends the live-update session's fd with the request (one SCM_RIGHTS
    descriptor) to say which session preserves it. Allowed only if every map
    of the HWPT's IOAS is file-backed from a memfd already preserved in that
    session (EINVAL otherwise); the IOAS is then immutable (map/unmap EBUSY).
    A descriptor that is not a session fd is EBADF.
    """

    _fields_ = [
        ("size", u32),
        ("hwpt_id", u32),
        ("hwpt_token", u32),
    ]


IOMMU_HWPT_LU_SET_PRESERVE = _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_LU_SET_PRESERVE)


# --------------------------------------------------------------------------
# VFIO cdev: include/uapi/linux/vfio.h, drivers/vfio/device_cdev.c
# --------------------------------------------------------------------------

VFIO_TYPE = ord(";")
VFIO_BASE = 100

VFIO_DEVICE_BIND_IOMMUFD = _IO(VFIO_TYPE, VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT = _IO(VFIO_TYPE, VFIO_BASE + 20)


class vfio_device_bind_flags(enum.IntFlag):
    """``VFIO_DEVICE_BIND_*`` (vfio.h has ``#define``s, no enum)."""

    VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0


class vfio_device_attach_flags(enum.IntFlag):
    """``VFIO_DEVICE_ATTACH_*`` (vfio.h ``#define``)."""

    VFIO_DEVICE_ATTACH_PASID = 1 << 0


class vfio_device_detach_flags(enum.IntFlag):
    """``VFIO_DEVICE_DETACH_*`` (vfio.h ``#define``)."""

    VFIO_DEVICE_DETACH_PASID = 1 << 0


# device_cdev.c: minsz = offsetofend(..., out_devid).
@_min_size_through("out_devid")
class vfio_device_bind_iommufd(_Struct):
    """``struct vfio_device_bind_iommufd`` (vfio.h), for reference: pkfuse sends ``pkfuse_device_bind_iommufd``."""

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("iommufd", s32),
        ("out_devid", u32),
        ("token_uuid_ptr", aligned_u64),
    ]


# device_cdev.c: minsz = offsetofend(..., pt_id); pasid is read only with ATTACH_PASID.
@_min_size_through("pt_id")
class vfio_device_attach_iommufd_pt(_Struct):
    """``struct vfio_device_attach_iommufd_pt`` (vfio.h), for reference: pkfuse sends the ``pkfuse_`` one."""

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("pt_id", u32),
        ("pasid", u32),
    ]


# device_cdev.c: minsz = offsetofend(..., flags); pasid is read only with DETACH_PASID.
@_min_size_through("flags")
class vfio_device_detach_iommufd_pt(_Struct):
    """``struct vfio_device_detach_iommufd_pt`` (vfio.h), for reference: pkfuse sends the ``pkfuse_`` one."""

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("pasid", u32),
    ]


def rid(bus: int, dev: int, fn: int) -> int:
    """A PCI requester id: ``bus << 8 | dev << 3 | fn`` (bus 0..255, device 0..31, function 0..7)."""
    if not (0 <= bus <= 0xFF and 0 <= dev <= 0x1F and 0 <= fn <= 0x7):
        raise ValueError(f"no such requester id: bus {bus}, device {dev}, function {fn}")
    return bus << 8 | dev << 3 | fn


@_min_size_through("out_devid")
class pkfuse_device_bind_iommufd(_Struct):
    """pkfuse's VFIO_DEVICE_BIND_IOMMUFD, sent on the iommufd connection.

    rid: the device's requester id (see ``rid``), where VFIO's struct has
    the iommufd's fd. flags: must be 0 (no VF tokens). out_devid: the
    device's id in this iommufd, as VFIO's. A struct of pkfuse's own: no
    older, smaller version exists, so MIN_SIZE is its size.
    """

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("rid", u32),
        ("out_devid", u32),
    ]


@_min_size_through("__reserved")
class pkfuse_device_attach_iommufd_pt(_Struct):
    """pkfuse's VFIO_DEVICE_ATTACH_IOMMUFD_PT: VFIO's struct with ``dev_id`` appended.

    flags: ``vfio_device_attach_flags``. pt_id: in, an IOAS (the daemon makes
    a HWPT) or a HWPT; out, the attached HWPT. Attaching again while
    attached replaces the domain. pasid: only with ATTACH_PASID. dev_id:
    bind's out_devid. __reserved: must be 0; pads to 8 bytes as iommufd's
    ``__reserved2`` does.
    """

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("pt_id", u32),
        ("pasid", u32),
        ("dev_id", u32),
        ("__reserved", u32),
    ]


@_min_size_through("dev_id")
class pkfuse_device_detach_iommufd_pt(_Struct):
    """pkfuse's VFIO_DEVICE_DETACH_IOMMUFD_PT: VFIO's struct with ``dev_id`` appended.

    flags: ``vfio_device_detach_flags``. pasid: only with DETACH_PASID.
    dev_id: bind's out_devid. After it the device's DMA is blocked.
    """

    _fields_ = [
        ("argsz", u32),
        ("flags", u32),
        ("pasid", u32),
        ("dev_id", u32),
    ]


# --------------------------------------------------------------------------
# Live Update Orchestrator: include/uapi/linux/liveupdate.h (torvalds/linux @16cec0d2)
# --------------------------------------------------------------------------

LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64  #: bytes, including the terminating NUL

LIVEUPDATE_CMD_BASE = 0x00
LIVEUPDATE_CMD_CREATE_SESSION = LIVEUPDATE_CMD_BASE
LIVEUPDATE_CMD_RETRIEVE_SESSION = 0x01

LIVEUPDATE_CMD_SESSION_BASE = 0x40
LIVEUPDATE_CMD_SESSION_PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE
LIVEUPDATE_CMD_SESSION_RETRIEVE_FD = 0x41
LIVEUPDATE_CMD_SESSION_FINISH = 0x42


# luo_core.c: IOCTL_OP(LIVEUPDATE_IOCTL_CREATE_SESSION, ..., name).
@_min_size_through("name")
class liveupdate_ioctl_create_session(_Struct):
    """``struct liveupdate_ioctl_create_session`` (liveupdate.h): a new outgoing session.

    fd: out; the session travels as the reply's one SCM_RIGHTS descriptor
    and this field holds the daemon's number for it. name: NUL-terminated,
    at most 63 bytes before the NUL; a duplicate name is EEXIST.
    """

    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("name", u8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


LIVEUPDATE_IOCTL_CREATE_SESSION = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)


@_min_size_through("name")
class liveupdate_ioctl_retrieve_session(_Struct):
    """``struct liveupdate_ioctl_retrieve_session`` (liveupdate.h): a session preserved by the previous kernel.

    fd: out, as for create. name: the name it was created with; unknown
    is ENOENT.
    """

    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("name", u8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


LIVEUPDATE_IOCTL_RETRIEVE_SESSION = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)


# luo_session.c: IOCTL_OP(LIVEUPDATE_SESSION_PRESERVE_FD, ..., token).
@_min_size_through("token")
class liveupdate_session_preserve_fd(_Struct):
    """``struct liveupdate_session_preserve_fd`` (liveupdate.h), on a session fd: preserve a file.

    fd: in; the file travels as the request's one SCM_RIGHTS descriptor and
    this field holds the sender's number. token: the caller's unique name
    for it; a duplicate is EEXIST, a full session (128 files) ENOSPC.
    """

    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("token", aligned_u64),
    ]


LIVEUPDATE_SESSION_PRESERVE_FD = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)


@_min_size_through("token")
class liveupdate_session_retrieve_fd(_Struct):
    """``struct liveupdate_session_retrieve_fd`` (liveupdate.h), on a retrieved session fd.

    fd: out; the file travels as the reply's one SCM_RIGHTS descriptor.
    token: as preserved; unknown is ENOENT. The same token twice gives the
    same file.
    """

    _fields_ = [
        ("size", u32),
        ("fd", s32),
        ("token", aligned_u64),
    ]


LIVEUPDATE_SESSION_RETRIEVE_FD = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)


# luo_session.c: IOCTL_OP(LIVEUPDATE_SESSION_FINISH, ..., reserved).
@_min_size_through("reserved")
class liveupdate_session_finish(_Struct):
    """``struct liveupdate_session_finish`` (liveupdate.h): all or nothing; EBUSY if any file cannot finish yet.

    reserved: must be 0.
    """

    _fields_ = [
        ("size", u32),
        ("reserved", u32),
    ]


LIVEUPDATE_SESSION_FINISH = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)


# --------------------------------------------------------------------------
# pkfuse's own commands (type 'P')
# --------------------------------------------------------------------------

PKFUSE_TYPE = ord("P")
PKFUSE_PATH_LENGTH = 64  #: bytes of pkfuse_open.path, including the terminating NUL
DEV_IOMMU = b"/dev/iommu"
DEV_LIVEUPDATE = b"/dev/liveupdate"


@_min_size_through("path")
class pkfuse_open(_Struct):
    """``open(2)`` of a device node: the first message of every connection but a session's.

    flags: must be 0. path: NUL-terminated, ``/dev/iommu`` or
    ``/dev/liveupdate``; another path is ENOENT. The reply echoes the struct.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("path", u8 * PKFUSE_PATH_LENGTH),
    ]


PKFUSE_OPEN = _IO(PKFUSE_TYPE, 0x00)


@_min_size_through("flags")
class pkfuse_reboot(_Struct):
    """``reboot(LINUX_REBOOT_CMD_KEXEC)``, sent on the /dev/liveupdate connection.

    flags: must be 0. Freezes every outgoing session and performs the
    restart; a failure is EAGAIN and unfreezes everything.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
    ]


PKFUSE_REBOOT = _IO(PKFUSE_TYPE, 0x01)


# --------------------------------------------------------------------------
# pkfuse's own command on every connection: mmap(2) of a guest-RAM file (type 'P', 0x02)
# --------------------------------------------------------------------------
# The kernel's mmap of a pkernfs file hands the VMA the file's physical pages.
# pkfuse's daemon cannot hand another process a mapping, so it hands out what
# the mapping is made of -- the image and where in it the file's pages are --
# and the caller maps each extent of the image over its part of one reserved
# range (``pkfuse.vmm.memory.GuestMemory.map_file``). The checks are mmap's,
# in do_mmap's order:
#
# - exactly one descriptor, a regular file on this mount, else EBADF;
# - opened for reading and writing, else EACCES (a shared writable mapping
#   of a descriptor not open for writing is EACCES; so is any mapping of one
#   not open for reading);
# - a guest-RAM file with at least one byte, else EINVAL: IOMMU files, the
#   live-update state and ``.pkernfs`` views are no memory a VMM may map
#   (pkfuse says EINVAL, as for a length of 0, rather than ENODEV: through
#   the mount they are read-only, so EACCES comes first anyway).
#
# The pin: the kernel tears a truncated file's pages out of every VMA
# (``unmap_mapping_range``); pkfuse cannot unmap another process's mapping,
# so while the connection that made the call is open the file's size is
# fixed and it keeps its pages: truncate (up or down), a write past its end,
# unlink and a rename over it give EBUSY. Each call adds one pin; closing the
# connection (or its process dying) drops all of its pins. There is no
# munmap call: a mapping outlives nothing but its connection.

PKFUSE_MMAP_EXTENTS_NAME = b"pkfuse-guest-extents"  #: the memfd's name (``/proc/PID/fd`` shows it)


@_min_size_through("out_phys_base")
class pkfuse_guest_mmap(_Struct):
    """``mmap(2)`` of the guest-RAM file sent with the request (its one SCM_RIGHTS descriptor).

    flags: must be 0 (EOPNOTSUPP). __reserved: must be 0 (EOPNOTSUPP).
    out_num_extents: the entries of the ``pkfuse_guest_extent`` array in
    the reply's second descriptor (a sealed memfd of exactly that many
    entries), sorted by ``file_offset``, tiling ``[0, round_up(out_length,
    4096))`` with runs contiguous in both the file and the image merged.
    out_length: the file's size in bytes. out_phys_base: the physical
    address of image offset 0 (an extent's physical address is
    ``out_phys_base + image_offset``). The reply's first descriptor is the
    image, open ``O_RDWR``. EBADF, EACCES, EINVAL as the section above says;
    on success the file is pinned until the connection closes.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("out_num_extents", u32),
        ("__reserved", u32),
        ("out_length", aligned_u64),
        ("out_phys_base", aligned_u64),
    ]


class pkfuse_guest_extent(_Struct):
    """One entry of PKFUSE_GUEST_MMAP's extent array: ``length`` bytes at ``file_offset`` are at
    ``image_offset`` of the image. All three are multiples of 4096."""

    _fields_ = [
        ("file_offset", aligned_u64),
        ("image_offset", aligned_u64),
        ("length", aligned_u64),
    ]


PKFUSE_GUEST_MMAP = _IO(PKFUSE_TYPE, 0x02)

assert ctypes.sizeof(pkfuse_guest_mmap) == 32 == pkfuse_guest_mmap.MIN_SIZE
assert ctypes.sizeof(pkfuse_guest_extent) == 24


# --------------------------------------------------------------------------
# pkfuse's own commands on /dev/iommu: kernel-owned domains (type 'P', 0x10..0x18)
# --------------------------------------------------------------------------
# What ``pkfuse iommu create|destroy|copy|map|unmap|attach|detach`` does to an
# unmounted image, these do to the image a daemon serves, on its live IOMMU:
# domains named by DID (``iommu/dom-<DID>``) that belong to the kernel, not to
# an iommufd context. They are no objects of the connection: closing it
# releases none of them, and they stay in the image as the offline command's
# do. The checks and errnos are the offline command's (``backing.iommu``),
# plus two of the live kernel's own:
#
# - a domain an iommufd HWPT uses (or a destroyed HWPT's domain waiting out
#   its grace period, or one live update restored that no HWPT reclaimed
#   yet) is EBUSY for destroy, map, map_file, unmap, attach and detach; copy
#   reads it and is allowed (save/restore of a live domain);
# - attach of a requester that an iommufd context has bound, or that such a
#   domain holds, is EBUSY, as VFIO_DEVICE_BIND_IOMMUFD of a requester a
#   kernel domain holds is.
#
# Structs follow the uAPI habits: ``size`` first, flags enumerated (an unknown
# bit EOPNOTSUPP), ``__reserved`` padding that must be 0 (EOPNOTSUPP), bytes
# past ``sizeof`` zero (E2BIG). They have no older, smaller versions:
# ``MIN_SIZE`` is ``sizeof``.
#
# An errno alone cannot say *which* check refused (EBUSY: attached to a
# requester, or owned by a HWPT?), and the kernel's answer to that is a
# message log on the file -- the new mount API's ``fsopen`` fd, read with
# read(2). pkfuse's: a refused domain command leaves its one-line reason on
# the connection, and ``PKFUSE_LAST_ERROR`` reads it (once) together with the
# command and errno it belongs to. The next domain command on the connection
# replaces or clears it. A refusal by the struct rules above (E2BIG, EINVAL
# of a size, EOPNOTSUPP of a reserved field) happens before the command runs
# and leaves no message.

PKFUSE_DOMAIN_PATH_LENGTH = 1024  #: bytes of pkfuse_domain_map_file.path, including the terminating NUL
PKFUSE_ERROR_MESSAGE_LENGTH = 256  #: bytes of pkfuse_last_error.out_message, including the terminating NUL


class pkfuse_domain_map_flags(enum.IntFlag):
    """Flags of ``pkfuse_domain_map`` and ``pkfuse_domain_map_file``; every leaf is readable."""

    PKFUSE_DOMAIN_MAP_WRITEABLE = 1 << 0  #: DMA may write (the W bit); ``pkfuse iommu map`` without --ro


class pkfuse_domain_attach_flags(enum.IntFlag):
    """Flags of ``pkfuse_domain_attach``."""

    PKFUSE_DOMAIN_ATTACH_REPLACE = 1 << 0  #: take the requester from the domain it is attached to (--replace)


@_min_size_through("__reserved")
class pkfuse_domain_create(_Struct):
    """A new empty domain ``iommu/dom-<DID>`` (``pkfuse iommu create``).

    flags: must be 0. domain_id: in, the DID wanted (1..65535), 0 for the
    smallest free one; out, the DID made. EEXIST if taken, EINVAL outside
    1..65535.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("__reserved", u32),
    ]


@_min_size_through("__reserved")
class pkfuse_domain_destroy(_Struct):
    """Unmap everything in a detached domain and free its pages (``pkfuse iommu destroy``).

    flags: must be 0. EBUSY while attached; returns once the grace period
    after its last detach has passed and the pages are free.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("__reserved", u32),
    ]


@_min_size_through("domain_id")
class pkfuse_domain_copy(_Struct):
    """A new domain with the translations of ``src_domain_id`` (``pkfuse iommu copy``).

    flags: must be 0. domain_id: in, the copy's DID, 0 for the smallest
    free one; out, the copy's DID. The copy carries DOMF_SAVED.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("src_domain_id", u32),
        ("domain_id", u32),
    ]


@_min_size_through("length")
class pkfuse_domain_map(_Struct):
    """Map ``[iova, iova + length)`` to ``[phys_addr, ...)`` (``pkfuse iommu map --phys``).

    flags: ``pkfuse_domain_map_flags``. Every physical page must be guest
    RAM (EFAULT), the IOVA range unmapped (EEXIST), all 4 KiB aligned and
    inside 48 bits (EINVAL). A refused map changes nothing.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("__reserved", u32),
        ("iova", aligned_u64),
        ("phys_addr", aligned_u64),
        ("length", aligned_u64),
    ]


@_min_size_through("path")
class pkfuse_domain_map_file(_Struct):
    """Map ``length`` bytes of a guest file from byte ``offset`` at ``iova`` (``pkfuse iommu map --file``).

    flags: ``pkfuse_domain_map_flags``. path: NUL-terminated, relative to
    the image's root (``guest_mem/vm0``; a leading ``/`` is allowed): the
    image's own name for the file, not a path on any mount. No such file
    is ENOENT, one that is not guest RAM or too short EINVAL. All or
    nothing.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("__reserved", u32),
        ("iova", aligned_u64),
        ("offset", aligned_u64),
        ("length", aligned_u64),
        ("path", u8 * PKFUSE_DOMAIN_PATH_LENGTH),
    ]


@_min_size_through("length")
class pkfuse_domain_unmap(_Struct):
    """Unmap ``[iova, iova + length)`` (``pkfuse iommu unmap``); parts of superpages are split.

    flags: must be 0. length: in, bytes; out, the bytes that were mapped
    and now are not (0 if nothing was).
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("__reserved", u32),
        ("iova", aligned_u64),
        ("length", aligned_u64),
    ]


@_min_size_through("rid")
class pkfuse_domain_attach(_Struct):
    """Point requester ``rid``'s context entry at the domain (``pkfuse iommu attach``).

    flags: ``pkfuse_domain_attach_flags``; without REPLACE a requester
    attached to another domain is EBUSY. rid: ``bus << 8 | dev << 3 | fn``
    (above 16 bits EINVAL).
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("rid", u32),
    ]


@_min_size_through("rid")
class pkfuse_domain_detach(_Struct):
    """Clear requester ``rid``'s context entry (``pkfuse iommu detach``); ENOENT unless attached to the domain.

    flags: must be 0.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("domain_id", u32),
        ("rid", u32),
    ]


@_min_size_through("out_message")
class pkfuse_last_error(_Struct):
    """The reason the last domain command on this connection was refused, read once.

    flags: must be 0. out_cmd, out_errno: the command and the errno of its
    reply. out_message: one line, NUL-terminated (cut at 255 bytes), as the
    offline command prints it after ``ENAME: ``. ENODATA if there is none:
    the last domain command succeeded, or the message was read already.
    """

    _fields_ = [
        ("size", u32),
        ("flags", u32),
        ("out_cmd", u32),
        ("out_errno", u32),
        ("out_message", u8 * PKFUSE_ERROR_MESSAGE_LENGTH),
    ]


PKFUSE_DOMAIN_CREATE = _IO(PKFUSE_TYPE, 0x10)
PKFUSE_DOMAIN_DESTROY = _IO(PKFUSE_TYPE, 0x11)
PKFUSE_DOMAIN_COPY = _IO(PKFUSE_TYPE, 0x12)
PKFUSE_DOMAIN_MAP = _IO(PKFUSE_TYPE, 0x13)
PKFUSE_DOMAIN_MAP_FILE = _IO(PKFUSE_TYPE, 0x14)
PKFUSE_DOMAIN_UNMAP = _IO(PKFUSE_TYPE, 0x15)
PKFUSE_DOMAIN_ATTACH = _IO(PKFUSE_TYPE, 0x16)
PKFUSE_DOMAIN_DETACH = _IO(PKFUSE_TYPE, 0x17)
PKFUSE_LAST_ERROR = _IO(PKFUSE_TYPE, 0x18)

#: on a /dev/iommu connection, beside IOMMUFD_REQUESTS (served by pkfuse.daemon.admin)
PKFUSE_DOMAIN_REQUESTS: dict[int, type[ctypes.Structure]] = {
    PKFUSE_DOMAIN_CREATE: pkfuse_domain_create,
    PKFUSE_DOMAIN_DESTROY: pkfuse_domain_destroy,
    PKFUSE_DOMAIN_COPY: pkfuse_domain_copy,
    PKFUSE_DOMAIN_MAP: pkfuse_domain_map,
    PKFUSE_DOMAIN_MAP_FILE: pkfuse_domain_map_file,
    PKFUSE_DOMAIN_UNMAP: pkfuse_domain_unmap,
    PKFUSE_DOMAIN_ATTACH: pkfuse_domain_attach,
    PKFUSE_DOMAIN_DETACH: pkfuse_domain_detach,
    PKFUSE_LAST_ERROR: pkfuse_last_error,
}

for _t, _n in {pkfuse_domain_create: 16, pkfuse_domain_destroy: 16, pkfuse_domain_copy: 16,
               pkfuse_domain_map: 40, pkfuse_domain_map_file: 1064, pkfuse_domain_unmap: 32,
               pkfuse_domain_attach: 16, pkfuse_domain_detach: 16, pkfuse_last_error: 272}.items():
    assert ctypes.sizeof(_t) == _n == _t.MIN_SIZE, (_t.__name__, ctypes.sizeof(_t), _n)
del _t, _n


# --------------------------------------------------------------------------
# Sizes, checked at import against the headers
# --------------------------------------------------------------------------

SIZES: dict[type[ctypes.Structure], int] = {
    iommu_destroy: 8,
    iommu_ioas_alloc: 12,
    iommu_iova_range: 16,
    iommu_ioas_iova_ranges: 32,
    iommu_ioas_map_file: 40,
    iommu_ioas_unmap: 24,
    iommu_option: 24,
    iommu_hwpt_alloc: 48,
    iommu_hwpt_lu_set_preserve: 12,
    vfio_device_bind_iommufd: 24,
    vfio_device_attach_iommufd_pt: 16,
    vfio_device_detach_iommufd_pt: 12,
    pkfuse_device_bind_iommufd: 16,
    pkfuse_device_attach_iommufd_pt: 24,
    pkfuse_device_detach_iommufd_pt: 16,
    liveupdate_ioctl_create_session: 72,
    liveupdate_ioctl_retrieve_session: 72,
    liveupdate_session_preserve_fd: 16,
    liveupdate_session_retrieve_fd: 16,
    liveupdate_session_finish: 8,
    pkfuse_open: 72,
    pkfuse_reboot: 8,
    pkfuse_guest_mmap: 32,
    pkfuse_guest_extent: 24,
}
for _t, _n in SIZES.items():
    assert ctypes.sizeof(_t) == _n, (_t.__name__, ctypes.sizeof(_t), _n)
assert ctypes.sizeof(iommu_ioas_map_file) == 40
assert ctypes.sizeof(iommu_hwpt_alloc) == 48
del _t, _n

# The kernel's minimums: a struct shorter than MIN_SIZE is EINVAL.
assert iommu_hwpt_alloc.MIN_SIZE == 24
assert vfio_device_bind_iommufd.MIN_SIZE == 16
assert vfio_device_attach_iommufd_pt.MIN_SIZE == 12
assert vfio_device_detach_iommufd_pt.MIN_SIZE == 8


# --------------------------------------------------------------------------
# Which struct each command carries, on which kind of connection
# --------------------------------------------------------------------------

#: the first message of a /dev/iommu or /dev/liveupdate connection
OPEN_REQUESTS: dict[int, type[ctypes.Structure]] = {PKFUSE_OPEN: pkfuse_open}

#: on a /dev/iommu connection
IOMMUFD_REQUESTS: dict[int, type[ctypes.Structure]] = {
    IOMMU_DESTROY: iommu_destroy,
    IOMMU_IOAS_ALLOC: iommu_ioas_alloc,
    IOMMU_IOAS_IOVA_RANGES: iommu_ioas_iova_ranges,
    IOMMU_IOAS_MAP_FILE: iommu_ioas_map_file,
    IOMMU_IOAS_UNMAP: iommu_ioas_unmap,
    IOMMU_HWPT_ALLOC: iommu_hwpt_alloc,
    IOMMU_HWPT_LU_SET_PRESERVE: iommu_hwpt_lu_set_preserve,
    VFIO_DEVICE_BIND_IOMMUFD: pkfuse_device_bind_iommufd,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: pkfuse_device_attach_iommufd_pt,
    VFIO_DEVICE_DETACH_IOMMUFD_PT: pkfuse_device_detach_iommufd_pt,
}

#: on the /dev/liveupdate connection
LIVEUPDATE_REQUESTS: dict[int, type[ctypes.Structure]] = {
    LIVEUPDATE_IOCTL_CREATE_SESSION: liveupdate_ioctl_create_session,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION: liveupdate_ioctl_retrieve_session,
    PKFUSE_REBOOT: pkfuse_reboot,
}

#: on a session connection
SESSION_REQUESTS: dict[int, type[ctypes.Structure]] = {
    LIVEUPDATE_SESSION_PRESERVE_FD: liveupdate_session_preserve_fd,
    LIVEUPDATE_SESSION_RETRIEVE_FD: liveupdate_session_retrieve_fd,
    LIVEUPDATE_SESSION_FINISH: liveupdate_session_finish,
}

#: on every connection, whatever it opened: system calls on a file, not ioctls of a device
FILE_REQUESTS: dict[int, type[ctypes.Structure]] = {
    PKFUSE_GUEST_MMAP: pkfuse_guest_mmap,
}

#: descriptors a request carries (every other request carries none)
REQUEST_FDS: dict[int, int] = {
    PKFUSE_GUEST_MMAP: 1,  # the guest-RAM file to map
    IOMMU_IOAS_MAP_FILE: 1,  # the file to map
    IOMMU_HWPT_LU_SET_PRESERVE: 1,  # the session that preserves the HWPT
    LIVEUPDATE_SESSION_PRESERVE_FD: 1,  # the file to preserve
}

#: descriptors a successful reply carries (every other reply carries none)
REPLY_FDS: dict[int, int] = {
    LIVEUPDATE_IOCTL_CREATE_SESSION: 1,  # the session connection
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION: 1,
    LIVEUPDATE_SESSION_RETRIEVE_FD: 1,  # the retrieved file
    PKFUSE_GUEST_MMAP: 2,  # the image (O_RDWR), the sealed memfd of the extent array
}


# --------------------------------------------------------------------------
# Reading, writing and checking structs: the kernel's rules
# --------------------------------------------------------------------------

# Value ranges of the scalar field types, for new(): ctypes itself silently
# truncates (c_uint32(2**32) is 0), which would send a different call.
_RANGES: dict[type, tuple[int, int]] = {
    u8: (0, 0xFF),
    u16: (0, 0xFFFF),
    u32: (0, 0xFFFF_FFFF),
    s32: (-(1 << 31), (1 << 31) - 1),
    aligned_u64: (0, (1 << 64) - 1),
}


def size_field(struct_type: type[ctypes.Structure]) -> str:
    """The name of the struct's leading size field: ``size`` (iommufd, LUO, pkfuse) or ``argsz`` (VFIO)."""
    first = struct_type._fields_[0][0]
    if first not in ("size", "argsz"):
        raise TypeError(f"{struct_type.__name__} has no leading size field")
    return first


def new(struct_type: type[_S], **fields: int | bytes) -> _S:
    """A struct with its size field set to ``sizeof`` and ``fields`` assigned, each range-checked.

    Scalar fields take ints and raise ``OverflowError`` when the value does
    not fit the field. ``u8[N]`` fields (names, paths) take bytes of at most
    N - 1 so that a NUL always ends them, else ``ValueError``.
    """
    inst = struct_type()
    setattr(inst, size_field(struct_type), ctypes.sizeof(struct_type))
    types = dict(struct_type._fields_)
    for name, value in fields.items():
        if name not in types:
            raise TypeError(f"{struct_type.__name__} has no field {name!r}")
        ftype = types[name]
        if issubclass(ftype, ctypes.Array):
            if not isinstance(value, bytes) or len(value) >= ftype._length_:
                raise ValueError(f"{struct_type.__name__}.{name} takes at most {ftype._length_ - 1} bytes")
            ctypes.memmove(ctypes.addressof(inst) + getattr(struct_type, name).offset, value, len(value))
            continue
        lo, hi = _RANGES[ftype]
        if not isinstance(value, int) or not lo <= value <= hi:
            raise OverflowError(f"{struct_type.__name__}.{name} = {value!r} does not fit {ftype.__name__}")
        setattr(inst, name, value)
    return inst


def decode(struct_type: type[_S], payload: bytes) -> _S:
    """Read a request's struct as the kernel does (``get_user`` of size, ``min_size``, ``copy_struct_from_user``).

    - fewer than 4 bytes, or fewer than ``MIN_SIZE``: EINVAL;
    - the size field disagreeing with ``len(payload)``: EINVAL (the datagram
      length is the user buffer: both must say the same);
    - longer than ``sizeof``: the bytes past ``sizeof`` must be zero (else
      E2BIG) and are ignored;
    - shorter than ``sizeof`` (an older, smaller struct): zero-extended.

    The returned struct keeps the caller's size value, as the kernel's buffer
    does; ``respond`` copies back that many bytes at most. Raises
    ``WireError``.
    """
    ksize = ctypes.sizeof(struct_type)
    if len(payload) < 4:
        raise WireError(_errno.EINVAL, f"{struct_type.__name__}: {len(payload)} bytes, no size field")
    usize = int.from_bytes(payload[:4], "little")
    if usize != len(payload):
        raise WireError(_errno.EINVAL, f"{struct_type.__name__}: size {usize} but {len(payload)} bytes sent")
    if usize < struct_type.MIN_SIZE:
        raise WireError(_errno.EINVAL, f"{struct_type.__name__}: size {usize} < minimum {struct_type.MIN_SIZE}")
    if usize > ksize:
        if any(payload[ksize:]):
            raise WireError(_errno.E2BIG, f"{struct_type.__name__}: non-zero bytes past {ksize}")
        payload = payload[:ksize]
    else:
        payload = payload + bytes(ksize - usize)
    return struct_type.from_buffer_copy(payload)


def encode(instance: ctypes.Structure) -> bytes:
    """The struct's bytes, all ``sizeof`` of them: a request as a client sends it."""
    return bytes(instance)


def respond(instance: ctypes.Structure) -> bytes:
    """The bytes the kernel copies back: the first ``min(size, sizeof)`` (``iommufd_ucmd_respond``).

    For the struct ``decode`` returned, so a caller that sent an older,
    smaller struct gets back only the bytes it sent.
    """
    data = bytes(instance)
    return data[: min(getattr(instance, size_field(type(instance))), len(data))]


def _is_reserved(name: str) -> bool:
    return name == "reserved" or name.startswith("__reserved")


def check_reserved(instance: ctypes.Structure) -> None:
    """Raise ``WireError(EOPNOTSUPP)`` if any ``reserved``/``__reserved*`` field is non-zero.

    The kernel's rule for a known field with a value it does not support.
    Flags are the caller's to validate: which bits are known depends on the
    call.
    """
    for name, ftype in instance._fields_:
        if not _is_reserved(name):
            continue
        value = getattr(instance, name)
        nonzero = any(value) if issubclass(ftype, ctypes.Array) else value != 0
        if nonzero:
            raise WireError(_errno.EOPNOTSUPP, f"{type(instance).__name__}.{name} is not 0")


def cstring(field: ctypes.Array) -> bytes:
    """The bytes of a ``u8[N]`` name or path field up to its first NUL (all N if none)."""
    raw = bytes(field)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def decode_iova_ranges(data: bytes) -> list[tuple[int, int]]:
    """The ``iommu_iova_range`` array after an IOVA_RANGES reply's struct, as (start, last) pairs.

    ``len(data)`` must be a multiple of 16, else ``WireError(EINVAL)``.
    """
    width = ctypes.sizeof(iommu_iova_range)
    if len(data) % width:
        raise WireError(_errno.EINVAL, f"{len(data)} bytes is not an array of iommu_iova_range")
    count = len(data) // width
    array = (iommu_iova_range * count).from_buffer_copy(data)
    return [(r.start, r.last) for r in array]


def encode_iova_ranges(ranges: list[tuple[int, int]]) -> bytes:
    """The ``iommu_iova_range`` array that follows an IOVA_RANGES reply's struct."""
    array = (iommu_iova_range * len(ranges))(*(iommu_iova_range(start, last) for start, last in ranges))
    return bytes(array)


def decode_guest_extents(data: bytes) -> list[tuple[int, int, int]]:
    """The ``pkfuse_guest_extent`` array of a GUEST_MMAP reply's memfd, as (file_offset, image_offset, length).

    ``len(data)`` must be a multiple of 24, else ``WireError(EINVAL)``.
    """
    width = ctypes.sizeof(pkfuse_guest_extent)
    if len(data) % width:
        raise WireError(_errno.EINVAL, f"{len(data)} bytes is not an array of pkfuse_guest_extent")
    return list(_GUEST_EXTENT.iter_unpack(data))


def encode_guest_extents(extents: list[tuple[int, int, int]]) -> bytes:
    """The ``pkfuse_guest_extent`` array of ``(file_offset, image_offset, length)`` triples."""
    return b"".join(_GUEST_EXTENT.pack(*e) for e in extents)


_GUEST_EXTENT = struct.Struct("<QQQ")  #: pkfuse_guest_extent's bytes (its layout is asserted at import)
assert _GUEST_EXTENT.size == ctypes.sizeof(pkfuse_guest_extent)
