"""The daemon's body: open and lock the image, mount, serve on trio, shut down cleanly.

Lifecycle of ``pkfuse mount --foreground IMAGE MNT`` (``preflight`` passed):

1. ``Store.open`` (flock: a second daemon on the image gets ``ImageBusy``;
   journal replay and validation: a bad image gives ``FormatError``);
2. the IOMMU state and its register block load (``Iommu.open``);
3. ``pyfuse3.init`` mounts; ``pyfuse3.main`` serves in a trio nursery next
   to a task that turns SIGTERM/SIGINT/SIGHUP into ``pyfuse3.terminate``;
4. the loop ends on unmount (``fusermount3 -u``) or a signal; then the
   mount is removed (``pyfuse3.close``), orphans are freed, the store is
   closed (marked clean) and the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from backing.errors import FormatError, ImageBusy, PkfuseError

from .logs import detach_stdio
from .mountinfo import mount_device
from .options import fuse_options
from .preflight import EXIT_BAD_IMAGE, EXIT_ERROR, EXIT_IMAGE_BUSY, EXIT_NO_FUSE, EXIT_OK, EXIT_USAGE, MountError

if TYPE_CHECKING:
    from backing.iommu import Iommu  # annotations only: serve imports the libraries as it runs
    from backing.store import Store

    from .control import ControlServer

log = logging.getLogger(__name__)


def serve(image: str, mnt: str, opts: dict[str, Any], *, daemonized: bool = False) -> int:
    """Mount ``image`` on ``mnt`` and serve until unmounted or signalled. Returns the exit status.

    The caller ran ``preflight``. Raises ``MountError`` (or
    PkfuseError/OSError) before the mount exists.
    ``daemonized``: once mounted, detach stdio (stderr to the log) so the
    parent waiting on our stderr sees EOF.
    """
    import pyfuse3
    import trio

    from backing.store import Store

    from .fs import Operations

    image = os.path.abspath(image)
    mnt = os.path.abspath(mnt)
    try:
        store = Store.open(image, read_only=opts["read_only"])
    except ImageBusy as exc:
        raise MountError(f"{exc} (unmount it first, or use `pkfuse info` to look)", EXIT_IMAGE_BUSY) from None
    except FormatError as exc:
        raise MountError(f"{image} is not a usable pkfuse image: {exc}", EXIT_BAD_IMAGE) from None
    except PermissionError as exc:
        raise MountError(f"cannot open {image}: {exc.strerror}", EXIT_ERROR) from None
    iommu: Iommu | None = None
    ops: Operations | None = None
    control = None
    try:
        iommu, regs = _open_iommu(store, image, opts)
        control = _control_server(store, iommu, opts)
        ops = Operations(store, iommu=iommu, regs_path=regs)
        ops.control_path = control.path if control is not None else None
        if control is not None:  # the live iommufd objects in the views, with each context's pid
            ops.iommufd, ops.connections = control.iommufd, control.connections
            ops.liveupdate = control.lu
            ops.guest_maps = control.guest_maps
        options = fuse_options(image, opts)
        log.info("mounting %s on %s (options %s, pid %d, generation %d)", image, mnt,
                 ",".join(sorted(options)), os.getpid(), store.generation)
        try:
            pyfuse3.init(ops, mnt, options)
        except RuntimeError as exc:
            if "fuse_session_new" in str(exc):
                raise MountError(f"libfuse rejected the mount options {','.join(sorted(options))}",
                                 EXIT_USAGE) from None
            raise MountError(f"the kernel refused to mount {mnt} ({exc}); is FUSE available?", EXIT_NO_FUSE) from None
        try:
            if control is not None:
                control.resolver.mount_dev = mount_device(mnt)
                control.resolver.mountpoint = mnt
                control.listen()  # before the mount is announced: a client never finds it missing
                log.info("control socket %s", control.path)
            if daemonized:
                detach_stdio()
            os.chdir("/")
            trio.run(_main, pyfuse3, control)
        finally:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
            ops.forget_all()  # the kernel's references are gone: free orphans
        log.info("unmounted %s; closing the image", mnt)
    finally:
        if control is not None:
            control.iommufd.close()  # every connection is gone: what they held is released
        if ops is not None:
            ops.close()
        if iommu is not None:
            with contextlib.suppress(Exception):
                iommu.close()
        store.close()
    log.info("image %s closed cleanly", image)
    return EXIT_OK


def _open_iommu(store: Store, image: str, opts: dict[str, Any]) -> tuple[Iommu | None, str | None]:
    """Load the IOMMU driver state (``backing.iommu``) and its register block.

    The register block defaults to ``IMAGE.regs`` (made, reset, if missing;
    a read-only mount does not make one). Pins live in this state: without
    it nothing would stop a truncate or unlink of guest pages that a
    domain's tables still point at. So state that does not load refuses a
    read-write mount; a read-only mount serves the files and says why in
    the log and in ``.pkernfs/status``. With ``-o domains=ephemeral`` the
    HWPT domains' tables go to ``IMAGE.ephemeral`` (host RAM outside the
    reserved range), which the open poisons: nothing there survives a restart.
    """
    from backing import iommu as iommu_mod
    from backing import regs as regs_mod

    regs: str | None = os.path.abspath(opts.get("regs") or regs_mod.default_path(image))
    if opts["read_only"] and regs and not os.path.exists(regs):
        regs = None
    ephemeral = None
    if opts.get("domains") == "ephemeral" and not opts["read_only"]:
        from backing import ephemeral as ephemeral_mod

        ephemeral = ephemeral_mod.default_path(image)  # host RAM outside the reserved range
    try:
        return iommu_mod.Iommu.open(store, regs, ephemeral=ephemeral), regs
    except (PkfuseError, OSError) as exc:
        if not opts["read_only"]:
            raise MountError(f"the IOMMU state of {image} does not load ({exc}); guest files could not be "
                             "pinned, so only --read-only mounts are allowed", EXIT_BAD_IMAGE) from None
        log.error("IOMMU state not loaded (regs %s): %s", regs, exc)
    return None, regs


def _control_server(store: Any, iommu: Any, opts: dict[str, Any]) -> ControlServer | None:
    """The control socket's server, unless the mount is read-only or has no IOMMU state
    (every call would be EROFS)."""
    if opts["read_only"] or iommu is None:
        return None
    from backing.iommufd import Iommufd
    from backing.liveupdate import LiveUpdate

    from .control import ControlServer, FileResolver, default_path

    path = os.path.abspath(opts.get("control") or default_path(store.uuid))
    mode = opts.get("domains") or "persistent"
    iommufd = Iommufd(store, iommu, ephemeral=mode == "ephemeral")
    lu = LiveUpdate(store, iommufd, mode=mode)
    findings = lu.restore()  # the previous kernel's sessions, before any client can ask for them
    log.info("live update: boot %d, %d sessions restored, %d refused%s", lu.boot, len(lu.incoming),
             len(lu.refused), "".join(f"\n  {f}" for f in findings))
    owner = os.stat(store.path).st_uid  # with root, the only uid the control socket serves
    return ControlServer(path, iommufd, FileResolver(None, path_of=store.path_of), lu, owner=owner)


async def _main(pyfuse3: Any, control: ControlServer | None) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, pyfuse3, nursery.cancel_scope)
        if control is not None:
            nursery.start_soon(control.run)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _watch_signals(pyfuse3: Any, scope: Any) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
