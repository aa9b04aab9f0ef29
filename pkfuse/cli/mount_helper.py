"""``mount.fuse.pkfuse``: the helper mount(8) runs for ``-t fuse.pkfuse``.

mount(8) calls ``/sbin/mount.fuse.pkfuse IMAGE MOUNTPOINT [-sfnv] [-N NS] -o OPTIONS [-t TYPE]``
for ``mount -t fuse.pkfuse IMAGE MOUNTPOINT`` and for an /etc/fstab line
such as::

    /var/lib/pkfuse/host.img  /run/pkernfs  fuse.pkfuse  defaults,allow_other,log=/var/log/pkfuse.log  0 0

Install it once with ``ln -s "$(command -v mount.fuse.pkfuse)" /sbin/mount.fuse.pkfuse``.
Options that only mount(8) or systemd understand (``defaults``, ``noauto``,
``user``, ``nofail``, ``_netdev``, ``x-*``, ``comment=``) are dropped; the
rest go to ``pkfuse mount -o``, which daemonizes and returns once the mount
answers. Exit status: that of ``pkfuse mount``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from . import entry as cli

DROPPED = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev", "nofail",
           "loud", "silent", "relatime", "norelatime", "strictatime", "lazytime", "nolazytime"}


def translate(argv: Sequence[str]) -> tuple[list[str], bool]:
    """mount(8)-style arguments -> (``pkfuse mount`` arguments, fake).

    Raises ValueError for a command line mount(8) would not produce.
    """
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "-t", "-N"):  # options; the type and the namespace (libmount may pass them): ignored
            if i + 1 >= len(args):
                raise ValueError(f"{a} needs a value")
            if a == "-o":
                options += args[i + 1].split(",")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options += a[2:].split(",")
        elif a.startswith("-") and len(a) > 1:
            fake = fake or "f" in a[1:]  # -s sloppy, -n no mtab, -v verbose: nothing to do
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise ValueError("usage: mount.fuse.pkfuse IMAGE MOUNTPOINT [-o OPTIONS]")
    kept = [o for o in options if o and o not in DROPPED and not o.startswith(("x-", "comment="))]
    out = ["mount"]
    if kept:
        out += ["-o", ",".join(kept)]
    return out + positional, fake


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, fake = translate(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"mount.fuse.pkfuse: error: {exc}", file=sys.stderr)
        return 2
    if fake:
        return 0
    return cli.main(args)


def run() -> NoReturn:
    """The ``mount.fuse.pkfuse`` command."""
    cli.exit_now(main())


if __name__ == "__main__":
    run()
