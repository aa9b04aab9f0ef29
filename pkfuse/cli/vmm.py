"""``pkfuse vmm``: run a VM whose RAM is a guest file on a mount; its live update; its verifier.

``run GUEST_FILE --memory SIZE --vcpus N`` runs in the foreground with a
one-line live status, for ``--seconds`` or until Ctrl-C / SIGTERM, which
pause the vCPUs, save their state into ``GUEST_FILE.vmstate`` and release
everything (``--resume`` continues from there). ``run --incoming SESSION
MOUNTPOINT`` is the successor of a live update. ``--monitor PATH`` serves a
line protocol on a Unix stream socket (``pkfuse vmm monitor PATH COMMAND``
sends one): ``status``, ``pause``, ``continue``, ``prepare SESSION``,
``freeze``, ``cancel``, ``stop``; each reply is one line, ``ok ...`` or
``error: ...``. ``pause`` stops the vCPUs at an instruction boundary and
``continue`` runs them again (what a test needs to read guest RAM whole,
outside any live update). After ``freeze`` the
VMM has nothing left to do: it exits 0 once the monitor client has its reply
(the vCPUs were saved and the kernel has gone down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vmm", help="run a VM whose RAM is a guest file on a mount",
                       description="A KVM (or Unicorn) VM whose guest RAM is a pkernfs guest file's image pages, "
                                   "its device's DMA through iommufd, and its side of live update.")
    vsub = p.add_subparsers(dest="vmm_command", metavar="COMMAND", required=True)

    r = vsub.add_parser("run", help="run a VM in the foreground",
                        description="Run a VM in the foreground with a one-line status; Ctrl-C or SIGTERM pause "
                                    "it, save its vCPUs into GUEST_FILE.vmstate and stop.")
    r.add_argument("guest", metavar="GUEST_FILE|MOUNTPOINT",
                   help="the guest-RAM file on a pkfuse mount (created if missing); with --incoming, the mount")
    r.add_argument("--memory", help="guest RAM, e.g. 64M, 2G (a multiple of 2 MiB)")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--engine", choices=["kvm", "unicorn", "auto"], default="auto")
    r.add_argument("--device", default="00:03.0", help="requester id of the DMA device, or 'none'")
    r.add_argument("--dirty-share", type=float, default=0.5, help="fraction of RAM the guest keeps dirtying")
    r.add_argument("--dma-every", type=int, default=64, help="guest steps between DMA requests (0: none)")
    r.add_argument("--iommu-pgsize", choices=["2M", "4K"], default="2M",
                   help="IOMMU leaves of the device's HWPT: 2M (default) superpages wherever guest RAM is aligned "
                        "for them; 4K every leaf 4 KiB (IOMMU_OPTION_HUGE_PAGES 0 on the IOAS); give the successor "
                        "(--incoming) the same")
    r.add_argument("--seconds", type=float, help="stop after this long")
    r.add_argument("--json", metavar="FILE", help="write the final state and timings here ('-': stdout)")
    r.add_argument("--resume", action="store_true", help="continue from GUEST_FILE.vmstate")
    r.add_argument("--reboot", action="store_true",
                   help="cold-boot the same VM over its RAM (after a host crash: its state blocks kept, the guest "
                        "takes them over)")
    r.add_argument("--incoming", metavar="SESSION", help="the successor of a live update: retrieve SESSION")
    r.add_argument("--timeout", type=float, default=60.0, help="--incoming: how long to wait for the daemon")
    r.add_argument("--monitor", metavar="PATH", help="serve the monitor on this Unix socket")
    r.add_argument("--quiet", action="store_true", help="no live status line (the final line is always printed)")
    r.set_defaults(func=cmd_run)

    m = vsub.add_parser("monitor", help="send one command to a running VMM's monitor",
                        description="Send one line to a VMM's --monitor socket and print its reply; exit 1 on "
                                    "an 'error:' reply.")
    m.add_argument("path", metavar="PATH")
    m.add_argument("words", nargs="+", metavar="COMMAND")
    m.add_argument("--timeout", type=float, default=30.0)
    m.set_defaults(func=cmd_monitor)

    v = vsub.add_parser("verify", help="check a guest's RAM from outside",
                        description="Read a guest-RAM file and check every invariant its guest keeps; exit 1 "
                                    "on a violation.")
    v.add_argument("guest", metavar="GUEST_FILE")
    v.add_argument("--json", metavar="FILE")
    v.set_defaults(func=cmd_verify)


def _write_json(dest: str | None, data: dict[str, Any]) -> None:
    if dest is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if dest == "-":
        sys.stdout.write(text)
    else:
        with open(dest, "w") as f:
            f.write(text)


class _Stop(BaseException):
    """A signal while the VM is being set up (BaseException: no ``except Exception`` swallows it)."""


def cmd_run(args: argparse.Namespace) -> int:
    from backing.mkfs import parse_size
    from pkfuse.vmm.vmm import Vmm, VmmError, VmmSpec

    stop = {"why": ""}

    def while_starting(signum: int, frame: object) -> None:
        # unwinds the start (or the wait for a daemon) through its cleanup: nothing is left mapped
        raise _Stop(signal.Signals(signum).name)

    def while_running(signum: int, frame: object) -> None:
        stop["why"] = signal.Signals(signum).name  # the loop pauses, saves and stops

    old = {s: signal.signal(s, while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            if args.incoming:
                vmm = Vmm.incoming(args.guest, args.incoming, engine=args.engine, timeout=args.timeout,
                                   iommu_pgsize=args.iommu_pgsize)
            else:
                if args.memory is None:
                    raise VmmError("--memory is required (unless --incoming)")
                spec = VmmSpec(args.guest, parse_size(args.memory), args.vcpus, args.engine,
                               None if args.device == "none" else args.device, args.dirty_share, args.dma_every,
                               iommu_pgsize=args.iommu_pgsize)
                vmm = Vmm.start(spec, resume=args.resume, reboot=args.reboot)
        except _Stop as exc:
            raise VmmError(f"stopped by {exc} before the VM ran") from None
        for s in old:
            signal.signal(s, while_running)
        try:
            code = _serve(vmm, args, stop)
        except BaseException:
            vmm.close(save=False)
            raise
        saved = not vmm.rebooted
        vmm.close(save=saved)
        print(f"\r{vmm.status_line()}  [{stop['why'] or 'done'}; {'vCPUs saved' if saved else 'rebooted'}]",
              file=sys.stderr)  # the result, also with --quiet
        _write_json(args.json, vmm.describe())
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _serve(vmm: Any, args: argparse.Namespace, stop: dict[str, str]) -> int:
    """The foreground loop: status line, monitor commands, --seconds, signals."""
    sel = selectors.DefaultSelector()
    listener = None
    if args.monitor:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.monitor)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(args.monitor)
        finally:
            os.umask(old)
        listener.listen(4)
        sel.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + args.seconds if args.seconds else None
    live_status = not args.quiet and sys.stderr.isatty()  # a log gets the final line only
    try:
        while not stop["why"]:
            if deadline is not None and time.monotonic() >= deadline:
                stop["why"] = "time"
                break
            if set(vmm.engine.stopped()) >= set(range(vmm.nr_vcpus)):
                stop["why"] = "every vCPU stopped: " + "; ".join(
                    f"{i}: {why}" for i, why in sorted(vmm.engine.stopped().items()))
                break
            if live_status:
                print(f"\r{vmm.status_line()}", end="", file=sys.stderr, flush=True)
            for key, _ in sel.select(timeout=0.25):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    sel.register(conn, selectors.EVENT_READ, data=b"")
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                chunk = conn.recv(4096)
                buf = key.data + chunk
                if not chunk:
                    sel.unregister(conn)
                    conn.close()
                    continue
                *lines, rest = buf.split(b"\n")
                sel.modify(conn, selectors.EVENT_READ, data=rest)
                for line in lines:
                    reply, then = _command(vmm, line.decode(errors="replace").split())
                    conn.sendall(reply.encode() + b"\n")
                    if then:
                        stop["why"] = then
        return 0 if not vmm.ports.errors else 1
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        if args.monitor:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.monitor)


def _command(vmm: Any, words: list[str]) -> tuple[str, str]:
    """One monitor command: (reply line, why to stop or '')."""
    from pkfuse.cli.report import one_line

    try:
        match words:
            case ["status"]:
                return "ok " + json.dumps(vmm.describe(), default=str), ""
            case ["pause"]:
                vmm.pause()
                return "ok paused", ""
            case ["continue"]:
                vmm.resume()
                return "ok running", ""
            case ["prepare", name]:
                vmm.prepare(name)
                return f"ok prepared {name}", ""
            case ["cancel"]:
                vmm.cancel()
                return "ok cancelled", ""
            case ["freeze"]:
                vmm.freeze()
                return "ok frozen " + json.dumps(vmm.timings), "frozen"
            case ["stop"]:
                return "ok stopping", "monitor"
            case _:
                return f"error: unknown command {' '.join(words)!r} (status, pause, continue, prepare SESSION, freeze, cancel, stop)", ""
    except Exception as exc:  # noqa: BLE001 -- every refusal is a reply, the VMM goes on
        return f"error: {one_line(exc)}", ""


def cmd_monitor(args: argparse.Namespace) -> int:
    from pkfuse.vmm import monitor

    text = monitor.call(args.path, args.words, args.timeout)
    print(text)
    return 1 if not text.startswith("ok") else 0


def cmd_verify(args: argparse.Namespace) -> int:
    import numpy as np

    from pkfuse.vmm import verify

    with open(args.guest, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        ram = np.empty(size, np.uint8)
        view = memoryview(ram)
        at = 0
        while at < size:
            n = f.readinto(view[at:at + (8 << 20)])
            if not n:
                break
            at += n
    verdict = verify.verify(ram)
    print(verdict.summary())
    for finding in verdict.findings:
        print(f"  {finding}")
    _write_json(args.json, verdict.as_dict() if hasattr(verdict, "as_dict") else {"summary": verdict.summary()})
    return 0 if verdict.ok else 1
