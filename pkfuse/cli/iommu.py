"""``pkfuse iommu``: program and inspect the simulated VT-d IOMMU of an image.

Commands that change IOMMU state (create, destroy, copy, map, unmap,
attach, detach) play the kernel. On an image no daemon serves they open it
read-write and take its lock, exactly as the daemon does. On an image a
daemon serves -- named by its path (found among this namespace's
fuse.pkfuse mounts, /proc/self/mountinfo) or by its MOUNTPOINT -- they ask
that daemon, the kernel in charge, through its control socket (the
``PKFUSE_DOMAIN_*`` calls of ``pkfuse.uapi.wire``): the same library calls
on its live IOMMU, so the same checks and the same one-line errors (the
daemon's reason comes back with ``PKFUSE_LAST_ERROR``). The daemon also
refuses (EBUSY) to touch a domain an iommufd HWPT owns or live update holds,
and to attach a requester an iommufd context has bound. Before connecting, values the wire
cannot carry are refused here: a DID below 0 or above 32 bits (0 too, where
it names a new domain: 0 means "any" on the wire), an address or length
beyond 64 bits (a usage error, exit 2). A read-only mount has no control
socket: those commands are refused on it.

``list`` opens an unmounted image read-only without the lock; on a served
image it prints the daemon's view, ``MOUNTPOINT/.pkernfs/iommu`` (its
domains, then its live iommufd objects). ``translate`` is the hardware: it
maps the image read-only and walks it with the register block, so it works
while a daemon runs. ``enable``, ``disable`` and ``faults`` touch only the
register block (``IMAGE.regs`` unless --regs). Given a MOUNTPOINT, these four
use the image and register block its status names.

Exit status: 0 done, 1 refused (one line on stderr), 2 usage, 3 ``translate``
reported at least one fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from backing import format as fmt
from backing import regs as regs_mod
from backing import walker
from backing.domainhdr import MAX_DOMAIN_ID, domain_file_name
from backing.errors import FormatError, ImageBusy, PkfuseError, StoreError
from backing.iommu import Iommu
from backing.mkfs import parse_addr
from backing.store import Store
from pkfuse.daemon import mountinfo, views
from pkfuse.uapi.admin import IommuAdmin
from pkfuse.uapi.client import STATUS_FILE, ConnectionClosed

from . import report

PROG = "pkfuse iommu"
_BDF = re.compile(r"^(?:[0-9a-fA-F]{4}:)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


class UsageError(Exception):
    pass


def parse_bdf(text: str) -> tuple[int, int, int]:
    """``bb:dd.f`` (hex, optional ``dddd:`` segment) -> (bus, dev, fn)."""
    m = _BDF.match(text.strip())
    if not m:
        raise UsageError(f"not a requester id: {text!r} (want bus:dev.fn in hex, e.g. 00:03.0)")
    bus, dev, fn = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3))
    if dev > 31:
        raise UsageError(f"device {dev:#x} out of range (0-1f)")
    return bus, dev, fn


def _number(text: str) -> int:
    try:
        return parse_addr(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (examples: 0x200000, 2M, 4096)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="iommu_command", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("image", metavar="IMAGE")
        p.add_argument("--regs", metavar="FILE", help="register block file (default IMAGE.regs)")
        return p

    p = action("create", "create an empty domain iommu/dom-<DID>")
    p.add_argument("--id", type=int, dest="did", help="domain id (default: the smallest free one)")
    p = action("destroy", "unmap everything in a detached domain and free its pages")
    p.add_argument("did", type=int, metavar="DID")
    p = action("copy", "copy a domain into a new one with the same translations (save/restore)")
    p.add_argument("did", type=int, metavar="DID")
    p.add_argument("--id", type=int, dest="new_did", help="id of the copy (default: the smallest free one)")
    p = action("map", "map an IOVA range to guest RAM (a file and offset, or a physical address)")
    p.add_argument("did", type=int, metavar="DID")
    p.add_argument("--iova", type=_number, required=True)
    p.add_argument("--length", type=_number, required=True, help="bytes, 4 KiB multiple (e.g. 2M)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--file", help="guest-RAM file, relative to the image root (e.g. guest_mem/vm0)")
    where.add_argument("--phys", type=_number, help="physical address instead of --file")
    p.add_argument("--offset", type=_number, default=0, help="byte offset in --file (default 0)")
    p.add_argument("--ro", action="store_true", help="read-only mapping (no W bit)")
    p = action("unmap", "unmap an IOVA range (parts of superpages are split)")
    p.add_argument("did", type=int, metavar="DID")
    p.add_argument("--iova", type=_number, required=True)
    p.add_argument("--length", type=_number, required=True)
    p = action("attach", "point a requester's context entry at a domain")
    p.add_argument("did", type=int, metavar="DID")
    p.add_argument("bdf", metavar="BUS:DEV.FN")
    p.add_argument("--replace", action="store_true", help="take the requester from the domain it is attached to")
    p = action("detach", "clear a requester's context entry")
    p.add_argument("did", type=int, metavar="DID")
    p.add_argument("bdf", metavar="BUS:DEV.FN")
    action("list", "domains, attached requesters and mappings")
    p = action("translate", "walk the tables as the hardware does (works while mounted)")
    p.add_argument("bdf", metavar="BUS:DEV.FN")
    p.add_argument("iovas", type=_number, nargs="+", metavar="IOVA")
    p.add_argument("--write", action="store_true", help="a write request (default: read)")
    action("enable", "program the root table address and turn translation on")
    action("disable", "turn translation off (requests are blocked)")
    p = action("faults", "print the fault log, oldest first")
    p.add_argument("--clear", action="store_true", help="empty the log after printing it")


def run(args: argparse.Namespace) -> int:
    try:
        served = _where(args)
        if served is not None:
            return _LIVE_COMMANDS[args.iommu_command](args, served)
        return _COMMANDS[args.iommu_command](args)
    except UsageError as exc:
        _error(args, str(exc))
        return 2
    except ImageBusy as exc:
        _error(args, f"{exc} (stop the daemon first: the IOMMU commands play the kernel)")
        return 1
    except (PkfuseError, OSError, ValueError) as exc:
        _error(args, report.one_line(exc))
        return 1


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"{PROG} {args.iommu_command}: error: {message}", file=sys.stderr)


def _regs_path(args: argparse.Namespace) -> str:
    return args.regs or regs_mod.default_path(args.image)


def _existing_regs(args: argparse.Namespace) -> regs_mod.Regs:
    path = _regs_path(args)
    if not os.path.exists(path):
        raise UsageError(f"no register block at {path} (made by `pkfuse iommu enable` or a mount)")
    return regs_mod.Regs.open(path, create=False)


@contextmanager
def _opened(args: argparse.Namespace, *, write: bool, regs: bool = False) -> Iterator[Iommu]:
    """The image's IOMMU; with the register block if ``regs``, and for a ``write`` whenever the
    block exists (a device's caches may hold what the command changes: the driver posts the
    invalidations there)."""
    store = Store.open(args.image, read_only=not write, lock=write)
    try:
        io = Iommu.open(store, _regs_path(args) if regs or (write and os.path.exists(_regs_path(args))) else None)
        try:
            yield io
        finally:
            io.close()
    finally:
        store.close()


def _lookup(store: Store, path: str) -> int:
    ino = fmt.ROOT_INO
    for part in path.strip("/").split("/"):
        if part:
            ino = store.lookup(ino, part.encode())
    return ino


# ----------------------------------------------------------------- commands


def cmd_create(args: argparse.Namespace) -> int:
    with _opened(args, write=True) as io:
        d = io.create_domain(args.did)
        print(f"{d.path}: DID {d.domain_id}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    with _opened(args, write=True) as io:
        io.destroy_domain(io.domain(args.did))
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    with _opened(args, write=True) as io:
        d = io.copy_domain(io.domain(args.did), args.new_did)
        print(f"{d.path}: DID {d.domain_id}, a copy of dom-{args.did}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    with _opened(args, write=True) as io:
        d = io.domain(args.did)
        store = io.store
        if args.file is not None:
            d.map_file(_lookup(store, args.file), args.offset, args.length, args.iova, write=not args.ro)
        else:
            d.map(args.iova, args.phys, args.length, write=not args.ro)
        for m in d.mappings():
            if m.iova < args.iova + args.length and args.iova < m.iova + m.length:
                print(f"{d.path}: {views.mapping_line(m)}")
    return 0


def cmd_unmap(args: argparse.Namespace) -> int:
    with _opened(args, write=True) as io:
        n = io.domain(args.did).unmap(args.iova, args.length)
        print(f"unmapped {n:#x} bytes")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    bus, dev, fn = parse_bdf(args.bdf)
    with _opened(args, write=True) as io:
        io.domain(args.did).attach(bus, dev, fn, replace=args.replace)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    bus, dev, fn = parse_bdf(args.bdf)
    with _opened(args, write=True) as io:
        io.domain(args.did).detach(bus, dev, fn)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _opened(args, write=False, regs=os.path.exists(_regs_path(args))) as io:
        sys.stdout.write(views.render_iommu(io))
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    bus, dev, fn = parse_bdf(args.bdf)
    wide = [i for i in args.iovas if i >> 64]
    if wide:
        raise UsageError(f"IOVA {wide[0]:#x} does not fit 64 bits")
    iovas = np.array(args.iovas, dtype=np.uint64)
    u64, base_phys, npages = walker.open_image(args.image)
    with _existing_regs(args) as regs:
        phys, fault = walker.translate(u64, base_phys, npages, regs, fmt.requester_id(bus, dev, fn),
                                       iovas, args.write)
    for i, p, f in zip(iovas.tolist(), phys.tolist(), fault.tolist()):
        if f:
            print(f"{i:#x}: fault {f:#04x} ({fmt.FR_NAMES.get(f, 'unknown')})")
        else:
            print(f"{i:#x} -> {p:#x}")
    return 3 if fault.any() else 0


def cmd_enable(args: argparse.Namespace) -> int:
    with _opened(args, write=False, regs=True) as io:
        io.enable()
        print(f"translation enabled, root table {io.root_table_phys:#x}")
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    with _existing_regs(args) as regs:
        regs.disable()
    return 0


def cmd_faults(args: argparse.Namespace) -> int:
    with _existing_regs(args) as regs:
        faults = regs.faults()
        for f in faults:
            print(f)
        if faults and faults[0].seq > 1:
            print(f"({faults[0].seq - 1} older faults dropped from the {fmt.FAULT_LOG_ENTRIES}-entry log)")
        if args.clear:
            regs.clear_faults()
    return 0


_COMMANDS = {
    "create": cmd_create, "destroy": cmd_destroy, "copy": cmd_copy, "map": cmd_map, "unmap": cmd_unmap,
    "attach": cmd_attach, "detach": cmd_detach, "list": cmd_list, "translate": cmd_translate,
    "enable": cmd_enable, "disable": cmd_disable, "faults": cmd_faults,
}


# ------------------------------------------------------- on a served image


@dataclasses.dataclass(frozen=True)
class Served:
    """A daemon serving the image: where it is mounted and what its status says."""

    mountpoint: str
    image: str
    control: str | None  #: its control socket; None for a read-only mount (it serves none)
    regs: str | None  #: its register block


def _status(mnt: str) -> dict[str, str]:
    """``MOUNTPOINT/.pkernfs/status`` as a dict (OSError if the daemon does not answer)."""
    out = {}
    for line in Path(mnt, STATUS_FILE).read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _served_at(mnt: str) -> Served:
    st = _status(mnt)
    if "image" not in st:
        raise UsageError(f"{mnt}/.pkernfs/status names no image: not a pkfuse mount")
    return Served(mnt, st["image"], st.get("control_socket") or None, st.get("iommu_regs") or None)


def _same_file(a: os.stat_result, path: str) -> bool:
    try:
        b = os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _served_image(image: str) -> Served | None:
    """The daemon serving the image file ``image``, found by its mount's source; None if none answers.

    A mount whose daemon is dead (ENOTCONN) serves nothing: the image is then
    used offline as before. A mount renamed with ``-o fsname`` is not found:
    the offline command then meets the daemon's lock (name the MOUNTPOINT).
    """
    try:
        st = os.stat(image)
    except OSError:
        return None  # the offline command reports it as it always has
    for mnt, source in mountinfo.pkfuse_mounts():
        if not _same_file(st, source):
            continue
        try:
            served = _served_at(mnt)
        except OSError:
            continue  # a dead daemon's mount
        if _same_file(st, served.image):
            return served
    return None


def _where(args: argparse.Namespace) -> Served | None:
    """Whether this command goes to a live daemon (its ``Served``), or runs here (None).

    A MOUNTPOINT argument is a daemon's; for the hardware commands it stands
    for the image and register block the daemon uses, which they then read
    themselves.
    """
    target = args.image
    live = args.iommu_command in _LIVE_COMMANDS
    if mountinfo.mount_source(target) is not None:
        served = _served_at(mountinfo.mount_path(target))
        if live:
            return served
        args.image = served.image
        if args.regs is None and served.regs is not None:
            args.regs = served.regs
        return None
    return _served_image(target) if live else None


@contextmanager
def _admin(served: Served) -> Iterator[IommuAdmin]:
    """A /dev/iommu connection to the daemon; its refusals become StoreErrors (``ENAME: reason``)."""
    if served.control is None:
        raise StoreError(errno.EROFS, f"{served.image} is served read-only on {served.mountpoint}: its daemon has "
                                      "no control socket and changes no IOMMU state")
    try:
        admin = IommuAdmin(served.control)
    except (ConnectionClosed, OSError) as exc:
        raise StoreError(exc.errno or errno.ECONNREFUSED, f"cannot reach the daemon serving {served.image} at "
                                                          f"{served.control}: {exc.strerror or exc}") from None
    try:
        yield admin
    except ConnectionClosed:
        raise StoreError(errno.ECONNRESET, f"the daemon serving {served.image} closed the connection") from None
    except OSError as exc:
        if exc.errno is None:
            raise
        raise StoreError(exc.errno, exc.strerror or os.strerror(exc.errno)) from None
    finally:
        admin.release()


_U32 = (1 << 32) - 1


def _did(did: int) -> int:
    """A DID to look up, as the wire carries it; one it cannot carry names no domain (the library's words)."""
    if not 0 <= did <= _U32:
        raise StoreError(errno.ENOENT, f"no IOMMU domain {did}")
    return did


def _new_did(did: int | None) -> int:
    """A DID for a new domain, 0 for any; one the wire cannot carry is refused in the library's words."""
    if did is None:
        return 0
    if not 1 <= did <= _U32:
        raise StoreError(errno.EINVAL, f"domain id {did} outside 1..{MAX_DOMAIN_ID}")
    return did


def _u64(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value >> 64:
            raise UsageError(f"--{name} {value:#x} does not fit 64 bits")


def _domain_path(did: int) -> str:
    return f"iommu/{domain_file_name(did).decode()}"


def live_create(args: argparse.Namespace, served: Served) -> int:
    did = _new_did(args.did)
    with _admin(served) as admin:
        did = admin.domain_create(did)
    print(f"{_domain_path(did)}: DID {did}")
    return 0


def live_destroy(args: argparse.Namespace, served: Served) -> int:
    did = _did(args.did)
    with _admin(served) as admin:
        admin.domain_destroy(did)
    return 0


def live_copy(args: argparse.Namespace, served: Served) -> int:
    src, new = _did(args.did), _new_did(args.new_did)
    with _admin(served) as admin:
        new = admin.domain_copy(src, new)
    print(f"{_domain_path(new)}: DID {new}, a copy of dom-{args.did}")
    return 0


def live_map(args: argparse.Namespace, served: Served) -> int:
    _u64(args, "iova", "length", "phys", "offset")
    did = _did(args.did)
    with _admin(served) as admin:
        if args.file is not None:
            admin.domain_map_file(did, args.file, args.offset, args.length, args.iova, writeable=not args.ro)
        else:
            admin.domain_map(did, args.iova, args.phys, args.length, writeable=not args.ro)
    # what the offline command prints: the domain's mappings over the range, from the daemon's view
    for line in _view_mappings(served, did):
        first, last = (int(x, 16) for x in line.split()[0].split("-"))
        if first < args.iova + args.length and args.iova <= last:
            print(f"{_domain_path(did)}: {line}")
    return 0


def _view_mappings(served: Served, did: int) -> list[str]:
    """The mapping lines of domain ``did`` in ``.pkernfs/iommu`` (``views.render_iommu``'s format)."""
    lines = Path(served.mountpoint, ".pkernfs", "iommu").read_text().splitlines()
    head = f"{_domain_path(did)}: DID {did},"
    out: list[str] = []
    inside = False
    for line in lines:
        if not line.startswith(" "):
            inside = line.startswith(head)
        elif inside:
            out.append(line.strip())
    return out


def live_unmap(args: argparse.Namespace, served: Served) -> int:
    _u64(args, "iova", "length")
    did = _did(args.did)
    with _admin(served) as admin:
        n = admin.domain_unmap(did, args.iova, args.length)
    print(f"unmapped {n:#x} bytes")
    return 0


def live_attach(args: argparse.Namespace, served: Served) -> int:
    rid = fmt.requester_id(*parse_bdf(args.bdf))
    did = _did(args.did)
    with _admin(served) as admin:
        admin.domain_attach(did, rid, replace=args.replace)
    return 0


def live_detach(args: argparse.Namespace, served: Served) -> int:
    rid = fmt.requester_id(*parse_bdf(args.bdf))
    did = _did(args.did)
    with _admin(served) as admin:
        admin.domain_detach(did, rid)
    return 0


def live_list(args: argparse.Namespace, served: Served) -> int:
    sys.stdout.write(Path(served.mountpoint, ".pkernfs", "iommu").read_text())
    return 0


_LIVE_COMMANDS: dict[str, Callable[[argparse.Namespace, Served], int]] = {
    "create": live_create, "destroy": live_destroy, "copy": live_copy, "map": live_map, "unmap": live_unmap,
    "attach": live_attach, "detach": live_detach, "list": live_list,
}

__all__ = ["FormatError", "add_arguments", "parse_bdf", "run"]
