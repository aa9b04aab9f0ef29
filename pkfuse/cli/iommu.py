"""``pkfuse iommu``: program and inspect the simulated VT-d IOMMU of an image.

Commands that change IOMMU state (create, destroy, copy, map, unmap,
attach, detach) open the image read-write and take its lock, exactly as the
daemon does: they play the kernel, so they refuse while a daemon serves the
image. ``list`` opens it read-only without the lock. ``translate`` is the
hardware: it maps the image read-only and walks it with the register
block, so it works while a daemon runs. ``enable``, ``disable`` and
``faults`` touch only the register block (``IMAGE.regs`` unless --regs).

Exit status: 0 done, 1 refused (one line on stderr), 2 usage, 3 ``translate``
reported at least one fault.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from backing import format as fmt
from backing import regs as regs_mod
from backing import walker
from backing.errors import FormatError, ImageBusy, PkfuseError
from backing.iommu import Iommu
from backing.mkfs import parse_addr
from backing.store import Store
from pkfuse.daemon import views

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
    store = Store.open(args.image, read_only=not write, lock=write)
    try:
        io = Iommu.open(store, _regs_path(args) if regs else None)
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

__all__ = ["FormatError", "add_arguments", "parse_bdf", "run"]
